"""The benchmark: every system trained and evaluated on one dataset in the interchange format.

`run_benchmark` extracts visual parts once, trains the label-free alignment per seed (and
its ablations), picks each trained system's learning rate with the same search on the
valid split, trains every system at every training fraction and seed with the same
budget, scores the evaluation split, and writes `benchmark.json` (rows of
`{system, fraction, seed, subset, metric, value}`), `benchmark.md` (the table a person
reads, with the paper's claims checked) and the plots.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from components.data.format import Dataset, read_dataset
from components.evaluate.config import ABLATIONS, BASE_SYSTEMS, BenchmarkConfig

log = logging.getLogger(__name__)

UNTRAINED = ("lexical", "text_zero_shot")
REPORT_METRICS = ("ndcg@10", "recall@10", "mrr@10", "auc")


@dataclass
class BenchmarkResult:
    out_dir: Path
    rows: list[dict]
    seconds: float
    paths: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


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


def run_benchmark(cfg: BenchmarkConfig, *, dataset_dir: Path, out_dir: Path, cache_dir: Path,
                  parts_cfg, align_cfg, match_cfg, quick: bool = False,
                  on_row: Callable[[dict], None] | None = None) -> BenchmarkResult:
    """Train and evaluate every configured system; write the reports under `out_dir`."""
    from components.align.config import AlignConfig
    from components.align.model import AlignmentModel
    from components.align.stage import training_texts
    from components.align.train import train_alignment
    from components.evaluate.metrics import ScoreMatrix
    from components.evaluate.subsets import evaluate_scores
    from components.match.config import MatchConfig
    from components.match.data import match_data
    from components.match.systems import select_learning_rate, train_system
    from components.text.encoder import TextEncoder
    from components.vision.cache import extract_parts_cached

    started = time.perf_counter()
    out_dir, cache_dir = Path(out_dir), Path(cache_dir)
    work_dir = out_dir / "work"
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    align_cfg: AlignConfig = align_cfg
    match_cfg: MatchConfig = match_cfg
    if quick:
        cfg = cfg.model_copy(update={"seeds": cfg.seeds[:1], "fractions": sorted({0.5, 1.0} & set(cfg.fractions)) or [1.0]})
        match_cfg = match_cfg.model_copy(update={"max_steps": cfg.quick_max_steps,
                                                 "eval_every": max(1, cfg.quick_max_steps // 2),
                                                 "lr_grid": match_cfg.lr_grid[len(match_cfg.lr_grid) // 2:][:1]})
        align_cfg = align_cfg.model_copy(update={"epochs": cfg.quick_align_epochs})
    timings: dict[str, float] = {}
    rows: list[dict] = []

    def add(new_rows: list[dict]) -> None:
        rows.extend(new_rows)
        for row in new_rows:
            if on_row is not None:
                on_row(row)

    dataset = read_dataset(dataset_dir)
    splits = {name: dataset.split(name) for name in ("train", "valid", cfg.eval_split)}

    # 1. visual parts of every ad, once (cached on disk by image content + config)
    t = time.perf_counter()
    paths = [dataset.image_file(p) for p in dataset.ads["image_path"].astype(str)]
    features = extract_parts_cached(paths, parts_cfg, cache_dir=cache_dir / "features")
    split_features = {name: features.take(dataset.ad_rows(split)) for name, split in splits.items()}
    timings["features_seconds"] = time.perf_counter() - t

    # 2. label-free alignment per seed (and per ablated loss), then words for every ad
    t = time.perf_counter()
    encoder = TextEncoder(cache_dir=cache_dir / "text")
    texts = training_texts(dataset)
    variants = {"ours": {}}
    if "ours_no_structure" in cfg.ablations:
        variants["ours_no_structure"] = {"structure_loss": False}
    if "ours_no_mil" in cfg.ablations:
        variants["ours_no_mil"] = {"mil_loss": False}
    words: dict[tuple[str, int], dict[str, list]] = {}
    align_models: dict[int, AlignmentModel] = {}
    all_ad_ids = dataset.ads["ad_id"].astype(str).tolist()
    for seed in cfg.seeds:
        for variant, update in variants.items():
            result = train_alignment(align_cfg.model_copy(update={"seed": seed, **update}), texts=texts,
                                     parts=split_features["train"], encoder=encoder,
                                     out_dir=work_dir / "align" / f"{variant}-seed{seed}")
            model = AlignmentModel.load(result.model_dir)
            translated = model.translate(features)
            words[(variant, seed)] = dict(zip(all_ad_ids, translated, strict=True))
            add(_alignment_rows(model, variant, seed, dataset, features, words[(variant, seed)],
                                cfg.eval_split))
            if variant == "ours":
                align_models[seed] = model
        if "ours_random_words" in cfg.ablations:
            model = align_models[seed]
            words[("ours_random_words", seed)] = random_words(words[("ours", seed)], list(model.words),
                                                              list(model.word_counts), seed)
    timings["align_seconds"] = time.perf_counter() - t

    def data_for(variant: str, seed: int):
        ad_words = words.get((variant, seed)) if variant.startswith("ours") else None
        return {name: match_data(split, words=ad_words, features=split_features[name])
                for name, split in splits.items()}

    # 3. the same learning-rate search for every trained system (seed 0 of the list, all data)
    t = time.perf_counter()
    trained = [s for s in cfg.systems if s not in UNTRAINED + ("late_fusion",)]
    if cfg.ablations and "ours" not in trained:
        trained.append("ours")  # ablations of ours train at ours' learning rate
    learning_rates: dict[str, float] = {}
    for system in trained:
        if match_cfg.lr is not None:
            learning_rates[system] = match_cfg.lr
            continue
        data = data_for(system, cfg.seeds[0])
        lr_cfg = match_cfg.model_copy(update={"seed": cfg.seeds[0], "train_fraction": 1.0})
        best, values = select_learning_rate(system, lr_cfg, data["train"], data["valid"],
                                            work_dir / "lr" / system)
        learning_rates[system] = best
        log.info("learning rate of %s: %g (valid ndcg@10 %s)", system, best, values)
    timings["lr_search_seconds"] = time.perf_counter() - t

    # 4. every system x fraction x seed (+ ablations at the full data), scored on eval_split
    t = time.perf_counter()
    runs = [(s, f, seed) for seed in cfg.seeds for f in cfg.fractions for s in cfg.systems]
    runs += [(a, 1.0, seed) for seed in cfg.seeds for a in cfg.ablations]
    for system, fraction, seed in runs:
        if system in UNTRAINED and fraction != max(cfg.fractions):
            continue  # no training data involved: evaluated once per seed
        base = "ours" if system.startswith("ours") else system
        data = data_for(system, seed)
        run_cfg = match_cfg.model_copy(update={"seed": seed, "train_fraction": fraction,
                                               "lr": learning_rates.get(base, learning_rates.get("ours"))})
        run_started = time.perf_counter()
        scorer = train_system(base, run_cfg, data["train"], data["valid"],
                              work_dir / "runs" / f"{system}-f{fraction:g}-seed{seed}")
        test = data[cfg.eval_split]
        scores = scorer.score(test.queries, test.ads)
        matrix = ScoreMatrix(test.queries.query_ids, test.ads.ad_ids, scores)
        records = evaluate_scores(splits[cfg.eval_split], matrix, seed)
        # Untrained systems use no training data: their numbers stand for every fraction.
        for row_fraction in (cfg.fractions if system in UNTRAINED else [fraction]):
            add(_rows(records, system=system, fraction=row_fraction, seed=seed))
        log.info("%s fraction=%g seed=%d: %.1f s", system, fraction, seed, time.perf_counter() - run_started)
    timings["train_eval_seconds"] = time.perf_counter() - t

    seconds = time.perf_counter() - started
    timings["total_seconds"] = seconds
    result = BenchmarkResult(out_dir=out_dir, rows=rows, seconds=seconds, timings=timings)
    result.paths = write_reports(result, cfg, dataset=dataset, learning_rates=learning_rates,
                                 gallery=_gallery_items(dataset, splits[cfg.eval_split],
                                                        words.get(("ours", cfg.seeds[0]), {}), cfg.gallery_size),
                                 quick=quick)
    shutil.rmtree(work_dir, ignore_errors=True)  # trained weights are not the product here
    return result


def _alignment_rows(model, variant: str, seed: int, dataset: Dataset, features, ad_words: dict,
                    split_name: str) -> list[dict]:
    from components.align.stage import alignment_metrics

    metrics = alignment_metrics(model, dataset, features, ad_words, split_name)
    return [{"system": variant, "fraction": 1.0, "seed": seed, "subset": "all", "metric": k, "value": v}
            for k, v in metrics.items()]


def _gallery_items(dataset: Dataset, split: Dataset, ad_words: dict, size: int) -> list:
    ads = split.ads.head(size)
    return [(dataset.image_file(row.image_path), str(row.title), ad_words.get(row.ad_id, []))
            for row in ads.itertuples()]


def summarise(rows: list[dict]) -> pd.DataFrame:
    """Mean and std over seeds per (system, fraction, subset, metric)."""
    frame = pd.DataFrame(rows)
    grouped = frame.groupby(["system", "fraction", "subset", "metric"])["value"]
    return grouped.agg(["mean", "std", "count"]).reset_index()


def check_claims(summary: pd.DataFrame) -> list[dict]:
    """The paper's claims (and this project's targets) as checks on the summary."""
    def value(system: str, subset: str, metric: str, fraction: float = 1.0) -> float | None:
        hit = summary[(summary.system == system) & (summary.subset == subset)
                      & (summary.metric == metric) & np.isclose(summary.fraction, fraction)]
        return None if hit.empty else float(hit["mean"].iloc[0])

    checks = []

    def check(claim: str, left: float | None, right: float | None, margin: float = 0.0, *,
              at_least: bool = True) -> None:
        if left is None or right is None:
            return
        ok = left - right >= margin if at_least else left - right >= -margin
        checks.append({"claim": claim, "ours": round(left, 4), "other": round(right, 4),
                       "delta": round(left - right, 4), "passed": bool(ok)})

    for other in ("implicit_fusion", "late_fusion", "text_only"):
        for metric in ("auc", "ndcg@10"):
            check(f"ours beats {other} on image-only {metric} by >= 0.026",
                  value("ours", "image_only", metric), value(other, "image_only", metric), 0.026)
    check("ours not worse than text_only on title-overlap auc",
          value("ours", "title_overlap", "auc"), value("text_only", "title_overlap", "auc"))
    for other in ("implicit_fusion", "late_fusion"):
        check(f"ours at 50% data >= {other} at 100% (ndcg@10)",
              value("ours", "all", "ndcg@10", 0.5), value(other, "all", "ndcg@10", 1.0))
    check("implicit_fusion not below late_fusion (ndcg@10)",
          value("implicit_fusion", "all", "ndcg@10"), value("late_fusion", "all", "ndcg@10"))
    for ablation in ABLATIONS:
        check(f"ablation {ablation} costs quality (ours - ablation, ndcg@10)",
              value("ours", "all", "ndcg@10"), value(ablation, "all", "ndcg@10"), 1e-9)
    return checks


def write_reports(result: BenchmarkResult, cfg: BenchmarkConfig, *, dataset: Dataset,
                  learning_rates: dict[str, float], gallery: list, quick: bool) -> dict[str, Path]:
    from components.evaluate.plots import (
        plot_alignment_gallery,
        plot_data_efficiency,
        plot_subset_bars,
    )

    out_dir = result.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(result.rows)
    checks = check_claims(summary)
    paths = {"json": out_dir / "benchmark.json", "markdown": out_dir / "benchmark.md"}
    payload = {
        "dataset": str(dataset.root), "config": cfg.model_dump(), "quick": quick,
        "learning_rates": learning_rates, "timings": {k: round(v, 1) for k, v in result.timings.items()},
        "claims": checks, "rows": result.rows,
    }
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    ranking_rows = [r for r in result.rows if r["metric"] in REPORT_METRICS]
    if ranking_rows:
        paths["data_efficiency"] = plot_data_efficiency(ranking_rows, out_dir / "data_efficiency.png")
        paths["subsets"] = plot_subset_bars(ranking_rows, out_dir / "subsets_auc.png", metric="auc")
        paths["subsets_ndcg"] = plot_subset_bars(ranking_rows, out_dir / "subsets_ndcg.png", metric="ndcg@10")
    if gallery:
        paths["gallery"] = plot_alignment_gallery(gallery, out_dir / "alignment_gallery.png")
    paths["markdown"].write_text(render_markdown(summary, checks, payload))
    return paths


def _cell(summary: pd.DataFrame, system: str, fraction: float, subset: str, metric: str) -> str:
    hit = summary[(summary.system == system) & np.isclose(summary.fraction, fraction)
                  & (summary.subset == subset) & (summary.metric == metric)]
    if hit.empty:
        return "–"
    mean, std = float(hit["mean"].iloc[0]), hit["std"].iloc[0]
    return f"{mean:.3f}" + (f" ± {float(std):.3f}" if pd.notna(std) else "")


def render_markdown(summary: pd.DataFrame, checks: list[dict], payload: dict) -> str:
    columns = [("all", "ndcg@10"), ("all", "recall@10"), ("all", "mrr@10"), ("all", "auc"),
               ("image_only", "ndcg@10"), ("image_only", "auc"), ("title_overlap", "ndcg@10"),
               ("title_overlap", "auc")]
    lines = [f"# Benchmark on `{payload['dataset']}`", "",
             f"Mean ± std over seeds {payload['config']['seeds']}, evaluation split "
             f"`{payload['config']['eval_split']}`{' (quick configuration)' if payload['quick'] else ''}. "
             f"Total time {payload['timings'].get('total_seconds', 0):.0f} s.", "",
             "| system | fraction | " + " | ".join(f"{m} {s}" for s, m in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    order = {name: i for i, name in enumerate(BASE_SYSTEMS + ABLATIONS)}
    keys = summary[["system", "fraction"]].drop_duplicates()
    keys = keys[summary.groupby(["system", "fraction"])["metric"].transform("size").loc[keys.index] > 0]
    for system, fraction in sorted(keys.itertuples(index=False), key=lambda k: (order.get(k[0], 99), k[1])):
        cells = [_cell(summary, system, fraction, s, m) for s, m in columns]
        if all(c == "–" for c in cells):
            continue
        lines.append(f"| {system} | {fraction:g} | " + " | ".join(cells) + " |")
    align = summary[summary.metric.isin(["alignment_precision@1", "visual_word_precision"])]
    if not align.empty:
        lines += ["", "## Alignment (label-free)", "", "| variant | metric | value |", "|---|---|---|"]
        for row in align.itertuples():
            std = f" ± {row.std:.3f}" if pd.notna(row.std) else ""
            lines.append(f"| {row.system} | {row.metric} | {row.mean:.3f}{std} |")
    if checks:
        lines += ["", "## Claims", "", "| claim | ours | other | delta | passed |", "|---|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['claim']} | {c['ours']:.4f} | {c['other']:.4f} | {c['delta']:+.4f} | "
                         f"{'yes' if c['passed'] else 'NO'} |")
    lines += ["", "## Settings", "", f"- learning rates (valid ndcg@10 search): {payload['learning_rates']}",
              f"- timings (s): {payload['timings']}", "",
              "Plots: `data_efficiency.png`, `subsets_auc.png`, `subsets_ndcg.png`, `alignment_gallery.png`.", ""]
    return "\n".join(lines)
