"""The alignment gallery: ad images with their visual words, the part each word came from
drawn as a box, and (for ads with held-out tags) whether each word is correct."""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from components.figures import new_figure, save_figure

log = logging.getLogger(__name__)

MAX_GALLERY_ITEMS = 16
COLOURS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


@dataclass
class GalleryWord:
    word: str
    score: float
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 in image pixels; None = whole image
    correct: bool | None = None  # against held-out tags; None = the ad has none


@dataclass
class GalleryItem:
    image_path: Path | str
    title: str
    words: list[GalleryWord] = field(default_factory=list)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _load_image(image_path: Path | str) -> np.ndarray | None:
    try:
        with Image.open(image_path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        log.warning("gallery: cannot read %s (%s)", image_path, exc)
        return None


def mark(correct: bool | None) -> str:
    return {True: "✓", False: "✗", None: " "}[correct]


def plot_alignment_gallery(items: Sequence[GalleryItem], out_path: Path, *,
                           title: str = "Ad images and their aligned words", max_words: int = 6) -> Path:
    """A grid of ad images (at most 16): title above, each word's source part as a coloured
    box on the image, and below the words with probability, colour and ✓/✗ against the ad's
    held-out tags."""
    from matplotlib.patches import Rectangle  # matplotlib loads only when plotting

    if not items:
        raise ValueError("no items to draw")
    if len(items) > MAX_GALLERY_ITEMS:
        log.info("gallery: drawing the first %d of %d items", MAX_GALLERY_ITEMS, len(items))
        items = list(items)[:MAX_GALLERY_ITEMS]
    ncols = min(4, len(items))
    nrows = math.ceil(len(items) / ncols)
    fig = new_figure(max(3.6 * ncols, 6.5), 4.6 * nrows + 0.8)
    grid = fig.add_gridspec(2 * nrows, ncols, height_ratios=[3.3, 1.3] * nrows)
    for i, item in enumerate(items):
        row, col = divmod(i, ncols)
        ax_image = fig.add_subplot(grid[2 * row, col])
        pixels = _load_image(item.image_path)
        words = list(item.words)[:max_words]
        if pixels is None:
            ax_image.text(0.5, 0.5, "image not readable", ha="center", va="center", fontsize=10, color="gray")
        else:
            ax_image.imshow(pixels)
            for j, word in enumerate(words):
                if word.box is not None:
                    x0, y0, x1, y1 = word.box
                    ax_image.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, linewidth=2,
                                                 edgecolor=COLOURS[j % len(COLOURS)]))
        ax_image.set_xticks([])
        ax_image.set_yticks([])
        wrapped = textwrap.fill(str(item.title) or "(no title)", width=30, max_lines=2, placeholder=" …")
        ax_image.set_title(wrapped, fontsize=10.5, fontweight="bold")
        ax_text = fig.add_subplot(grid[2 * row + 1, col])
        ax_text.axis("off")
        for j, word in enumerate(words):
            where = "image" if word.box is None else "part"
            ax_text.text(0.02, 1.0 - 0.17 * j,
                         f"{mark(word.correct)} {_shorten(word.word, 14):<14} {word.score:4.2f} {where}",
                         ha="left", va="top", fontsize=9.5, family="monospace", transform=ax_text.transAxes,
                         color=COLOURS[j % len(COLOURS)] if word.box is not None else "black")
        if not words:
            ax_text.text(0.5, 1.0, "(no aligned words)", ha="center", va="top", fontsize=10,
                         transform=ax_text.transAxes)
    fig.suptitle(f"{title}\n(probability; box and colour = the part a word came from, black = whole image; "
                 "✓/✗ against held-out tags)", fontsize=12)
    return save_figure(fig, out_path)
