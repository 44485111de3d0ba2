"""The promotion flow (`alignsearch promote`), the rollback flow (`alignsearch rollback`, also
servable on a schedule) and the scheduled job: retrain, then promote."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from components.catalogue.live import catalogue_carrier
from components.config import Params, load_params
from components.registry.promotion import promote, rollback
from components.registry.tracking import configure_mlflow
from components.traffic.verdict import live_ctr_reader, online_evidence
from flows.retrain import retrain_flow
from flows.runtime import setup_runtime


@task(name="promote", retries=1, retry_delay_seconds=10)
def promote_task(params: dict[str, Any], dataset_dir: str | None) -> dict:
    cfg = Params.model_validate(params)
    configure_mlflow(cfg.registry)
    online = online_evidence(cfg.registry, cfg.promote, cfg.traffic)  # what the traffic log says (None: off)
    decision = promote(cfg.registry, cfg.promote, dataset_dir=Path(dataset_dir) if dataset_dir else None,
                       cache_dir=cfg.data.cache_dir, carry_catalogue=catalogue_carrier(cfg.registry, cfg.data.cache_dir),
                       validation=cfg.validation, online=online)
    return asdict(decision)


@task(name="rollback", retries=1, retry_delay_seconds=10)
def rollback_task(params: dict[str, Any], force: bool = False) -> dict:
    cfg = Params.model_validate(params)
    configure_mlflow(cfg.registry)
    decision = rollback(cfg.registry, cfg.promote, measure_ctr=live_ctr_reader(cfg.traffic, cfg.registry.model_name),
                        carry_catalogue=catalogue_carrier(cfg.registry, cfg.data.cache_dir), force=force)
    return asdict(decision)


@flow(name="alignsearch-rollback", log_prints=True)
def rollback_flow(params: dict[str, Any], force: bool = False) -> dict:
    """Move `champion` back to the version it replaced when its live CTR@10 over
    promote.rollback_window_days fell below that version's by more than
    promote.rollback_max_ctr_drop (`force`: regardless); the live catalogue moves with it.
    Serve it on a schedule like the retraining job (docs/operations.md#rollback)."""
    setup_runtime()
    decision = rollback_task(params, force)
    get_run_logger().info("rollback: %s (%s)", decision["outcome"], decision["reason"])
    return decision


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


if __name__ == "__main__":  # python -m flows.promote [--loop | --rollback]: a scheduled job once, locally
    import sys

    if "--rollback" in sys.argv[1:]:
        print(rollback_flow(load_params(Path("params.yaml"), None).model_dump(mode="json", by_alias=True)))
    else:
        print(retrain_and_promote_flow(loop="--loop" in sys.argv[1:]))
