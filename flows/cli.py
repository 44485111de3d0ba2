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
align_app = typer.Typer(help="The label-free alignment of image parts to words.", no_args_is_help=True)
app.add_typer(align_app, name="align")

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
    metrics_path = cfg.paths.reports_dir / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
        table = Table(title=f"Test split ({metrics_path})")
        for column in ("system", "ndcg@10", "recall@10", "mrr@10", "auc", "auc image-only"):
            table.add_column(column, justify="left" if column == "system" else "right")
        for system, per_split in metrics.items():
            test = per_split.get("test", {})
            table.add_row(system, *(f"{test.get(k, float('nan')):.3f}"
                                    for k in ("ndcg@10", "recall@10", "mrr@10", "auc", "image_only/auc")))
        console.print(table)
    console.print(f"Summary: {dataset_dir / 'README.txt'}    Time: {time.perf_counter() - started:.0f} s")


DataOption = Annotated[Optional[Path], typer.Option("--data", help="Dataset directory (default: params data.out_dir).")]  # noqa: UP045


@app.command("features")
def features(data: DataOption = None, out: Annotated[Optional[Path], typer.Option(help="Output directory.")] = None,  # noqa: UP045
             params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Visual parts of every ad image (EfficientNet-Lite0; cached by image content)."""
    from components.vision.stage import run_features

    cfg = _load(params, set_)
    result = run_features(cfg.vision, dataset_dir=data or cfg.data.out_dir, out_dir=out or cfg.paths.features_dir,
                          cache_dir=cfg.data.cache_dir)
    console.print(f"Features: {result.features_path} {result.metrics}")


@align_app.command("train")
def align_train(data: DataOption = None,
                features_dir: Annotated[Optional[Path], typer.Option("--features", help="Output of `alignsearch features`.")] = None,  # noqa: UP045
                out: Annotated[Optional[Path], typer.Option(help="Output directory.")] = None,  # noqa: UP045
                params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Train the alignment network on the training split (no tags, qrels or queries) and
    write the visual words of every ad."""
    from components.align.stage import run_align
    from components.vision.stage import FEATURES_FILE, load_features

    cfg = _load(params, set_)
    feats = load_features((features_dir or cfg.paths.features_dir) / FEATURES_FILE)
    result = run_align(cfg.align, dataset_dir=data or cfg.data.out_dir, features=feats,
                       out_dir=out or cfg.paths.align_dir, cache_dir=cfg.data.cache_dir)
    console.print(f"Alignment model: {result.model_dir}\nWords: {result.words_path}\nGallery: {result.gallery_path}")
    console.print(json.dumps(result.metrics, indent=2))


@align_app.command("show")
def align_show(data: DataOption = None,
               align_dir: Annotated[Optional[Path], typer.Option("--align", help="Output of `alignsearch align train`.")] = None,  # noqa: UP045
               ad_id: Annotated[Optional[list[str]], typer.Option("--ad-id", help="Ads to show (repeatable).")] = None,  # noqa: UP045
               split: Annotated[str, typer.Option(help="Split to sample ads from when no --ad-id is given.")] = "test",
               limit: Annotated[int, typer.Option(help="How many ads.")] = 10,
               params: ParamsOption = Path("params.yaml")) -> None:
    """Show ads with their titles and aligned visual words (scores in brackets)."""
    from components.align.stage import WORDS_FILE, load_words
    from components.data.format import read_dataset

    cfg = _load(params, None)
    dataset = read_dataset(data or cfg.data.out_dir)
    words = load_words((align_dir or cfg.paths.align_dir) / WORDS_FILE)
    ads = dataset.ads.set_index("ad_id")
    chosen = ad_id or dataset.split(split).ads["ad_id"].head(limit).tolist()
    table = Table(title="Visual words")
    for column in ("ad id", "title", "visual words"):
        table.add_column(column)
    for ad in chosen:
        if ad not in ads.index:
            err_console.print(f"[red]unknown ad id {ad!r}[/red]")
            raise typer.Exit(1)
        table.add_row(ad, str(ads.loc[ad, "title"]), ", ".join(f"{w} ({s:.2f})" for w, s in words.get(ad, [])))
    console.print(table)


@app.command("train-matcher")
def train_matcher(data: DataOption = None,
                  system: Annotated[str, typer.Option(help="ours | text_only | implicit_fusion | late_fusion | ...")] = "ours",
                  features_dir: Annotated[Optional[Path], typer.Option("--features")] = None,  # noqa: UP045
                  align_dir: Annotated[Optional[Path], typer.Option("--align")] = None,  # noqa: UP045
                  out: Annotated[Optional[Path], typer.Option(help="Output directory.")] = None,  # noqa: UP045
                  params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Train the language-space matcher (or a baseline) on the training split."""
    from components.align.stage import WORDS_FILE, load_words
    from components.match.stage import run_train_matcher
    from components.vision.stage import FEATURES_FILE, load_features

    cfg = _load(params, set_)
    feats = load_features((features_dir or cfg.paths.features_dir) / FEATURES_FILE)
    words = load_words((align_dir or cfg.paths.align_dir) / WORDS_FILE) if system == "ours" else None
    result = run_train_matcher(cfg.match, dataset_dir=data or cfg.data.out_dir, out_dir=out or cfg.paths.matcher_dir,
                               system=system, features=feats, words=words)
    console.print(f"Matcher: {result.scorer_dir} {result.metrics}")


@app.command("evaluate")
def evaluate(data: DataOption = None,
             matcher_dir: Annotated[Optional[Path], typer.Option("--matcher", help="Output of `train-matcher`.")] = None,  # noqa: UP045
             features_dir: Annotated[Optional[Path], typer.Option("--features")] = None,  # noqa: UP045
             align_dir: Annotated[Optional[Path], typer.Option("--align")] = None,  # noqa: UP045
             out: Annotated[Optional[Path], typer.Option(help="Reports directory.")] = None,  # noqa: UP045
             params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Metrics (auc, ndcg@10, recall@10, mrr@10 per system, per split) and plots."""
    from components.align.stage import WORDS_FILE, load_words
    from components.evaluate.stage import run_evaluate
    from components.match.stage import SCORER_SUBDIR
    from components.vision.stage import FEATURES_FILE, load_features

    cfg = _load(params, set_)
    feats = load_features((features_dir or cfg.paths.features_dir) / FEATURES_FILE)
    words = load_words((align_dir or cfg.paths.align_dir) / WORDS_FILE)
    result = run_evaluate(dataset_dir=data or cfg.data.out_dir,
                          scorer_dir=(matcher_dir or cfg.paths.matcher_dir) / SCORER_SUBDIR,
                          out_dir=out or cfg.paths.reports_dir, features=feats, words=words,
                          seed=cfg.match.seed, match_cfg=cfg.match)
    console.print_json(json.dumps(result.metrics))


def _float_list(text: str | None) -> list[float] | None:
    return None if text is None else [float(x) for x in text.split(",") if x.strip()]


@app.command("benchmark")
def benchmark(
    data: Annotated[Path, typer.Option("--data", help="Dataset directory in the interchange format.")],
    systems: Annotated[Optional[str], typer.Option(help="Comma-separated systems (default: all of params benchmark.systems).")] = None,  # noqa: UP045
    fractions: Annotated[Optional[str], typer.Option(help="Training-query fractions, e.g. 0.25,0.5,1.0.")] = None,  # noqa: UP045
    seeds: Annotated[Optional[str], typer.Option(help="Seeds, e.g. 0,1,2.")] = None,  # noqa: UP045
    ablations: Annotated[Optional[str], typer.Option(help="Comma-separated ablations of ours ('' for none).")] = None,  # noqa: UP045
    out: Annotated[Path, typer.Option(help="Where benchmark.json, benchmark.md and the plots go.")] = Path("reports/benchmark"),
    quick: Annotated[bool, typer.Option("--quick", help="A small configuration that runs in minutes.")] = False,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Train and evaluate every system on one dataset; write benchmark.json/.md and plots."""
    from components.evaluate.benchmark import run_benchmark

    cfg = _load(params, set_)
    update: dict = {}
    if systems is not None:
        update["systems"] = [s.strip() for s in systems.split(",") if s.strip()]
    if ablations is not None:
        update["ablations"] = [s.strip() for s in ablations.split(",") if s.strip()]
    if fractions is not None:
        update["fractions"] = _float_list(fractions)
    if seeds is not None:
        update["seeds"] = [int(x) for x in seeds.split(",") if x.strip()]
    bench_cfg = cfg.benchmark.model_validate({**cfg.benchmark.model_dump(), **update})
    result = run_benchmark(bench_cfg, dataset_dir=data, out_dir=out, cache_dir=cfg.data.cache_dir,
                           parts_cfg=cfg.vision, align_cfg=cfg.align, match_cfg=cfg.match, quick=quick)
    console.print(result.paths["markdown"].read_text(), markup=False, soft_wrap=True)
    console.print(f"Reports: {out}  ({result.seconds / 60:.1f} min)")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":
    main()
