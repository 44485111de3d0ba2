"""Registration survives a retry: a version created whose `challenger` alias never landed (the
process died in between) is made challenger by the retry, not left behind under the old one;
and the run records where its dataset is as an absolute path. A real sqlite MLflow store in
tmp_path; only the alias call is made to fail, once."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient
from ops_helpers import as_flow_params, ops_params

from components.registry.config import RegistryConfig
from components.registry.tracking import configure_mlflow
from components.registry.versions import CHALLENGER, CHAMPION, by_alias, register

NAME = "alignsearch"


class _Echo(mlflow.pyfunc.PythonModel):  # the smallest model MLflow registers
    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return model_input


def _logged_model() -> str:
    with mlflow.start_run():
        return mlflow.pyfunc.log_model(name="model", python_model=_Echo(), pip_requirements=[]).model_uri


def _fail_alias_once(monkeypatch) -> list[str]:
    """The next `challenger` alias call dies as a killed process would (no `except Exception`
    cleanup runs); later calls go through."""
    real = MlflowClient.set_registered_model_alias
    failed: list[str] = []

    def once(self, name, alias, version):
        if not failed:
            failed.append(str(version))
            raise KeyboardInterrupt(f"killed while pointing {alias} at v{version}")
        return real(self, name, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", once)
    return failed


@pytest.fixture
def store(tmp_path):
    configure_mlflow(RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                                    artifact_location=str(tmp_path / "artifacts")))
    return MlflowClient()


def test_a_retried_registration_makes_the_version_it_finds_challenger(store, monkeypatch):
    first = register(_logged_model(), NAME, model_key="key-1", tags={})
    assert (first.version, first.created) == ("1", True)
    model_uri = _logged_model()
    failed = _fail_alias_once(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        register(model_uri, NAME, model_key="key-2", tags={})
    assert failed == ["2"] and str(by_alias(NAME, CHALLENGER).version) == "1"  # v2 exists, alias never moved

    again = register(model_uri, NAME, model_key="key-2", tags={})
    assert (again.version, again.created) == ("2", False)  # found by its key, not registered twice
    assert str(by_alias(NAME, CHALLENGER).version) == "2"
    assert sorted(str(v.version) for v in store.search_model_versions(f"name = '{NAME}'")) == ["1", "2"]


def test_a_found_version_that_is_champion_keeps_challenger_where_it_is(store):
    champion_uri = _logged_model()
    register(champion_uri, NAME, model_key="key-1", tags={})
    store.set_registered_model_alias(NAME, CHAMPION, "1")
    register(_logged_model(), NAME, model_key="key-2", tags={})
    found = register(champion_uri, NAME, model_key="key-1", tags={})  # the champion's model again
    assert (found.version, found.created) == ("1", False)
    assert str(by_alias(NAME, CHALLENGER).version) == "2" and str(by_alias(NAME, CHAMPION).version) == "1"


@pytest.mark.slow
def test_a_retrain_retried_after_a_failed_alias_leaves_challenger_on_the_new_version(trained_store, monkeypatch):
    """The flow's own lookup (the `register` task skips the bundle when the key is registered)
    must set the alias too: v1 is challenger, a changed model registers v2, the alias call dies;
    the rerun finds v2 and makes it challenger."""
    from flows.retrain import retrain_flow

    root, cfg, _ = trained_store
    changed = as_flow_params(ops_params(root, cfg.data.path, "match.max_steps=2"))  # a new model key
    failed = _fail_alias_once(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        retrain_flow(changed)
    assert failed == ["2"] and str(by_alias(NAME, CHALLENGER).version) == "1"
    monkeypatch.undo()
    configure_mlflow(cfg.registry)

    again = retrain_flow(changed)
    assert again["version"] == "2" and not again["version_created"]
    assert str(by_alias(NAME, CHALLENGER).version) == "2"


@pytest.mark.slow
def test_a_relative_dataset_path_is_recorded_absolute(trained_store, monkeypatch):
    """`dataset_dir` on the run (and a version's tags) is what a server started elsewhere, or
    `promote` from another directory, opens: an absolute path, whatever `data.path` said."""
    from flows.retrain import retrain_flow

    root, cfg, _ = trained_store
    dataset = cfg.data.path.resolve()
    monkeypatch.chdir(dataset.parent)
    done = retrain_flow(as_flow_params(ops_params(root, cfg.data.path, f"data.path={dataset.name}")))
    assert done["dataset_dir"] == str(dataset)
    assert MlflowClient().get_run(done["run_id"]).data.tags["dataset_dir"] == str(dataset)
