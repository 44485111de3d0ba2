"""MLflow set-up: a process that worked with another experiment (another store, a notebook)
can still open the project's runs by id."""

from __future__ import annotations

import mlflow

from components.registry.config import RegistryConfig
from components.registry.tracking import client, configure_mlflow, use_store


def test_a_run_opens_by_id_after_another_experiment_was_active(tmp_path):
    use_store(f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}")
    (tmp_path / "other").mkdir(exist_ok=True)
    mlflow.create_experiment("first")
    mlflow.set_experiment("someone-else")  # id 2 there; the project's experiment is id 1 in its store
    cfg = RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}",
                         artifact_location=str(tmp_path / "store" / "artifacts"))
    experiment_id = configure_mlflow(cfg)
    run = client().create_run(experiment_id)
    with mlflow.start_run(run_id=run.info.run_id):  # refused before: "active experiment ID does not match"
        mlflow.log_param("opened", "yes")
    assert client().get_run(run.info.run_id).data.params == {"opened": "yes"}
