"""`alignsearch data build|validate|hash`: datasets in the interchange format, built,
checked with the Great Expectations suite, and hashed as DVC hashes them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from components.data.build import build_dataset
from components.data.format import DatasetFormatError, dataset_hash
from components.data.validate import format_report, validate_dataset
from flows.cli.options import (
    PARAMS_FILE,
    ParamsOption,
    SetOption,
    console,
    err_console,
    load_config,
)

data_app = typer.Typer(help="Build, validate and version datasets in the interchange format.", no_args_is_help=True)


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
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Build a dataset (openclipart, synthetic or coco) in the interchange format."""
    overrides = list(set_ or [])
    for key, value in (("source", source), ("out_dir", out), ("max_ads", max_ads), ("svg_root", svg_root),
                       ("seed", seed), ("coco.captions", captions), ("coco.images", images)):
        if value is not None:
            overrides.append(f"data.{key}={value}")
    cfg = load_config(params, overrides).data
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
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Validate a dataset with Great Expectations; exit non-zero and name each failed rule."""
    cfg = load_config(params, set_).validation
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
    console.print(dataset_hash(dataset_dir))
