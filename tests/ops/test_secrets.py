"""A password in a store URI never reaches what is shown, logged or tagged: the registry's error
messages, the retraining run's params, params.json and failure tag (`redact_uri`)."""

from __future__ import annotations

import json
import tempfile

import pytest
from mlflow import MlflowClient
from ops_helpers import as_flow_params, ops_params, tracking_uri

from components.outputs import redact_uri
from components.registry.tracking import use_store
from components.registry.versions import registry_error

SECRET = "s3cret-pw"
WITH_PASSWORD = f"http://alice:{SECRET}@127.0.0.1:9/"


@pytest.mark.parametrize(("uri", "shown"), [
    ("postgresql://mlflow:pw@db:5432/mlflow", "postgresql://db:5432/mlflow"),
    ("postgresql+psycopg2://u:p%40ss@db/mlflow?sslmode=require", "postgresql+psycopg2://db/mlflow?sslmode=require"),
    ("http://alice@host:5000", "http://host:5000"),                        # a user alone is dropped too
    ("https://host:5000/path@x", "https://host:5000/path@x"),              # '@' in the path is no user
    ("sqlite:///mlruns/mlflow.db", "sqlite:///mlruns/mlflow.db"),
    ("databricks", "databricks"),
    ("failed at http://u:p@h:1/api and at s3://k:s@bucket/x",              # every URI in a text
     "failed at http://h:1/api and at s3://bucket/x"),
])
def test_redact_uri_drops_user_and_password(uri, shown):
    assert redact_uri(uri) == shown


def test_registry_error_names_the_store_without_its_password(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # use_store sets it: gone again after the test
    use_store(WITH_PASSWORD)
    message = str(registry_error("reading alignsearch@champion", RuntimeError("boom")))
    assert SECRET not in message and "alice" not in message
    assert "http://127.0.0.1:9/" in message


def test_mlflow_prints_no_run_link_built_from_a_uri_with_a_password(monkeypatch):
    """MLflow prints "View run ... at: <tracking URI>/#/..." to stdout when a run ends on a
    server: with credentials in the URI, that line would show them."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(name, raising=False)
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    use_store("http://127.0.0.1:9/")
    assert not MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get()  # no credentials: the link is useful
    use_store(WITH_PASSWORD)
    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get()


def _everything_recorded(client: MlflowClient, run_id: str) -> str:
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as scratch:  # mlflow's default would stay in /tmp
        with open(client.download_artifacts(run_id, "params.json", dst_path=scratch)) as handle:
            logged = json.load(handle)
    return json.dumps([run.data.params, run.data.tags, logged])


@pytest.mark.slow
def test_a_password_in_params_tracking_uri_is_never_logged(trained_store, monkeypatch):
    """MLFLOW_TRACKING_URI wins over params, so params may name a server with a password while
    the flow works elsewhere: its params, params.json and tags must not carry the password,
    neither for a run that succeeds nor for one whose failure message quotes the URI."""
    from components.registry import tracking
    from flows import retrain

    root, cfg, _ = trained_store
    # As in a fresh process: the user's MLFLOW_TRACKING_URI, not one this process wrote (the
    # fixture's configure_mlflow wrote this very value, which tracking_uri would then ignore).
    monkeypatch.setattr(tracking, "_written", set())
    monkeypatch.setattr(tracking, "_user_uri", [None])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri(root))
    params = as_flow_params(ops_params(root, cfg.data.path, f"registry.tracking_uri={WITH_PASSWORD}"))
    done = retrain.retrain_flow(params)  # every stage cached: the identical model is found
    client = MlflowClient()
    recorded = _everything_recorded(client, done["run_id"])
    assert SECRET not in recorded
    assert "registry.tracking_uri" in client.get_run(done["run_id"]).data.params

    def unreachable(*_, **__):
        raise ConnectionError(f"cannot reach {WITH_PASSWORD}")

    monkeypatch.setattr(retrain, "log_dataset_input", unreachable)
    with pytest.raises(ConnectionError):
        retrain.retrain_flow(params)
    [failed] = client.search_runs([client.get_experiment_by_name(cfg.registry.experiment).experiment_id],
                                  "attributes.status = 'FAILED'")
    assert "cannot reach http://127.0.0.1:9/" in failed.data.tags["alignsearch.failure"]
    assert SECRET not in _everything_recorded(client, failed.info.run_id)
