"""The `build_data` stage: build a dataset from one source into the interchange format.

Each source module returns the tables (images already written under the output's
`images/`); this module writes them atomically, with a README.txt of counts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from components.data.coco import build_coco
from components.data.config import DataConfig
from components.data.format import README_FILE, Dataset, write_dataset
from components.data.openclipart import build_openclipart
from components.data.synthetic import build_synthetic
from components.outputs import atomic_dir

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    out_dir: Path
    counts: dict[str, dict[str, int]]
    stats: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0


def build_dataset(cfg: DataConfig, out_dir: Path | None = None) -> BuildResult:
    """Build `cfg.source` into `out_dir` (default `cfg.out_dir`).

    The dataset is written to a sibling scratch directory first and renamed into place only
    when complete (`components.outputs.atomic_dir`), so a failed build never leaves a
    half-written dataset behind.
    """
    out_dir = Path(out_dir or cfg.out_dir)
    started = time.perf_counter()
    with atomic_dir(out_dir) as tmp_dir:
        dataset, stats = _build_source(cfg, tmp_dir)
        write_dataset(dataset, tmp_dir)
        counts = Dataset(dataset.ads, dataset.queries, dataset.qrels).counts()
        seconds = time.perf_counter() - started
        write_readme(tmp_dir, cfg, counts, stats)
    log.info("built %s dataset in %s (%.1f s)", cfg.source, out_dir, seconds)
    return BuildResult(out_dir=out_dir, counts=counts, stats=stats, seconds=seconds)


def _build_source(cfg: DataConfig, out_dir: Path) -> tuple[Dataset, dict]:
    if cfg.source == "openclipart":
        return build_openclipart(cfg, out_dir)
    if cfg.source == "synthetic":
        return build_synthetic(cfg, out_dir)
    if cfg.source == "coco":
        return build_coco(cfg, out_dir)
    raise ValueError(f"unknown data source {cfg.source!r}")


# Build statistics that describe this machine's run rather than the data (timings, cache
# state), and params that only say where or how fast: kept out of README.txt so that the
# same data always has the same content hash (DVC's, and the retraining flow's cache keys).
_RUN_STATS = ("raster_cache_hits", "raster_rendered")
_RUN_PARAMS = {"out_dir", "path", "cache_dir", "workers"}


def write_readme(out_dir: Path, cfg: DataConfig, counts: dict, stats: dict) -> Path:
    """A human-readable summary next to the tables: source, parameters, counts per split.
    Deterministic: the build time is logged, not written."""
    lines = [
        f"alignsearch dataset — source: {cfg.source}",
        "",
        "Interchange format: ads.parquet, queries.parquet, qrels.parquet, images/ (see the project README).",
        "",
        f"{'table':<16}{'train':>8}{'valid':>8}{'test':>8}{'total':>8}",
    ]
    for table, per_split in counts.items():
        lines.append(
            f"{table:<16}" + "".join(f"{per_split.get(s, 0):>8}" for s in ("train", "valid", "test", "total"))
        )
    lines += ["", "Build statistics:"]
    for key, value in stats.items():
        if not key.startswith("seconds") and key not in _RUN_STATS:
            lines.append(f"  {key}: {value}")
    params = cfg.model_dump(mode="json", exclude=({"synthetic", "coco"} - {cfg.source}) | _RUN_PARAMS)
    lines += ["", "Built with parameters:", json.dumps(params, indent=2, sort_keys=True), ""]
    path = out_dir / README_FILE
    path.write_text("\n".join(lines))
    return path
