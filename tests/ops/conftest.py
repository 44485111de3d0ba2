"""Operations tests: real Prefect flow runs (`prefect_test_harness`, a throwaway server and
database), a real MLflow store (sqlite + artifacts) in a temporary directory, the tiny
synthetic dataset of tests/conftest.py. Nothing is mocked.

One test, one store: the expensive retraining runs once per session into a template, and each
test that uses `trained_store` gets its own copy of it (database, artifacts, stage outputs), so
no test sees what another registered, promoted or failed.
"""

from __future__ import annotations

import os
import shutil

import pytest
from ops_helpers import as_flow_params, ops_params, relocate_paths, relocate_store

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
def trained_template(prefect_harness, synthetic_dataset_dir, tmp_path_factory):
    """One retraining flow run on the tiny synthetic dataset: (root, result). Never handed to a
    test directly (tests get a copy, `trained_store`); read-only users may read it."""
    from flows.retrain import retrain_flow

    root = tmp_path_factory.mktemp("ops-template")
    result = retrain_flow(as_flow_params(ops_params(root, synthetic_dataset_dir)))
    return root, result


@pytest.fixture
def trained_store(trained_template, synthetic_dataset_dir, tmp_path):
    """This test's own copy of the trained store: (root, params, result), v1 as `challenger`."""
    from mlflow.tracking._tracking_service import utils as mlflow_service_utils

    from components.registry.tracking import configure_mlflow

    template, result = trained_template
    root = tmp_path / "store"
    shutil.copytree(template, root)
    relocate_store(root, template)
    cfg = ops_params(root, synthetic_dataset_dir)
    configure_mlflow(cfg.registry)  # a client the test makes talks to this store, not the last one
    # MLflow caches artifact repositories by run / model id for the process; the copies share
    # those ids, so without this a test would write into the template's (or another copy's) files.
    artifact_repos = mlflow_service_utils._artifact_repos_cache
    artifact_repos.clear()
    yield root, cfg, relocate_paths(result, template, root)
    artifact_repos.clear()


@pytest.fixture(scope="session")
def two_versions(trained_template, synthetic_dataset_dir, tmp_path_factory):
    """A store with v1 (the session's) and v2 (another seed, no word channel), built once for the
    promotion-with-traffic and rollback tests, which copy it (read-only here): (root, worse,
    better) by test ndcg@10."""
    from two_versions import build_two_versions

    root = tmp_path_factory.mktemp("two-versions")
    worse, better = build_two_versions(trained_template[0], synthetic_dataset_dir, root)
    return root, worse, better
