"""The pipeline's stages one at a time (the commands `dvc.yaml` runs): `features`,
`align train|show|compare`, `train-matcher`, `evaluate`, and `benchmark`, which trains and
evaluates every system.

Each stage module loads torch (and Lightning, faiss or scikit-learn), so a command imports
its stage when it runs: `alignsearch search` never pays for training code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from components.config import parse_variant
from components.data.format import read_dataset
from components.evaluate.benchmark import run_benchmark
from components.systems import WORD_SYSTEMS
from components.text.stems import word_stem
from flows.cli.options import (
    PARAMS_FILE,
    DataOption,
    ParamsOption,
    SetOption,
    comma_list,
    console,
    err_console,
    load_config,
    with_options,
)

align_app = typer.Typer(help="The label-free alignment of image parts to words.", no_args_is_help=True)

FeaturesOption = Annotated[Optional[Path], typer.Option("--features")]  # noqa: UP045
AlignOption = Annotated[Optional[Path], typer.Option("--align")]  # noqa: UP045
OutOption = Annotated[Optional[Path], typer.Option(help="Output directory.")]  # noqa: UP045


def features(data: DataOption = None, out: OutOption = None,
             params: ParamsOption = PARAMS_FILE, set_: SetOption = None) -> None:
    """Visual parts of every ad image (EfficientNet-Lite0; cached by image content)."""
    from components.vision.stage import run_features

    cfg = load_config(params, set_)
    result = run_features(cfg.vision, dataset_dir=data or cfg.data.out_dir, out_dir=out or cfg.paths.features_dir,
                          cache_dir=cfg.data.cache_dir)
    console.print(f"Features: {result.features_path} {result.metrics}")


@align_app.command("train")
def align_train(data: DataOption = None,
                features_dir: Annotated[Optional[Path], typer.Option("--features", help="Output of `alignsearch features`.")] = None,  # noqa: UP045
                out: OutOption = None,
                params: ParamsOption = PARAMS_FILE, set_: SetOption = None) -> None:
    """Train the alignment on the training split (titles and the click text of the matcher's
    training queries; never tags, part labels or other splits) and write the visual words of
    every ad (out-of-fold for training ads)."""
    from components.align.stage import run_align
    from components.vision.stage import FEATURES_FILE, load_features

    cfg = load_config(params, set_)
    feats = load_features((features_dir or cfg.paths.features_dir) / FEATURES_FILE)
    result = run_align(cfg.align, dataset_dir=data or cfg.data.out_dir, features=feats,
                       out_dir=out or cfg.paths.align_dir, cache_dir=cfg.data.cache_dir,
                       fraction=cfg.match.train_fraction, query_seed=cfg.match.seed)
    console.print(f"Alignment model: {result.model_dir}\nWords: {result.words_path}\nGallery: {result.gallery_path}")
    console.print(json.dumps(result.metrics, indent=2))


@align_app.command("show")
def align_show(data: DataOption = None,
               align_dir: Annotated[Optional[Path], typer.Option("--align", help="Output of `alignsearch align train`.")] = None,  # noqa: UP045
               ad_id: Annotated[Optional[list[str]], typer.Option("--ad-id", help="Ads to show (repeatable).")] = None,  # noqa: UP045
               split: Annotated[str, typer.Option(help="Split to sample ads from when no --ad-id is given.")] = "test",
               limit: Annotated[int, typer.Option(help="How many ads.")] = 10,
               all_words: Annotated[bool, typer.Option("--all-words", help="Every kept word (align.words_per_image), not only the shown ones (align.words_shown).")] = False,
               params: ParamsOption = PARAMS_FILE) -> None:
    """Show ads with their titles and aligned visual words (the first align.words_shown, as
    the gallery and search hits do): probability, the part each word came from (whole image
    or part n), and ✓/✗ against the ad's held-out query words."""
    from components.align.evaluation import held_out_words
    from components.align.gallery import mark
    from components.align.model import WHOLE_IMAGE, read_words_shown
    from components.align.stage import WORDS_FILE, held_out_texts, load_visual_words
    from components.align.train import MODEL_SUBDIR

    cfg = load_config(params, None)
    dataset = read_dataset(data or cfg.data.out_dir)
    align_dir = align_dir or cfg.paths.align_dir
    words = load_visual_words(align_dir / WORDS_FILE)
    shown = None if all_words else read_words_shown(align_dir / MODEL_SUBDIR)
    ads = dataset.ads.set_index("ad_id")
    chosen = ad_id or dataset.split(split).ads["ad_id"].head(limit).tolist()
    held = {a: held_out_words(t) for name in ("train", "valid", "test")
            for a, t in held_out_texts(dataset, name).items()}
    table = Table(title="Visual words (probability, source part; ✓/✗ against held-out query words)")
    for column in ("ad id", "title", "visual words", "held-out words"):
        table.add_column(column)
    for ad in chosen:
        if ad not in ads.index:
            err_console.print(f"[red]unknown ad id {ad!r}[/red]")
            raise typer.Exit(1)
        stems = held.get(ad)
        cells = [f"{mark(None if stems is None else word_stem(w.word) in stems)}{w.word} ({w.score:.2f}, "
                 f"{'image' if w.part == WHOLE_IMAGE else f'part {w.part}'})" for w in words.get(ad, [])[:shown]]
        table.add_row(ad, str(ads.loc[ad, "title"]), ", ".join(cells), ", ".join(sorted(stems or [])) or "–")
    console.print(table)


@align_app.command("compare")
def align_compare(data: DataOption = None,
                  variant: Annotated[list[str], typer.Option("--variant", help="NAME:key=value,key=value of the align section (repeatable); '' = params as they are.")] = ["params:"],  # noqa: B006
                  out: Annotated[Path, typer.Option(help="Where align_compare.csv and the runs go.")] = Path("reports/align-compare"),
                  params: ParamsOption = PARAMS_FILE, set_: SetOption = None) -> None:
    """Alignment variants side by side: visual-word precision on valid, and the ranking of a
    shared trained text_only whose word channel is each variant's alignment (calibrated on
    valid, as ours does), on the test split."""
    from components.evaluate.align_compare import compare_alignments
    from components.vision.stage import dataset_features

    cfg = load_config(params, set_)
    try:
        variants = [parse_variant(v) for v in variant]
    except ValueError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    dataset_dir = data or cfg.data.out_dir
    feats = dataset_features(read_dataset(dataset_dir), cfg.vision, cfg.data.cache_dir)
    table = compare_alignments(variants, align_cfg=cfg.align, match_cfg=cfg.match, dataset_dir=dataset_dir,
                               features=feats, out_dir=out, cache_dir=cfg.data.cache_dir)
    shown = Table(title=f"Alignment variants ({out / 'align_compare.csv'})")
    columns = ["variant", "visual_word_precision", "visual_word_lift", "channel_weight", "valid/ndcg@10",
               "test/all/ndcg@10", "test/image_only/ndcg@10", "test/title_overlap/ndcg@10"]
    columns = [c for c in columns if c in table.columns]
    for column in columns:
        shown.add_column(column.removeprefix("visual_word_"))
    for _, row in table.iterrows():
        shown.add_row(*[f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns])
    console.print(shown)


def train_matcher(data: DataOption = None,
                  system: Annotated[str, typer.Option(help="ours | text_only | implicit_fusion | late_fusion | ...")] = "ours",
                  features_dir: FeaturesOption = None,
                  align_dir: AlignOption = None,
                  out: OutOption = None,
                  params: ParamsOption = PARAMS_FILE, set_: SetOption = None) -> None:
    """Train the language-space matcher (or a baseline) on the training split."""
    from components.align.stage import WORDS_FILE, load_ad_words
    from components.match.stage import run_train_matcher
    from components.vision.stage import FEATURES_FILE, load_features

    cfg = load_config(params, set_)
    feats = load_features((features_dir or cfg.paths.features_dir) / FEATURES_FILE)
    words = word_logits = None
    if system in WORD_SYSTEMS:
        words, word_logits = load_ad_words((align_dir or cfg.paths.align_dir) / WORDS_FILE)
    result = run_train_matcher(cfg.match, dataset_dir=data or cfg.data.out_dir, out_dir=out or cfg.paths.matcher_dir,
                               system=system, features=feats, words=words, word_logits=word_logits)
    console.print(f"Matcher: {result.scorer_dir} {result.metrics}")


def evaluate(data: DataOption = None,
             matcher_dir: Annotated[Optional[Path], typer.Option("--matcher", help="Output of `train-matcher`.")] = None,  # noqa: UP045
             features_dir: FeaturesOption = None,
             align_dir: AlignOption = None,
             out: Annotated[Optional[Path], typer.Option(help="Reports directory.")] = None,  # noqa: UP045
             params: ParamsOption = PARAMS_FILE, set_: SetOption = None) -> None:
    """Metrics (auc, ndcg@10, recall@10, mrr@10 per system, per split) and plots."""
    from components.align.stage import WORDS_FILE, load_ad_words
    from components.evaluate.stage import run_evaluate
    from components.match.stage import SCORER_SUBDIR
    from components.vision.stage import FEATURES_FILE, load_features

    cfg = load_config(params, set_)
    feats = load_features((features_dir or cfg.paths.features_dir) / FEATURES_FILE)
    words, word_logits = load_ad_words((align_dir or cfg.paths.align_dir) / WORDS_FILE)
    result = run_evaluate(dataset_dir=data or cfg.data.out_dir,
                          scorer_dir=(matcher_dir or cfg.paths.matcher_dir) / SCORER_SUBDIR,
                          out_dir=out or cfg.paths.reports_dir, features=feats, words=words, word_logits=word_logits,
                          seed=cfg.match.seed, match_cfg=cfg.match)
    console.print_json(json.dumps(result.metrics))


def benchmark(
    data: Annotated[Path, typer.Option("--data", help="Dataset directory in the interchange format.")],
    systems: Annotated[Optional[str], typer.Option(help="Comma-separated systems (default: all of params benchmark.systems).")] = None,  # noqa: UP045
    fractions: Annotated[Optional[str], typer.Option(help="Training-query fractions, e.g. 0.25,0.5,1.0.")] = None,  # noqa: UP045
    seeds: Annotated[Optional[str], typer.Option(help="Seeds, e.g. 0,1,2.")] = None,  # noqa: UP045
    ablations: Annotated[Optional[str], typer.Option(help="Comma-separated ablations of ours ('' for none).")] = None,  # noqa: UP045
    out: Annotated[Path, typer.Option(help="Where benchmark.json, benchmark.md and the plots go.")] = Path("reports/benchmark"),
    quick: Annotated[bool, typer.Option("--quick", help="A small configuration that runs in minutes.")] = False,
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Train and evaluate every system on one dataset; write benchmark.json/.md and plots.
    With `compute.workers` or a Dask address (params `compute`, ALIGNSEARCH_DASK_ADDRESS) the
    trainings run as tasks on Dask."""
    from flows.compute import cell_mapper  # Prefect

    cfg = load_config(params, set_)
    bench_cfg = with_options(cfg.benchmark, systems=comma_list(systems), ablations=comma_list(ablations),
                             fractions=comma_list(fractions, float), seeds=comma_list(seeds, int))
    result = run_benchmark(bench_cfg, dataset_dir=data, out_dir=out, cache_dir=cfg.data.cache_dir,
                           parts_cfg=cfg.vision, align_cfg=cfg.align, match_cfg=cfg.match, quick=quick,
                           map_cells=cell_mapper(cfg.compute))
    console.print(result.paths["markdown"].read_text(), markup=False, soft_wrap=True)
    console.print(f"Reports: {out}  ({result.seconds / 60:.1f} min)")


def benchmark_loop(
    data: Annotated[Path, typer.Option("--data", help="Dataset directory in the interchange format.")],
    rounds: Annotated[Optional[int], typer.Option(help="Rounds after round 0 (default: params benchmark_loop.rounds).")] = None,  # noqa: UP045
    searches: Annotated[Optional[int], typer.Option(help="Searches per round answered by the champion.")] = None,  # noqa: UP045
    systems: Annotated[Optional[str], typer.Option(help="Comma-separated systems (default: params benchmark_loop.systems).")] = None,  # noqa: UP045
    seeds: Annotated[Optional[str], typer.Option(help="Seeds, e.g. 0,1,2.")] = None,  # noqa: UP045
    out: Annotated[Path, typer.Option(help="Where loop.json, loop.md and learning_curves.png go.")] = Path("reports/benchmark-loop"),
    work: Annotated[Optional[Path], typer.Option(help="Keep the loops' datasets, models and traffic logs here (default: a temporary directory, deleted).")] = None,  # noqa: UP045
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Every system learns from simulated people's clicks, round by round, through the real
    service, ingest, warm retrain and promotion rule; write loop.json/.md and learning curves."""
    from components.traffic.loop_benchmark import run_loop_benchmark

    cfg = load_config(params, set_)
    loop_cfg = with_options(cfg.benchmark_loop, rounds=rounds, searches=searches, systems=comma_list(systems),
                            seeds=comma_list(seeds, int))
    result = run_loop_benchmark(loop_cfg, dataset_dir=data, out_dir=out, cache_dir=cfg.data.cache_dir,
                                parts_cfg=cfg.vision, align_cfg=cfg.align, match_cfg=cfg.match, traffic=cfg.traffic,
                                promote=cfg.promote, work_dir=work)
    console.print(result.paths["markdown"].read_text(), markup=False, soft_wrap=True)
    console.print(f"Reports: {out}  ({result.seconds / 60:.1f} min)")
