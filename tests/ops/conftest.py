"""Operations tests: real Prefect flow runs (`prefect_test_harness`, a throwaway server and
database), a real MLflow store (sqlite + artifacts) in a temporary directory, the tiny
synthetic dataset of tests/conftest.py. Nothing is mocked."""

from __future__ import annotations

import os

import pytest
from ops_helpers import as_flow_params, ops_params

# The store under test is given explicitly in params; a developer's server must not leak in.
os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(server_startup_timeout=60), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        yield


@pytest.fixture(scope="session")
def trained_store(prefect_harness, synthetic_dataset_dir, tmp_path_factory):
    """One retraining flow run on the tiny synthetic dataset: (root, params, result)."""
    from flows.retrain import retrain_flow

    root = tmp_path_factory.mktemp("ops")
    cfg = ops_params(root, synthetic_dataset_dir)
    result = retrain_flow(as_flow_params(cfg))
    return root, cfg, result
