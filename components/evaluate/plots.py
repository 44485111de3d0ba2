"""The plots a person reads (PNG, logged to MLflow and written under reports/).

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend switch), so they render headless and from worker threads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from components.evaluate.subsets import SUBSETS
from components.figures import new_figure as _new_figure
from components.figures import save_figure as _save

logger = logging.getLogger(__name__)

METRIC_ORDER: tuple[str, ...] = ("ndcg@10", "recall@10", "mrr@10", "auc")
SUBSET_LABELS = {"all": "all queries / pairs", "image_only": "image-only", "title_overlap": "title-overlap"}


def _frame(rows: Iterable[Mapping] | pd.DataFrame, required: Sequence[str]) -> pd.DataFrame:
    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"rows lack column(s) {missing}; expected records with {list(required)}")
    frame["value"] = frame["value"].astype(float)
    return frame


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    values = list(dict.fromkeys(values))
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def plot_data_efficiency(rows: Iterable[Mapping] | pd.DataFrame, out_path: Path, *,
                         subset: str = "all", metrics: Sequence[str] | None = None) -> Path:
    """Metric vs training fraction, one line per system, mean ± std over seeds; one panel
    per metric (default: every metric in `rows` for `subset`).

    `rows`: records {system, fraction, seed, subset, metric, value}.
    """
    frame = _frame(rows, ("system", "fraction", "seed", "subset", "metric", "value"))
    frame = frame[frame["subset"] == subset]
    if frame.empty:
        raise ValueError(f"no rows for subset {subset!r}")
    if metrics is None:
        # Ranking metrics only: alignment metrics exist for a few variants at one fraction.
        metrics = [m for m in METRIC_ORDER if m in set(frame["metric"])] or _ordered(frame["metric"], METRIC_ORDER)
    systems = sorted(frame["system"].unique())
    colours = {system: f"C{i % 10}" for i, system in enumerate(systems)}
    fractions = np.sort(frame["fraction"].astype(float).unique())
    log_x = len(fractions) > 1 and fractions.min() > 0 and fractions.max() / fractions.min() >= 10
    num_seeds = int(frame.groupby(["system", "fraction", "metric"])["seed"].nunique().max())

    ncols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    fig = _new_figure(6.0 * ncols, 4.3 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, metric in zip(axes, metrics, strict=False):
        for system in systems:
            part = frame[(frame["metric"] == metric) & (frame["system"] == system)]
            if part.empty:
                continue
            stats = part.groupby("fraction")["value"].agg(["mean", "std"]).sort_index()
            ax.errorbar(stats.index.astype(float), stats["mean"], yerr=stats["std"].fillna(0.0),
                        marker="o", capsize=4, linewidth=1.8, label=system, color=colours[system])
        ax.set_title(f"{metric} vs training data", fontsize=12)
        ax.set_xlabel("fraction of training data used", fontsize=11)
        ax.set_ylabel(f"{metric} (mean ± std)", fontsize=11)
        if log_x:
            ax.set_xscale("log")
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.grid(True, alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    # One legend for all panels, outside the axes: inside, it hid the lines it names.
    handles = {label: handle for ax in axes[:len(metrics)]
               for handle, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(list(handles.values()), list(handles), title="system", loc="outside right center", fontsize=9)
    fig.suptitle(f"Data efficiency ({SUBSET_LABELS.get(subset, subset)}; "
                 f"mean ± std over {num_seeds} seed{'s' if num_seeds != 1 else ''})", fontsize=13)
    return _save(fig, out_path)


def plot_subset_bars(rows: Iterable[Mapping] | pd.DataFrame, out_path: Path, metric: str = "auc") -> Path:
    """Grouped bars: per system, `metric` on the subsets all / image_only / title_overlap,
    mean with std error bars over the rows' seeds.

    `rows`: records {system, subset, metric, value} (plus seed); when they carry a
    `fraction`, the largest fraction (the full training data) is plotted.
    """
    frame = _frame(rows, ("system", "subset", "metric", "value"))
    frame = frame[frame["metric"] == metric]
    if frame.empty:
        raise ValueError(f"no rows for metric {metric!r}")
    note = ""
    if "fraction" in frame.columns and frame["fraction"].nunique() > 1:
        top = frame["fraction"].max()
        frame = frame[frame["fraction"] == top]
        note = f", training fraction {top:g}"
    seeds = int(frame.groupby(["system", "subset"]).size().max())
    stats = frame.groupby(["system", "subset"])["value"].agg(["mean", "std"])
    systems = sorted(frame["system"].unique())
    subsets = _ordered(frame["subset"], SUBSETS)

    fig = _new_figure(max(6.5, 1.9 * len(systems) + 2.5), 4.8)
    ax = fig.add_subplot()
    width = 0.8 / len(subsets)
    x = np.arange(len(systems))
    for i, subset in enumerate(subsets):
        means = [stats["mean"].get((s, subset), np.nan) for s in systems]
        stds = [stats["std"].get((s, subset), np.nan) for s in systems]
        bars = ax.bar(x + (i - (len(subsets) - 1) / 2) * width, means, width,
                      yerr=np.nan_to_num(stds), capsize=4, label=SUBSET_LABELS.get(subset, subset))
        ax.bar_label(bars, labels=["" if np.isnan(m) else f"{m:.2f}" for m in means], padding=2, fontsize=8)
    ax.set_xticks(x, systems, fontsize=10)
    ax.set_xlabel("system", fontsize=11)
    ax.set_ylabel(f"{metric} (mean ± std)", fontsize=11)
    upper = np.nanmax(stats["mean"] + stats["std"].fillna(0.0))
    ax.set_ylim(0, max(1.0, upper * 1.12) if metric == "auc" else upper * 1.18 + 1e-9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(title="subset", fontsize=9, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(f"{metric} by subset (mean ± std over {seeds} seed{'s' if seeds != 1 else ''}{note})",
                 fontsize=12)
    return _save(fig, out_path)
