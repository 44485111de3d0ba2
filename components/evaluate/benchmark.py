"""The benchmark: every system trained and evaluated on one dataset in the interchange format.

`run_benchmark` extracts visual parts once, trains the label-free alignment per seed (and
its ablations), picks each trained system's learning rate with the same search on the
valid split, trains every system at every training fraction and seed with the same
budget, scores the evaluation split, and hands the rows to `components/evaluate/report.py`,
which writes `benchmark.json`, `benchmark.md` (with the paper's claims checked) and the plots.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from components.data.format import read_dataset
from components.evaluate.config import BenchmarkConfig
from components.evaluate.report import BenchmarkResult, write_reports
from components.evaluate.significance import run_detail
from components.evaluate.subsets import evaluate_scores
from components.match.config import MatchConfig
from components.match.data import match_data
from components.systems import SYSTEMS, TRAINED_SYSTEMS, UNTRAINED_SYSTEMS, WORD_SYSTEMS

# components.align.stage / .model, components.match.encoder / .systems, components.vision.parts
# / .cache load torch at import: they are imported inside the functions that train or extract,
# so importing this module (the CLI, the Dask workers' task lookup) stays light.

log = logging.getLogger(__name__)


def _rows(records: list[dict], **keys) -> list[dict]:
    return [{**keys, "subset": r["subset"], "metric": r["metric"], "value": float(r["value"])} for r in records]


def random_words(words: dict[str, list[tuple[str, float]]], vocabulary: list[str], counts: list[int],
                 seed: int) -> dict[str, list[tuple[str, float]]]:
    """The control: as many words per ad as the alignment gave, drawn from the vocabulary by
    frequency, with no link to the image."""
    rng = np.random.default_rng(seed)
    p = np.asarray(counts, dtype=np.float64)
    p = p / p.sum()
    out = {}
    for ad_id, ad_words in words.items():
        n = min(len(ad_words), len(vocabulary))
        picked = rng.choice(len(vocabulary), size=n, replace=False, p=p) if n else []
        out[ad_id] = [(vocabulary[i], score) for i, (_, score) in zip(picked, ad_words, strict=False)]
    return out


def shuffled_logits(word_logits, seed: int):
    """The control's evidence: the ads' logit rows permuted among the ads (same values, no
    link to each ad's image)."""
    from components.align.stage import WordLogits

    order = np.random.default_rng(seed).permutation(len(word_logits.ad_ids))
    return WordLogits(word_logits.ad_ids, word_logits.words, word_logits.logits[order], word_logits.means)


@dataclass
class AdWords:
    """What one alignment gives the matcher: words per ad and the per-word logits."""

    words: dict[str, list[tuple[str, float]]]
    logits: object  # components.align.stage.WordLogits
    vocabulary: list[str]
    counts: list[int]


# --------------------------------------------------------------------------- training cells
# The benchmark's trainings are independent given the alignments: each cell reads what it
# needs from files named in a `BenchmarkContext`, so it can run in another process or on
# another machine that sees the same paths (flows/compute.py runs them on Dask). Cells and
# the context travel as plain dicts; results come back as objects.

MapCells = Callable[[Callable, list[dict], dict], list]


@dataclass(frozen=True)
class BenchmarkContext:
    dataset_dir: str
    features_path: str  # the parts of every ad (PartsFeatures.save), in the dataset's ad order
    work_dir: str
    eval_split: str
    match_cfg: dict
    full: float
    alignments: dict  # _alignment_key(variant, fraction, seed) -> [align dir, model dir]


@dataclass(frozen=True)
class SearchCell:
    """The learning-rate search of one trained system (at `fraction`, `seed`)."""

    system: str
    fraction: float
    seed: int


@dataclass(frozen=True)
class SearchResult:
    system: str
    lr: float
    values: dict
    scorer_dir: str  # the winning run's scorer: that system's (fraction, seed) run


@dataclass(frozen=True)
class TrainCell:
    """One run: `system` trained at `fraction` and `seed` with `update` on the match config
    (or the search's winner in `reuse` finished), then scored on the evaluation split."""

    position: int  # the run's place in the sequential order (rows keep it)
    system: str
    fraction: float
    seed: int
    update: dict
    reuse: str | None = None
    text_scorer: str | None = None  # late_fusion: the scorer dir of the text_only it fuses


@dataclass
class CellResult:
    position: int
    system: str
    fraction: float
    seed: int
    records: list[dict]
    detail: object  # components.evaluate.significance.RunDetail
    scorer_dir: str


def _alignment_key(variant: str, fraction: float, seed: int) -> str:
    return f"{variant}|{fraction:g}|{seed}"


def _map_in_process(function: Callable, cells: list[dict], context: dict) -> list:
    return [function(cell, context) for cell in cells]


def _stamp(path: str | Path) -> tuple[int, int]:
    """A file's (mtime, size): the per-process caches below never serve a rewritten file."""
    stat = Path(path).stat()
    return stat.st_mtime_ns, stat.st_size


def _benchmark_inputs(dataset_dir: str, features_path: str, eval_split: str):
    return _read_benchmark_inputs(dataset_dir, features_path, eval_split, _stamp(features_path))


def load_ad_words(align_dir: str, model_dir: str) -> AdWords:
    from components.align.stage import LOGITS_FILE

    return _read_ad_words(align_dir, model_dir, _stamp(Path(align_dir) / LOGITS_FILE))


@functools.lru_cache(maxsize=2)
def _read_benchmark_inputs(dataset_dir: str, features_path: str, eval_split: str, stamp: tuple):
    """The dataset's splits and each split's parts (read once per process)."""
    from components.vision.parts import PartsFeatures

    dataset = read_dataset(Path(dataset_dir))
    features = PartsFeatures.load(Path(features_path))
    splits = {name: dataset.split(name) for name in ("train", "valid", eval_split)}
    return splits, {name: features.take(dataset.ad_rows(split)) for name, split in splits.items()}


@functools.lru_cache(maxsize=8)
def _read_ad_words(align_dir: str, model_dir: str, stamp: tuple) -> AdWords:
    from components.align.model import AlignmentModel
    from components.align.stage import LOGITS_FILE, WORDS_FILE, load_word_logits, load_words

    model = AlignmentModel.load(Path(model_dir))
    return AdWords(load_words(Path(align_dir) / WORDS_FILE), load_word_logits(Path(align_dir) / LOGITS_FILE),
                   list(model.words), list(model.word_counts))


def _ad_words(context: BenchmarkContext, system: str, fraction: float, seed: int) -> AdWords | None:
    """The alignment a system's run reads (None: the system uses no words)."""
    if not (system in WORD_SYSTEMS or system.startswith("ours")):
        return None
    if system == "ours_random_words":  # the control: ours' words and evidence, unlinked from the images
        base = load_ad_words(*context.alignments[_alignment_key("ours", context.full, seed)])
        return AdWords(random_words(base.words, base.vocabulary, base.counts, seed),
                       shuffled_logits(base.logits, seed), base.vocabulary, base.counts)
    variant_key = _alignment_key(system, context.full, seed)
    if system != "ours" and variant_key in context.alignments:  # an alignment ablation (titles only, ...)
        return load_ad_words(*context.alignments[variant_key])
    return load_ad_words(*context.alignments[_alignment_key("ours", fraction, seed)])  # ours at its fraction


def _cell_data(context: BenchmarkContext, system: str, fraction: float, seed: int) -> dict:
    splits, split_features = _benchmark_inputs(context.dataset_dir, context.features_path, context.eval_split)
    ad_words = _ad_words(context, system, fraction, seed)
    return {name: match_data(split, words=None if ad_words is None else ad_words.words,
                             features=split_features[name],
                             word_logits=None if ad_words is None else ad_words.logits)
            for name, split in splits.items()}


def search_learning_rate(cell: dict, context: dict) -> SearchResult:
    """A `SearchCell`: every rate of the grid, the best on valid (`select_learning_rate`)."""
    from components.match.encoder import reset_shared_prefix
    from components.match.systems import select_learning_rate

    reset_shared_prefix()  # the same numbers whichever cells this process ran before
    search, ctx = SearchCell(**cell), BenchmarkContext(**context)
    data = _cell_data(ctx, search.system, search.fraction, search.seed)
    cfg = MatchConfig(**ctx.match_cfg).model_copy(update={"seed": search.seed, "train_fraction": search.fraction})
    search_dir = Path(ctx.work_dir) / "lr" / search.system
    best, values = select_learning_rate(search.system, cfg, data["train"], data["valid"], search_dir)
    return SearchResult(search.system, best, values, str(search_dir / f"lr-{best:g}" / "scorer"))


def train_cell(cell: dict, context: dict) -> CellResult:
    """A `TrainCell`: train (or finish the reused search winner), score the evaluation split."""
    from components.match.encoder import reset_shared_prefix
    from components.match.systems import finish_matcher, load_scorer, train_system

    reset_shared_prefix()  # the same numbers whichever cells this process ran before
    run, ctx = TrainCell(**cell), BenchmarkContext(**context)
    started = time.perf_counter()
    match_cfg = MatchConfig(**ctx.match_cfg)
    base = "ours" if run.system.startswith("ours") else run.system
    data = _cell_data(ctx, run.system, run.fraction, run.seed)
    run_cfg = match_cfg.model_copy(update=run.update)
    out_dir = Path(ctx.work_dir) / "runs" / f"{run.system}-f{run.fraction:g}-seed{run.seed}"
    if run.reuse:  # the search's winner, finished as train_system finishes a run
        scorer = finish_matcher(base, load_scorer(Path(run.reuse), match_cfg.device), run_cfg,
                                data["train"], data["valid"])
        scorer_dir = run.reuse
    else:
        text_scorer = load_scorer(Path(run.text_scorer), match_cfg.device) if run.text_scorer else None
        scorer = train_system(base, run_cfg, data["train"], data["valid"], out_dir, text_scorer=text_scorer)
        scorer_dir = str(out_dir / "scorer")
    splits, _ = _benchmark_inputs(ctx.dataset_dir, ctx.features_path, ctx.eval_split)
    test = data[ctx.eval_split]
    matrix = scorer.score_matrix(test)
    records = evaluate_scores(splits[ctx.eval_split], matrix, run.seed)
    detail = run_detail(splits[ctx.eval_split], matrix, run.seed)
    info = getattr(scorer, "info", {}) or {}
    if "word_channel_weight" in info:
        records.append({"subset": "all", "metric": "word_channel_weight", "value": info["word_channel_weight"]})
    calibration = info.get("word_channel_calibration")
    if calibration:  # the fusion weight ours serves with (0 when the learned weight was kept)
        records.append({"subset": "all", "metric": "word_channel_calibrated_weight",
                        "value": float(calibration["weight"]) if calibration["used"] == "calibrated" else 0.0})
    valid_ndcg = (calibration or {}).get("val_ndcg@10") if (calibration or {}).get("used") == "calibrated" \
        else info.get("val_ndcg@10")
    if valid_ndcg is not None:  # model selection's own number, beside the test numbers
        records.append({"subset": "valid", "metric": "ndcg@10", "value": float(valid_ndcg)})
    seconds = time.perf_counter() - started
    log.info("%s fraction=%g seed=%d: %.1f s", run.system, run.fraction, run.seed, seconds)
    return CellResult(run.position, run.system, run.fraction, run.seed, records, detail, scorer_dir)


def run_benchmark(cfg: BenchmarkConfig, *, dataset_dir: Path, out_dir: Path, cache_dir: Path,
                  parts_cfg, align_cfg, match_cfg, quick: bool = False,
                  on_row: Callable[[dict], None] | None = None,
                  map_cells: MapCells | None = None) -> BenchmarkResult:
    """Train and evaluate every configured system; write the reports under `out_dir`.

    Per seed and training fraction the alignment is trained by the align stage on the
    ad-level text of that fraction (the same training queries the matchers see) with
    cross-fitted words for training ads; every trained matcher gets the same learning-rate
    search (seed 0 of the list, full data; its winner is reused as that run), budget and
    splits; late_fusion fuses the text_only of its own fraction and seed.

    `map_cells(function, cells, context)` runs the independent trainings (learning-rate
    searches, then every run): by default one after the other in this process; flows/compute.py
    gives one that runs them as Prefect tasks on Dask. The rows are the same either way.
    """
    from components.align.stage import WORDS_FILE, run_align
    from components.vision.stage import dataset_features

    started = time.perf_counter()
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    dataset = read_dataset(dataset_dir)  # a bad dataset fails before anything of out_dir is touched
    work_dir = out_dir / "work"
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    if cfg.lr_grid:
        match_cfg = match_cfg.model_copy(update={"lr_grid": cfg.lr_grid})
    if quick:
        cfg = cfg.model_copy(update={"seeds": cfg.seeds[:1], "fractions": sorted({0.5, 1.0} & set(cfg.fractions)) or [1.0],
                                     "bootstrap_samples": 200})
        match_cfg = match_cfg.model_copy(update={"max_steps": cfg.quick_max_steps,
                                                 "eval_every": max(1, cfg.quick_max_steps // 2),
                                                 "lr_grid": match_cfg.lr_grid[len(match_cfg.lr_grid) // 2:][:1]})
    timings: dict[str, float] = {}
    rows: list[dict] = []
    details: dict[tuple[str, float, int], object] = {}

    def add(new_rows: list[dict]) -> None:
        rows.extend(new_rows)
        for row in new_rows:
            if on_row is not None:
                on_row(row)

    full = max(cfg.fractions)

    # 1. visual parts of every ad, once (cached on disk by image content + config)
    t = time.perf_counter()
    features = dataset_features(dataset, parts_cfg, cache_dir)
    timings["features_seconds"] = time.perf_counter() - t

    # 2. the alignment per (variant, fraction, seed), through the align stage
    t = time.perf_counter()
    wants_words = any(s in WORD_SYSTEMS for s in cfg.systems) or bool(cfg.ablations)
    variants = {"ours": {}}
    if "ours_titles_only" in cfg.ablations:
        variants["ours_titles_only"] = {"click_text": False}
    if "ours_in_sample" in cfg.ablations:
        variants["ours_in_sample"] = {"folds": 0}
    alignment_dirs: dict[tuple[str, float, int], tuple[Path, Path]] = {}
    for seed in cfg.seeds if wants_words else []:
        for variant, update in variants.items():
            for fraction in cfg.fractions if variant == "ours" else [full]:
                align_dir = work_dir / "align" / f"{variant}-f{fraction:g}-seed{seed}"
                result = run_align(align_cfg.model_copy(update={"seed": seed, **update}), dataset_dir=dataset_dir,
                                   features=features, out_dir=align_dir, cache_dir=cache_dir, gallery_size=0,
                                   fraction=fraction, query_seed=seed, metrics_split=cfg.eval_split)
                alignment_dirs[(variant, fraction, seed)] = (align_dir, result.model_dir)
                add([{"system": variant, "fraction": fraction, "seed": seed, "subset": "all", "metric": k,
                      "value": float(v)} for k, v in result.metrics.items()
                     if k.startswith(("visual_word_", "alignment_precision"))])
    timings["align_seconds"] = time.perf_counter() - t

    # 3. the same learning-rate search for every trained system (seed 0 of the list, all data);
    #    the winning run is that system's (full, seeds[0]) run. Searches and runs are
    #    independent cells (`map_cells`: in this process, or tasks on Dask through flows/).
    features_path = features.save(work_dir / "features.npz")
    context = BenchmarkContext(
        dataset_dir=str(Path(dataset_dir).resolve()), features_path=str(features_path.resolve()),
        work_dir=str(work_dir.resolve()), eval_split=cfg.eval_split, match_cfg=match_cfg.model_dump(mode="json"),
        full=full, alignments={_alignment_key(*key): [str(p) for p in paths] for key, paths in alignment_dirs.items()})
    run_cells = map_cells or _map_in_process
    t = time.perf_counter()
    trained = [s for s in cfg.systems if s in TRAINED_SYSTEMS]
    if cfg.ablations and "ours" not in trained:
        trained.append("ours")  # ablations of ours train at ours' learning rate
    learning_rates: dict[str, float] = {}
    reuse: dict[tuple[str, float, int], str] = {}
    if match_cfg.lr is not None:
        learning_rates = {system: match_cfg.lr for system in trained}
    else:
        searches = [SearchCell(system, full, cfg.seeds[0]) for system in trained]
        for found in run_cells(search_learning_rate, [asdict(c) for c in searches], asdict(context)):
            learning_rates[found.system] = found.lr
            reuse[(found.system, full, cfg.seeds[0])] = found.scorer_dir
            log.info("learning rate of %s: %g (valid ndcg@10 %s)", found.system, found.lr, found.values)
    timings["lr_search_seconds"] = time.perf_counter() - t

    # 4. every system x fraction x seed (+ ablations at the full data), scored on eval_split;
    #    late_fusion after the text_only it fuses
    t = time.perf_counter()
    order = sorted(cfg.systems, key=lambda s: (s == "late_fusion", SYSTEMS.index(s)))
    if "late_fusion" in order and "text_only" not in order:
        order.insert(0, "text_only")
    runs = [(s, f, seed) for seed in cfg.seeds for f in cfg.fractions for s in order]
    runs += [(a, full, seed) for seed in cfg.seeds for a in cfg.ablations]
    cells = []
    for system, fraction, seed in runs:
        if system in UNTRAINED_SYSTEMS and fraction != full:
            continue  # no training data involved: evaluated once per seed
        base = "ours" if system.startswith("ours") else system
        update = {"seed": seed, "train_fraction": fraction, "lr": learning_rates.get(base, learning_rates.get("ours"))}
        if system == "ours_no_channel":
            update["word_channel"] = False
        if system == "ours_channel_only":
            update.update(words_per_ad=0, word_channel_joint=False)
        cells.append(TrainCell(len(cells), system, fraction, seed, update, reuse.get((system, fraction, seed))))
    done = run_cells(train_cell, [asdict(c) for c in cells if c.system != "late_fusion"], asdict(context))
    text_dirs = {(r.fraction, r.seed): r.scorer_dir for r in done if r.system == "text_only"}
    late = [replace(c, text_scorer=text_dirs[(c.fraction, c.seed)]) for c in cells if c.system == "late_fusion"]
    done += run_cells(train_cell, [asdict(c) for c in late], asdict(context)) if late else []
    for cell in sorted(done, key=lambda r: r.position):
        # Untrained systems use no training data: their numbers stand for every fraction.
        for row_fraction in (cfg.fractions if cell.system in UNTRAINED_SYSTEMS else [cell.fraction]):
            add(_rows(cell.records, system=cell.system, fraction=row_fraction, seed=cell.seed))
            details[(cell.system, row_fraction, cell.seed)] = cell.detail
    timings["train_eval_seconds"] = time.perf_counter() - t

    seconds = time.perf_counter() - started
    timings["total_seconds"] = seconds
    result = BenchmarkResult(out_dir=out_dir, rows=rows, seconds=seconds, timings=timings, details=details)
    gallery = []
    if cfg.gallery_size and ("ours", full, cfg.seeds[0]) in alignment_dirs:
        from components.align.model import read_words_shown
        from components.align.stage import gallery_items, load_visual_words

        align_dir, model_dir = alignment_dirs[("ours", full, cfg.seeds[0])]
        gallery = gallery_items(dataset, cfg.eval_split, load_visual_words(Path(align_dir) / WORDS_FILE), features,
                                cfg.gallery_size, read_words_shown(Path(model_dir)))
    result.paths = write_reports(result, cfg, dataset=dataset, learning_rates=learning_rates, gallery=gallery,
                                 quick=quick)
    shutil.rmtree(work_dir, ignore_errors=True)  # trained weights are not the product here
    return result
