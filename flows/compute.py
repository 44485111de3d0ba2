"""Where the flows' fan-out work runs: Prefect tasks on Dask (prefect-dask), built from the
`compute` section of params.yaml.

- `compute.workers: 0` and no address: no cluster, the work runs in the flow's process as
  before (the default: nothing to start on a laptop).
- `compute.workers: N`: a `distributed.LocalCluster` of N worker processes for the run,
  started and closed by Prefect's `DaskTaskRunner`.
- `compute.scheduler_address` or `ALIGNSEARCH_DASK_ADDRESS` (the env var wins): a team's
  running scheduler (infra/compose.yaml's `dask-scheduler`); its workers must have the
  project installed and see the same dataset and cache paths.

Two users:
- feature extraction: the images are cut into shards, each shard is one task, and the
  shard files are merged in plan order, so the features are the same array, byte for
  byte, whatever ran them;
- the benchmark's independent trainings (`cell_mapper`): the learning-rate searches, then
  every system x fraction x seed run, one task per cell
  (`components.evaluate.benchmark.train_cell`); the rows are the sequential run's.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from components.config import ComputeConfig, load_params
from components.vision.config import PartsConfig
from flows.runtime import setup_runtime

log = logging.getLogger(__name__)

DASK_ADDRESS_ENV = "ALIGNSEARCH_DASK_ADDRESS"
SHARDS_SUBDIR = ".shards"


def dask_address(compute: ComputeConfig) -> str | None:
    """The team scheduler to use, if any: the environment wins over params.yaml."""
    return os.environ.get(DASK_ADDRESS_ENV) or compute.scheduler_address


def uses_dask(compute: ComputeConfig) -> bool:
    return dask_address(compute) is not None or compute.workers > 0


def dask_task_runner(compute: ComputeConfig):
    """A `DaskTaskRunner` for `compute`, or None when the work runs in-process."""
    from prefect_dask import DaskTaskRunner

    address = dask_address(compute)
    if address:
        return DaskTaskRunner(address=address)
    if compute.workers > 0:
        # Processes, not threads: extraction holds the GIL between ONNX calls. Port 0 everywhere:
        # several runs (and other engineers' clusters) share one machine.
        return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                              cluster_kwargs={"n_workers": compute.workers,
                                              "threads_per_worker": compute.threads_per_worker,
                                              "processes": True, "host": "127.0.0.1",
                                              "scheduler_port": 0, "dashboard_address": ":0"})
    return None


# --------------------------------------------------------------------------- features


@task(name="features-shard", retries=1, retry_delay_seconds=2)
def features_shard(vision: dict, image_paths: list[str], out_path: str, cache_dir: str,
                   num_threads: int) -> str:
    """Parts of one shard of images, written to `out_path` (a path travels, not arrays)."""
    # torch-bound: imported once setup_runtime has set torch's kernel settings (flows/retrain.py)
    from components.vision.stage import run_features_shard

    return str(run_features_shard(PartsConfig(**vision), image_paths=image_paths, out_path=Path(out_path),
                                  cache_dir=Path(cache_dir), num_threads=num_threads))


@flow(name="alignsearch-features", log_prints=True)
def features_flow(vision: dict, dataset_dir: str, out_dir: str, cache_dir: str, compute: dict) -> dict:
    """Shards of the dataset's images as tasks on the flow's task runner, merged in order."""
    # torch-bound: imported once setup_runtime has set torch's kernel settings (flows/retrain.py)
    from components.vision.stage import merge_feature_shards, plan_feature_shards

    started = time.perf_counter()
    cfg = ComputeConfig(**compute)
    # Absolute paths: a worker's working directory is not the flow's (params.yaml's paths are
    # relative to the repository); on other machines they must be on shared storage.
    dataset_dir, out_dir, cache_dir = (str(Path(p).resolve()) for p in (dataset_dir, out_dir, cache_dir))
    shards = plan_feature_shards(Path(dataset_dir), cfg.feature_shard_size)
    shard_dir = Path(out_dir) / SHARDS_SUBDIR
    futures = [features_shard.submit(vision, paths, str(shard_dir / f"shard-{i:05d}.npz"), cache_dir,
                                     cfg.threads_per_worker)
               for i, paths in enumerate(shards)]
    shard_paths = [Path(future.result()) for future in futures]  # plan order, not completion order
    result = merge_feature_shards(shard_paths, out_dir=Path(out_dir), seconds=time.perf_counter() - started)
    return {"features_path": str(result.features_path), "metrics": result.metrics}


def extract_features(vision: dict, dataset_dir: str, out_dir: str, cache_dir: str,
                     compute: dict[str, Any] | None = None) -> dict:
    """The features stage on the configured compute: in-process (`run_features`) or as
    shard tasks on Dask. Returns {"features_path", "metrics"}; the file is the same either way."""
    # torch-bound: imported once setup_runtime has set torch's kernel settings (flows/retrain.py)
    from components.vision.stage import run_features

    cfg = ComputeConfig(**(compute or {}))
    runner = dask_task_runner(cfg)
    if runner is None:
        result = run_features(PartsConfig(**vision), dataset_dir=Path(dataset_dir), out_dir=Path(out_dir),
                              cache_dir=Path(cache_dir))
        return {"features_path": str(result.features_path), "metrics": result.metrics}
    log.info("features on Dask: %s", dask_address(cfg) or f"LocalCluster of {cfg.workers} workers")
    return features_flow.with_options(task_runner=runner)(vision, dataset_dir, out_dir, cache_dir,
                                                          cfg.model_dump(mode="json"))


# --------------------------------------------------------------------------- benchmark cells


@task(name="benchmark-cell", cache_policy=NO_CACHE)
def benchmark_cell(function: str, cell: dict, context: dict) -> Any:
    """One training cell of the benchmark; `function` is "module:name" (a path travels, and
    the worker imports the project's own code)."""
    module, _, name = function.partition(":")
    return getattr(importlib.import_module(module), name)(cell, context)


@flow(name="alignsearch-benchmark-cells", log_prints=True)
def benchmark_cells_flow(function: str, cells: list[dict], context: dict) -> list:
    futures = [benchmark_cell.submit(function, cell, context) for cell in cells]
    return [future.result() for future in futures]  # the cells' order, not completion order


def cell_mapper(compute: ComputeConfig | dict) -> Callable[[Callable, list[dict], dict], list] | None:
    """`map_cells` for `run_benchmark` on the configured Dask cluster, or None (in-process)
    when `compute` asks for none."""
    cfg = compute if isinstance(compute, ComputeConfig) else ComputeConfig(**compute)
    if not uses_dask(cfg):
        return None

    def map_cells(function: Callable, cells: list[dict], context: dict) -> list:
        if not cells:
            return []
        log.info("%d benchmark cells on Dask: %s", len(cells), dask_address(cfg) or f"LocalCluster of {cfg.workers}")
        runner = dask_task_runner(cfg)
        return benchmark_cells_flow.with_options(task_runner=runner)(
            f"{function.__module__}:{function.__qualname__}", cells, context)

    return map_cells


if __name__ == "__main__":  # features of the configured dataset with the configured compute
    import sys


    setup_runtime()
    params = load_params(overrides=sys.argv[1:])
    dataset = params.data.path or Path(params.data.out_dir)
    print(extract_features(params.vision.model_dump(mode="json"), str(dataset), str(params.paths.features_dir),
                           str(params.data.cache_dir), params.compute.model_dump(mode="json")))
