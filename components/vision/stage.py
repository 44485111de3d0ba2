"""The `features` stage: visual parts of every ad of a dataset, in ads.parquet order."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from components.data.format import read_dataset
from components.vision.cache import extract_parts_cached
from components.vision.config import PartsConfig
from components.vision.parts import PartsFeatures

log = logging.getLogger(__name__)

FEATURES_FILE = "parts.npz"


@dataclass
class FeaturesResult:
    features_path: Path
    metrics: dict[str, float] = field(default_factory=dict)


def run_features(cfg: PartsConfig, *, dataset_dir: Path, out_dir: Path, cache_dir: Path) -> FeaturesResult:
    """Extract (or load from the cache) the parts of every ad image; rows follow ads.parquet."""
    started = time.perf_counter()
    dataset = read_dataset(dataset_dir)
    paths = [dataset.image_file(p) for p in dataset.ads["image_path"].astype(str)]
    features = extract_parts_cached(paths, cfg, cache_dir=Path(cache_dir) / "features")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = features.save(out_dir / FEATURES_FILE)
    seconds = time.perf_counter() - started
    return FeaturesResult(path, {"num_images": len(features), "features_seconds": round(seconds, 2),
                                 "parts_per_image": float(features.mask.sum(1).mean()) if len(features) else 0.0})


def load_features(features_path: Path) -> PartsFeatures:
    return PartsFeatures.load(features_path)
