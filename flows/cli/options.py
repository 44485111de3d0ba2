"""What the commands share: the two consoles, the option types (`--params`, `--set`, `--data`,
`--model-uri`) and `load_config`, which reads the parameter file with its overrides or exits 2
saying which key is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from components.config import DEFAULT_PARAMS_PATH, Params, load_params

# No emoji codes: query ids such as "q:train:..." would render ":train:" as a picture.
console = Console(emoji=False, highlight=False)
err_console = Console(stderr=True, emoji=False, highlight=False)

PARAMS_FILE = DEFAULT_PARAMS_PATH  # params.yaml, the default of every --params

ParamsOption = Annotated[
    Path, typer.Option("--params", help="Parameter file (every tunable number).", show_default=True)
]
SetOption = Annotated[
    Optional[list[str]],  # noqa: UP045 - Typer needs Optional here
    typer.Option("--set", help="Override a parameter, e.g. --set data.max_ads=500 (repeatable)."),
]
DataOption = Annotated[Optional[Path], typer.Option("--data", help="Dataset directory (default: params data.out_dir).")]  # noqa: UP045
ModelUriOption = Annotated[Optional[str], typer.Option(help="Model version whose catalogue changes (default: params serve.model_uri, the champion).")]  # noqa: UP045


def load_config(params: Path, overrides: list[str] | None) -> Params:
    """The typed parameters of `params` with the `--set` overrides applied; exit 2 when invalid."""
    try:
        return load_params(params, overrides)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        err_console.print(f"[red]Invalid parameters ({params}):[/red]\n{exc}")
        raise typer.Exit(2) from exc


def comma_list(text: str | None, kind: type = str) -> list | None:
    """`a,b,c` -> [kind(a), kind(b), kind(c)]; None (the option not given) stays None, '' is []."""
    return None if text is None else [kind(x.strip()) for x in text.split(",") if x.strip()]


def with_options(section, **given):
    """A params section with the options given on the command line (None: not given) in place."""
    return section.model_validate({**section.model_dump(), **{k: v for k, v in given.items() if v is not None}})
