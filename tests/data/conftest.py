"""Tiny hand-made datasets for data tests: every value known, so a broken copy breaks one rule."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from components.data import raster
from components.data.format import IMAGES_DIR, Dataset, write_dataset

# Two ads and two queries per split; each query has one positive qrel, and one explicit
# negative (relevance 0) in train. Images are 40x40 PNGs (the default minimum side is 32).
TINY_ADS = [
    # ad_id, title, split, category
    ("a1", "red apple", "train", "fruit"),
    ("a2", "", "train", "fruit"),
    ("a3", "blue car", "valid", "vehicle"),
    ("a4", "green tree", "valid", "plant"),
    ("a5", "yellow sun", "test", "sky"),
    ("a6", "white cloud", "test", "sky"),
]
TINY_QUERIES = [
    ("q1", "apple", "train"),
    ("q2", "fruit", "train"),
    ("q3", "car", "valid"),
    ("q4", "sun", "test"),
]
TINY_QRELS = [
    ("q1", "a1", 1, "train"),
    ("q1", "a2", 0, "train"),
    ("q2", "a2", 1, "train"),
    ("q3", "a3", 1, "valid"),
    ("q4", "a5", 1, "test"),
]
TINY_IMAGE_SIDE = 40


def write_tiny_dataset(root: Path) -> Path:
    """Write the tiny valid dataset to `root` (tables through the format module, PNG images)."""
    root = Path(root)
    (root / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    for n, (ad_id, *_rest) in enumerate(TINY_ADS):
        Image.new("RGB", (TINY_IMAGE_SIDE, TINY_IMAGE_SIDE), (40 * n, 255 - 40 * n, 128)).save(root / IMAGES_DIR / f"{ad_id}.png")
    ads = pd.DataFrame(
        [{"ad_id": a, "title": t, "image_path": f"{IMAGES_DIR}/{a}.png", "split": s, "category": c} for a, t, s, c in TINY_ADS]
    )
    queries = pd.DataFrame(TINY_QUERIES, columns=["query_id", "text", "split"])
    qrels = pd.DataFrame(TINY_QRELS, columns=["query_id", "ad_id", "relevance", "split"])
    write_dataset(Dataset(ads=ads, queries=queries, qrels=qrels), root)
    return root


@pytest.fixture
def tiny_dataset_dir(tmp_path) -> Callable[..., Path]:
    """Factory: `tiny_dataset_dir()` writes a fresh valid tiny dataset and returns its directory."""
    counter = iter(range(1_000_000))

    def make(root: Path | None = None) -> Path:
        return write_tiny_dataset(root or tmp_path / f"tiny_dataset_{next(counter)}")

    return make


@pytest.fixture
def counting_renderer(monkeypatch) -> list[Path]:
    """Wrap the real renderer and record every SVG it is asked to render."""
    calls: list[Path] = []
    real = raster.render_svg

    def counted(svg_path, image_size, timeout_s):
        calls.append(Path(svg_path))
        return real(svg_path, image_size, timeout_s)

    monkeypatch.setattr(raster, "render_svg", counted)
    return calls
