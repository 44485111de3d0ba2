"""The `alignsearch` command line: thin Typer wrappers around component stage functions."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from flows.runtime import setup_runtime

app = typer.Typer(
    name="alignsearch",
    help="Cross-modal sponsored search: align ad image parts to words without labels, "
    "then match queries to ads in language space (Align before Search, arXiv 2309.16141).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Build, validate and version datasets in the interchange format.", no_args_is_help=True)
app.add_typer(data_app, name="data")

# No emoji codes: query ids such as "q:train:..." would render ":train:" as a picture.
console = Console(emoji=False, highlight=False)
err_console = Console(stderr=True, emoji=False, highlight=False)

ParamsOption = Annotated[
    Path, typer.Option("--params", help="Parameter file (every tunable number).", show_default=True)
]
SetOption = Annotated[
    Optional[list[str]],  # noqa: UP045 - Typer needs Optional here
    typer.Option("--set", help="Override a parameter, e.g. --set data.max_ads=500 (repeatable)."),
]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    setup_runtime(verbose=verbose)


def _load(params: Path, overrides: list[str] | None):
    from components.config import load_params

    try:
        return load_params(params, overrides)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        err_console.print(f"[red]Invalid parameters ({params}):[/red]\n{exc}")
        raise typer.Exit(2) from exc


def _counts_table(title: str, counts: dict[str, dict[str, int]]) -> Table:
    table = Table(title=title)
    for column in ("table", "train", "valid", "test", "total"):
        table.add_column(column, justify="left" if column == "table" else "right")
    for name, per_split in counts.items():
        table.add_row(name, *(str(per_split.get(s, 0)) for s in ("train", "valid", "test", "total")))
    return table


@data_app.command("build")
def data_build(
    source: Annotated[Optional[str], typer.Option(help="openclipart | synthetic | coco (default: params data.source).")] = None,  # noqa: UP045
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: params data.out_dir).")] = None,  # noqa: UP045
    max_ads: Annotated[Optional[int], typer.Option(help="Keep at most this many ads (seeded).")] = None,  # noqa: UP045
    svg_root: Annotated[Optional[Path], typer.Option(help="openclipart: folder of the clip-art SVGs.")] = None,  # noqa: UP045
    captions: Annotated[Optional[Path], typer.Option(help="coco: captions JSON file.")] = None,  # noqa: UP045
    images: Annotated[Optional[Path], typer.Option(help="coco: folder of the images.")] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option(help="Seed of sampling and splits.")] = None,  # noqa: UP045
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Build a dataset (openclipart, synthetic or coco) in the interchange format."""
    from components.data.build import build_dataset

    overrides = list(set_ or [])
    for key, value in (("source", source), ("out_dir", out), ("max_ads", max_ads), ("svg_root", svg_root),
                       ("seed", seed), ("coco.captions", captions), ("coco.images", images)):
        if value is not None:
            overrides.append(f"data.{key}={value}")
    cfg = _load(params, overrides).data
    try:
        result = build_dataset(cfg)
    except (FileNotFoundError, ValueError) as exc:
        err_console.print(f"[red]Build failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(_counts_table(f"{cfg.source} dataset in {result.out_dir} ({result.seconds:.1f} s)", result.counts))
    console.print(f"Summary: {result.out_dir / 'README.txt'}")


@data_app.command("validate")
def data_validate(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset directory in the interchange format.")],
    report_dir: Annotated[Optional[Path], typer.Option(help="Where reports go (default: params validate.report_dir).")] = None,  # noqa: UP045
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Validate a dataset with Great Expectations; exit non-zero and name each failed rule."""
    from components.data.format import DatasetFormatError
    from components.data.validate import format_report, validate_dataset

    cfg = _load(params, set_).validation
    try:
        result = validate_dataset(dataset_dir, cfg, report_dir=report_dir or cfg.report_dir)
    except DatasetFormatError as exc:
        err_console.print(f"[red]Invalid dataset:[/red] {exc}")
        raise typer.Exit(1) from exc
    (console if result.success else err_console).print(format_report(result), markup=False, soft_wrap=True)
    if not result.success:
        raise typer.Exit(1)


@data_app.command("hash")
def data_hash(dataset_dir: Annotated[Path, typer.Argument(help="Dataset directory.")]) -> None:
    """Print the dataset's content hash (the same as DVC's directory hash)."""
    from components.data.format import dataset_hash

    console.print(dataset_hash(dataset_dir))


@app.command("run")
def run(
    params: ParamsOption = Path("params.yaml"),
    push: Annotated[bool, typer.Option(help="Push the dataset to the DVC remote.")] = True,
) -> None:
    """The main job: reproduce the DVC pipeline on the default dataset and record it."""
    from components.data.format import dataset_hash, read_dataset
    from components.data.versioning import DvcError, ensure_dvc_project, run_dvc

    cfg = _load(params, None)
    repo_root = Path.cwd()
    started = time.perf_counter()
    try:
        ensure_dvc_project(repo_root, cfg.dvc.remote_name, cfg.dvc.remote_dir)
        console.rule("dvc repro")
        run_dvc(["repro"], repo_root, capture=False)
        if push:
            console.rule("dvc push")
            run_dvc(["push"], repo_root, capture=False)
    except DvcError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    dataset_dir = cfg.data.out_dir
    console.print(_counts_table(f"Dataset {dataset_dir}", read_dataset(dataset_dir).counts()))
    validation = json.loads((cfg.validation.report_dir / "validation.json").read_text())
    console.print(f"Validation: {'passed' if validation.get('success') else 'FAILED'} "
                  f"({cfg.validation.report_dir / 'validation.md'})")
    console.print(f"Dataset hash (dvc.lock): {dataset_hash(dataset_dir)}")
    console.print(f"Summary: {dataset_dir / 'README.txt'}    Time: {time.perf_counter() - started:.0f} s")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":
    main()
