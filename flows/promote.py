"""The promotion flow (`alignsearch promote`) and the scheduled job: retrain, then promote."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from components.catalogue.live import catalogue_carrier
from components.config import Params, load_params
from components.registry.promotion import promote
from components.registry.tracking import configure_mlflow
from flows.retrain import retrain_flow
from flows.runtime import setup_runtime


@task(name="promote", retries=1, retry_delay_seconds=10)
def promote_task(params: dict[str, Any], dataset_dir: str | None) -> dict:
    cfg = Params.model_validate(params)
    configure_mlflow(cfg.registry)
    decision = promote(cfg.registry, cfg.promote, dataset_dir=Path(dataset_dir) if dataset_dir else None,
                       cache_dir=cfg.data.cache_dir, carry_catalogue=catalogue_carrier(cfg.registry, cfg.data.cache_dir),
                       validation=cfg.validation)
    return asdict(decision)


@flow(name="alignsearch-promote", log_prints=True)
def promote_flow(params: dict[str, Any], dataset_dir: str | None = None) -> dict:
    """Evaluate challenger and champion on the current test split of `dataset_dir` (default: the
    dataset the challenger was trained on, as its run recorded; other data must pass validation
    first); move `champion` if the rule allows."""
    setup_runtime()
    decision = promote_task(params, dataset_dir)
    get_run_logger().info("promotion: %s (%s)", decision["outcome"], decision["reason"])
    return decision


@flow(name="alignsearch-retrain-and-promote", log_prints=True)
def retrain_and_promote_flow(params_file: str = "params.yaml", overrides: list[str] | None = None,
                             loop: bool = False) -> dict:
    """What a schedule runs: the retraining flow, then promotion on the same dataset.

    `loop` (the schedule and the prefect.yaml deployment set it): ingest the logged searches
    and clicks into the next dataset version first, train on it from the champion's matcher
    (unless `match.warm_start` is false), then promote on it (flows/retrain.py).
    Params are read when the run starts, so a schedule picks up edits to `params_file`.
    """
    setup_runtime()  # a deployment's worker starts here, not through the CLI
    params = load_params(Path(params_file), overrides).model_dump(mode="json", by_alias=True)
    retrained = retrain_flow(params, loop=loop)
    decision = promote_flow(params, dataset_dir=retrained["dataset_dir"])
    return {"retrain": retrained, "promotion": decision}


if __name__ == "__main__":  # python -m flows.promote [--loop]: the scheduled job once, locally
    import sys

    print(retrain_and_promote_flow(loop="--loop" in sys.argv[1:]))
