"""Figure plumbing shared by every plot: matplotlib's object API on the Agg canvas (no
pyplot, no global backend switch), so figures render headless and from worker threads."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


log = logging.getLogger(__name__)

DPI = 120


def new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import (
        FigureCanvasAgg,  # matplotlib: ~0.4 s, only when plotting
    )
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out_path: Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", dpi=DPI, facecolor="white")
    log.info("wrote %s", out_path)
    return out_path
