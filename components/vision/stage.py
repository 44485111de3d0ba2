"""The `features` stage: visual parts of every ad of a dataset, in ads.parquet order.

`run_features` does it in one process. For a cluster the same work is cut into shards of
images (`plan_feature_shards`), each extracted on its own (`run_features_shard`, any order,
any machine sharing the cache directory) and merged in shard order (`merge_feature_shards`):
the result is the same file.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from components.data.format import Dataset, read_dataset
from components.outputs import atomic_file
from components.vision.cache import extract_parts_cached
from components.vision.config import PartsConfig
from components.vision.parts import PartsFeatures

log = logging.getLogger(__name__)

FEATURES_FILE = "parts.npz"


@dataclass
class FeaturesResult:
    features_path: Path
    metrics: dict[str, float] = field(default_factory=dict)


def image_files(dataset: Dataset) -> list[Path]:
    """The image file of every ad of `dataset`, in ads.parquet order."""
    return [dataset.image_file(p) for p in dataset.ads["image_path"].astype(str)]


def dataset_features(dataset: Dataset, cfg: PartsConfig, cache_dir: Path, *, progress: bool = True) -> PartsFeatures:
    """The parts of every ad of `dataset` in ads.parquet order, through the content-addressed
    cache under `cache_dir/features`: the one way any caller gets a dataset's features."""
    return extract_parts_cached(image_files(dataset), cfg, cache_dir=Path(cache_dir) / "features", progress=progress)


def run_features(cfg: PartsConfig, *, dataset_dir: Path, out_dir: Path, cache_dir: Path) -> FeaturesResult:
    """Extract (or load from the cache) the parts of every ad image; rows follow ads.parquet."""
    started = time.perf_counter()
    features = dataset_features(read_dataset(dataset_dir), cfg, cache_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = features.save(out_dir / FEATURES_FILE)
    seconds = time.perf_counter() - started
    return FeaturesResult(path, {"num_images": len(features), "features_seconds": round(seconds, 2),
                                 "parts_per_image": float(features.mask.sum(1).mean()) if len(features) else 0.0})


def plan_feature_shards(dataset_dir: Path, shard_size: int) -> list[list[str]]:
    """The dataset's image files in ads.parquet order, cut into consecutive shards.

    A shard size that is a multiple of the extractor's batch (32) keeps the batches of the
    sequential run, so sharded and sequential features agree bit for bit.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    paths = [str(p) for p in image_files(read_dataset(dataset_dir))]
    return [paths[start:start + shard_size] for start in range(0, len(paths), shard_size)]


def run_features_shard(cfg: PartsConfig, *, image_paths: list[str], out_path: Path, cache_dir: Path,
                       num_threads: int | None = None) -> Path:
    """Parts of one shard of images (through the shared content cache), saved to `out_path`.

    `num_threads` caps torch/ONNX intra-op threads: several workers on one machine must not
    each take every core.
    """
    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)
    features = extract_parts_cached(image_paths, cfg, cache_dir=Path(cache_dir) / "features", progress=False)
    out_path = Path(out_path)
    with atomic_file(out_path, suffix=".npz") as tmp:  # a retried or duplicated shard task never leaves half a file
        features.save(tmp)
    return out_path


def merge_feature_shards(shard_paths: list[Path], *, out_dir: Path, seconds: float | None = None) -> FeaturesResult:
    """Concatenate shard files in the given (plan) order into `out_dir/parts.npz`; the shard
    files are removed once the merged file is in place."""
    if not shard_paths:
        raise ValueError("no feature shards to merge")
    features = PartsFeatures.concat([PartsFeatures.load(Path(p)) for p in shard_paths])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = features.save(out_dir / FEATURES_FILE)
    for shard_dir in {Path(p).parent for p in shard_paths}:
        if shard_dir != out_dir:
            shutil.rmtree(shard_dir, ignore_errors=True)
    metrics = {"num_images": len(features), "num_shards": len(shard_paths),
               "parts_per_image": float(features.mask.sum(1).mean()) if len(features) else 0.0}
    if seconds is not None:
        metrics["features_seconds"] = round(seconds, 2)
    return FeaturesResult(path, metrics)


def load_features(features_path: Path) -> PartsFeatures:
    return PartsFeatures.load(features_path)
