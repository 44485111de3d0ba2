"""Settings of MLflow tracking, registration and promotion (light: no mlflow import)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from components.systems import RegisteredSystem


class RegistryConfig(BaseModel):
    """Where runs and models go. `MLFLOW_TRACKING_URI` in the environment wins over
    `tracking_uri`, so the same code points at a team's server."""

    model_config = ConfigDict(extra="forbid")

    # sqlite store + artifacts beside it: the whole local store lives under mlruns/.
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_location: str = "mlruns/artifacts"
    experiment: str = "alignsearch"
    model_name: str = "alignsearch"
    # The system the retraining flow trains, bundles and registers (a two-tower system).
    system: RegisteredSystem = "ours"
    title_less_system: RegisteredSystem | None = Field(
        "implicit_fusion_words", description="on a dataset without titles (COCO-style) the flow also trains "
        "this system beside `system` and registers whichever ranks the valid split better (ndcg@10; a tie "
        "keeps `system`): there `ours` sees the image only through a few words; None = always `system`")


class PromoteConfig(BaseModel):
    """The rule `alignsearch promote` applies between `challenger` and `champion`."""

    model_config = ConfigDict(extra="forbid")

    metric: str = "ndcg@10"
    min_delta: float = Field(0.0, ge=0.0, description="challenger must beat champion by at least this")
    guardrail_metric: str = "title_overlap/auc"
    guardrail_max_drop: float = Field(0.01, ge=0.0, description="largest allowed drop of the guardrail metric")
    split: str = "test"
    seed: int = 0

    # What live traffic says (interleaved searches, `alignsearch traffic compare`).
    online: Literal["off", "advisory", "required"] = Field(
        "advisory", description="off: the offline rule alone; advisory: a challenger that loses online "
        "significantly is not promoted, too few impressions leave the offline rule to decide; required: "
        "no promotion without an online win")
    @field_validator("online", mode="before")
    @classmethod
    def _yaml_off_is_off(cls, value: object) -> object:
        # YAML 1.1 (params.yaml, --set) reads a bare `off` as false.
        return "off" if value is False else value

    min_online_impressions: int = Field(200, ge=1, description="interleaved searches needed for an online verdict")
    online_alpha: float = Field(0.05, gt=0, lt=1, description="significance level of the online verdict's test")
    rollback_window_days: float = Field(7.0, gt=0, description="the window of live CTR@10 a rollback compares")
    rollback_max_ctr_drop: float = Field(0.05, ge=0, description="roll back when the champion's CTR@10 is "
                                         "below the previous champion's by more than this")
