"""Lightning's MLflow logger, adapted to log into a run that a flow owns."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only

from components.registry.tracking import metric_key


class RunLogger(MLFlowLogger):
    """Logs a stage's training curves into an existing MLflow run, keys prefixed by stage.

    - Hyperparameters are not logged here: the flow logs every param from params.yaml once,
      and MLflow refuses a param logged twice with different values (a learning-rate search
      fits the same module at several rates).
    - `finalize` leaves the run open: the flow, not one fit, decides FINISHED or FAILED.
    - `child("lr0.0003")` logs a nested fit (one rate of a search) under its own keys, so
      their step curves do not interleave.
    """

    def __init__(self, *, run_id: str, tracking_uri: str | None, prefix: str) -> None:
        super().__init__(tracking_uri=tracking_uri, run_id=run_id, prefix=prefix, log_model=False)

    def child(self, name: str) -> RunLogger:
        return RunLogger(run_id=self.run_id, tracking_uri=self._tracking_uri, prefix=f"{self._prefix}-{name}")

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        return None

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        # Lightning would drop the `@` ("ndcg@10" -> "ndcg10"); spell it as the flow does.
        super().log_metrics({metric_key(k): v for k, v in metrics.items()}, step)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        return None
