"""Feature extraction, sequential vs a 2-worker Dask LocalCluster (prefect-dask), fresh caches.

    .venv/bin/python infra/bench_dask_features.py 600

Builds N synthetic ads at 224 px under /tmp/alignsearch-dask-bench, runs
`flows.compute.extract_features` with `compute.workers` 0 and 2 (1 thread each, shards of
64) on params.yaml's extractor, and prints the wall seconds of each (cluster start included).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path


def main(num_ads: int, root: Path = Path("/tmp/alignsearch-dask-bench")) -> dict:
    from prefect.testing.utilities import prefect_test_harness

    from components.data.build import build_dataset
    from components.data.config import DataConfig, SyntheticConfig
    from components.vision.parts import PartsConfig
    from flows.compute import extract_features
    from flows.runtime import setup_runtime

    setup_runtime()
    shutil.rmtree(root, ignore_errors=True)
    dataset = root / "dataset"
    build_dataset(DataConfig(source="synthetic", out_dir=dataset, seed=0, max_ads=None,
                             synthetic=SyntheticConfig(num_ads=num_ads, image_size=224)))
    vision = PartsConfig().model_dump(mode="json")
    seconds: dict[str, float] = {}
    with prefect_test_harness(server_startup_timeout=60):  # a throwaway Prefect server for the task runs
        for name, compute in [("sequential", {"workers": 0}),
                              ("dask_2_workers", {"workers": 2, "threads_per_worker": 1, "feature_shard_size": 64})]:
            started = time.perf_counter()
            extract_features(vision, str(dataset), str(root / name), str(root / f"cache-{name}"), compute)
            seconds[name] = round(time.perf_counter() - started, 1)
    shutil.rmtree(root, ignore_errors=True)
    return {"num_ads": num_ads, **seconds}


if __name__ == "__main__":  # Dask workers import this module again: nothing runs then
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 600)))
