"""The plots a person reads (PNG, logged to MLflow and written under reports/).

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend switch), so they render headless and from worker threads.
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from components.evaluate.subsets import SUBSETS

logger = logging.getLogger(__name__)

METRIC_ORDER: tuple[str, ...] = ("ndcg@10", "recall@10", "mrr@10", "auc")
SUBSET_LABELS = {"all": "all queries / pairs", "image_only": "image-only", "title_overlap": "title-overlap"}
DPI = 120
MAX_GALLERY_ITEMS = 16


def _frame(rows: Iterable[Mapping] | pd.DataFrame, required: Sequence[str]) -> pd.DataFrame:
    frame = rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"rows lack column(s) {missing}; expected records with {list(required)}")
    frame["value"] = frame["value"].astype(float)
    return frame


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, out_path: Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", dpi=DPI, facecolor="white")
    logger.info("wrote %s", out_path)
    return out_path


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


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _load_image(image_path: Path | str) -> np.ndarray | None:
    try:
        with Image.open(image_path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        logger.warning("gallery: cannot read %s (%s)", image_path, exc)
        return None


def plot_alignment_gallery(items: Sequence[tuple[Path | str, str, Sequence[tuple[str, float]]]],
                           out_path: Path, *, title: str = "Ad images and their aligned words",
                           max_words: int = 6) -> Path:
    """A grid of ad images, each with its title above and its aligned words (with scores)
    below. `items`: (image_path, title, [(word, score), ...]); at most 16 are drawn."""
    if not items:
        raise ValueError("no items to draw")
    if len(items) > MAX_GALLERY_ITEMS:
        logger.info("gallery: drawing the first %d of %d items", MAX_GALLERY_ITEMS, len(items))
        items = list(items)[:MAX_GALLERY_ITEMS]
    ncols = min(4, len(items))
    nrows = math.ceil(len(items) / ncols)
    fig = _new_figure(max(3.6 * ncols, 6.5), 4.5 * nrows + 0.7)
    # Each ad gets an image cell and a text cell below it.
    grid = fig.add_gridspec(2 * nrows, ncols, height_ratios=[3.3, 1.2] * nrows)
    for i, (image_path, ad_title, words) in enumerate(items):
        row, col = divmod(i, ncols)
        ax_image = fig.add_subplot(grid[2 * row, col])
        pixels = _load_image(image_path)
        if pixels is None:
            ax_image.text(0.5, 0.5, "image not readable", ha="center", va="center", fontsize=10, color="gray")
        else:
            ax_image.imshow(pixels)
        ax_image.set_xticks([])
        ax_image.set_yticks([])
        wrapped = textwrap.fill(str(ad_title) or "(no title)", width=30, max_lines=2, placeholder=" …")
        ax_image.set_title(wrapped, fontsize=10.5, fontweight="bold")
        ax_text = fig.add_subplot(grid[2 * row + 1, col])
        ax_text.axis("off")
        lines = [f"{_shorten(str(word), 16):<16} {float(score):5.2f}" for word, score in list(words)[:max_words]]
        ax_text.text(0.5, 1.0, "\n".join(lines) if lines else "(no aligned words)", ha="center", va="top",
                     fontsize=10, family="monospace", transform=ax_text.transAxes)
    fig.suptitle(f"{title}\n(word and alignment score below each image)", fontsize=13)
    return _save(fig, out_path)
