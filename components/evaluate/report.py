"""What the benchmark writes: the summary over seeds, the paper's claims checked on it,
`benchmark.json` (rows of `{system, fraction, seed, subset, metric, value}`), `benchmark.md`
(the table a person reads) and the plots. `components/evaluate/benchmark.py` runs the cells.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from components.align.gallery import plot_alignment_gallery
from components.data.format import Dataset
from components.evaluate.config import BenchmarkConfig
from components.evaluate.plots import plot_data_efficiency, plot_subset_bars
from components.evaluate.significance import paired_test
from components.systems import ABLATIONS, SYSTEMS

REPORT_METRICS = ("ndcg@10", "recall@10", "mrr@10", "auc")


@dataclass
class BenchmarkResult:
    out_dir: Path
    rows: list[dict]
    seconds: float
    paths: dict[str, Path] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # (system, fraction, seed) -> RunDetail on the eval split


def summarise(rows: list[dict]) -> pd.DataFrame:
    """Mean and std over seeds per (system, fraction, subset, metric)."""
    frame = pd.DataFrame(rows)
    grouped = frame.groupby(["system", "fraction", "subset", "metric"])["value"]
    return grouped.agg(["mean", "std", "count"]).reset_index()


def check_claims(summary: pd.DataFrame, details: dict | None = None, cfg: BenchmarkConfig | None = None) -> list[dict]:
    """The paper's claims (and this project's targets) as checks on the summary.

    A "beats by >= margin" or "at least" claim holds when the mean over seeds meets the margin
    AND the paired bootstrap over test queries (seeds pooled, `significance.paired_test`)
    gives a one-sided p < `claim_alpha`. A "not worse" claim holds when the 95% interval
    of the delta stays above -`non_inferiority_margin`. Each check carries delta, interval, p.
    """
    cfg = cfg or BenchmarkConfig()
    details = details or {}

    def value(system: str, subset: str, metric: str, fraction: float = 1.0) -> float | None:
        hit = summary[(summary.system == system) & (summary.subset == subset)
                      & (summary.metric == metric) & np.isclose(summary.fraction, fraction)]
        return None if hit.empty else float(hit["mean"].iloc[0])

    def test(left: str, right: str, subset: str, metric: str, left_fraction: float, right_fraction: float) -> dict:
        seeds = sorted({k[2] for k in details if k[0] == left and np.isclose(k[1], left_fraction)}
                       & {k[2] for k in details if k[0] == right and np.isclose(k[1], right_fraction)})
        if not seeds:
            return {}
        return paired_test([details[(left, left_fraction, s)] for s in seeds],
                           [details[(right, right_fraction, s)] for s in seeds], subset, metric,
                           samples=cfg.bootstrap_samples, seed=0)

    checks = []

    def check(claim: str, left: str, right: str, subset: str, metric: str, margin: float = 0.0, *,
              kind: str = "beats", left_fraction: float = 1.0, right_fraction: float = 1.0) -> None:
        lv, rv = value(left, subset, metric, left_fraction), value(right, subset, metric, right_fraction)
        if lv is None or rv is None:
            return
        stats = test(left, right, subset, metric, left_fraction, right_fraction)
        delta = lv - rv
        if kind == "not_worse":
            ok = bool(stats) and stats["low"] >= -cfg.non_inferiority_margin
        else:
            ok = delta >= margin and bool(stats) and stats["p"] < cfg.claim_alpha
        checks.append({"claim": claim, "ours": round(lv, 4), "other": round(rv, 4), "delta": round(delta, 4),
                       "low": round(stats.get("low", float("nan")), 4), "high": round(stats.get("high", float("nan")), 4),
                       "p": round(stats.get("p", float("nan")), 4), "passed": bool(ok)})

    for other in ("implicit_fusion", "late_fusion", "text_only"):
        for metric in ("ndcg@10", "auc"):
            check(f"ours beats {other} on image-only {metric} by >= 0.026", "ours", other, "image_only",
                  metric, 0.026)
    for metric in ("ndcg@10", "auc"):
        check(f"ours not worse than text_only on title-overlap {metric}", "ours", "text_only", "title_overlap",
              metric, kind="not_worse")
    for other in ("implicit_fusion", "late_fusion"):
        check(f"ours at 50% data >= {other} at 100% (ndcg@10)", "ours", other, "all", "ndcg@10",
              left_fraction=0.5, right_fraction=1.0)
    check("implicit_fusion_words beats implicit_fusion (recall@10)", "implicit_fusion_words", "implicit_fusion",
          "all", "recall@10")
    check("implicit_fusion_words beats implicit_fusion (ndcg@10)", "implicit_fusion_words", "implicit_fusion",
          "all", "ndcg@10")
    check("implicit_fusion not below late_fusion (ndcg@10)", "implicit_fusion", "late_fusion", "all", "ndcg@10",
          kind="not_worse")
    for ablation in ABLATIONS:
        check(f"ablation {ablation} costs quality (ours - ablation, ndcg@10)", "ours", ablation, "all", "ndcg@10")
    return checks


def write_reports(result: BenchmarkResult, cfg: BenchmarkConfig, *, dataset: Dataset,
                  learning_rates: dict[str, float], gallery: list, quick: bool) -> dict[str, Path]:
    out_dir = result.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(result.rows)
    checks = check_claims(summary, result.details, cfg)
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
               ("image_only", "ndcg@10"), ("image_only", "recall@10"), ("image_only", "auc"),
               ("title_overlap", "ndcg@10"), ("title_overlap", "auc"), ("valid", "ndcg@10")]
    lines = [f"# Benchmark on `{payload['dataset']}`", "",
             f"Mean ± std over seeds {payload['config']['seeds']}, evaluation split "
             f"`{payload['config']['eval_split']}`{' (quick configuration)' if payload['quick'] else ''}. "
             f"Total time {payload['timings'].get('total_seconds', 0):.0f} s.", "",
             "| system | fraction | " + " | ".join(f"{m} {s}" for s, m in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    order = {name: i for i, name in enumerate(SYSTEMS + ABLATIONS)}
    keys = summary[["system", "fraction"]].drop_duplicates()
    keys = keys[summary.groupby(["system", "fraction"])["metric"].transform("size").loc[keys.index] > 0]
    for system, fraction in sorted(keys.itertuples(index=False), key=lambda k: (order.get(k[0], 99), k[1])):
        cells = [_cell(summary, system, fraction, s, m) for s, m in columns]
        if all(c == "–" for c in cells):
            continue
        lines.append(f"| {system} | {fraction:g} | " + " | ".join(cells) + " |")
    word_metrics = ["visual_word_precision", "visual_word_precision_not_in_title", "visual_word_constant_precision",
                    "visual_word_lift", "visual_word_ceiling", "visual_word_shown_precision", "visual_word_shown_constant_precision",
                    "visual_word_shown_lift", "visual_word_shown_ceiling", "visual_word_coverage",
                    "visual_word_mean_words", "alignment_precision@1"]
    align = summary[summary.metric.isin(word_metrics)]
    if not align.empty:
        present = [m for m in word_metrics if m in set(align.metric)]
        lines += ["", "## Visual words (held-out tags of the evaluation split's ads)", "",
                  "| variant | fraction | " + " | ".join(m.removeprefix("visual_word_") for m in present) + " |",
                  "|---|---|" + "---|" * len(present)]
        for (system, fraction), group in align.groupby(["system", "fraction"], sort=False):
            cells = []
            for m in present:
                hit = group[group.metric == m]
                cells.append("–" if hit.empty else f"{hit['mean'].iloc[0]:.3f}"
                             + (f" ± {hit['std'].iloc[0]:.3f}" if pd.notna(hit['std'].iloc[0]) else ""))
            lines.append(f"| {system} | {fraction:g} | " + " | ".join(cells) + " |")
        shown = summary[summary.metric == "visual_word_words_shown"]["mean"]
        if not shown.empty:
            lines += ["", f"precision, ceiling: over each ad's whole list (mean_words); shown_*: over its first "
                      f"{shown.iloc[0]:g} words (align.words_shown), what the gallery and `alignsearch align show` show. "
                      "ceiling: what an oracle choosing from the vocabulary reaches with as many words."]
    if checks:
        lines += ["", "## Claims", "",
                  "Paired bootstrap over test queries, seeds pooled; p one-sided (left > right). "
                  "'beats'/'at least' claims need the margin on the mean and p < "
                  f"{payload['config']['claim_alpha']}; 'not worse' needs the interval above "
                  f"-{payload['config']['non_inferiority_margin']}.", "",
                  "| claim | left | right | delta | 95% interval | p | passed |", "|---|---|---|---|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['claim']} | {c['ours']:.4f} | {c['other']:.4f} | {c['delta']:+.4f} | "
                         f"[{c['low']:+.4f}, {c['high']:+.4f}] | {c['p']:.4f} | {'yes' if c['passed'] else 'NO'} |")
    lines += ["", "## Settings", "", f"- learning rates (valid ndcg@10 search): {payload['learning_rates']}",
              f"- timings (s): {payload['timings']}", "",
              "Plots: `data_efficiency.png`, `subsets_auc.png`, `subsets_ndcg.png`, `alignment_gallery.png`.", ""]
    return "\n".join(lines)
