"""Shared test set-up: offline environment, tiny datasets built in temporary directories.

Nothing here reads a developer's data/ or mlruns/: every fixture writes under tmp paths.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from flows.runtime import OFFLINE_ENV

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

REPO_ROOT = Path(__file__).resolve().parents[1]

SLOW_TIMEOUT_S = 1200  # flows end to end and training on a shared 2-core box; the default is 600 s


# Expensive session fixtures (a trained store, a registered catalogue, a running team stack) and
# the group of the tests that use them: under pytest-xdist each group runs on one worker, so the
# fixture is built once. Every other test file is its own group, free to run on either worker.
SHARED_FIXTURES = {"team_stack": "team", "trained_template": "ops", "catalogue_template": "catalogue"}


# tryfirst: xdist's worker reads the `xdist_group` marks in its own collection hook, and it is
# registered after this conftest, so it would otherwise run first and never see them.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """A `slow` test without its own `timeout` mark gets SLOW_TIMEOUT_S (pyproject: 600 s for the rest).

    With pytest-xdist (`make test` runs `-n 2 --dist loadgroup`): the tests of one file stay on
    one worker (module fixtures are built once), and the tests using one of SHARED_FIXTURES are
    one group (in file order, so tests/team's files that must run before test_stack.py's last
    test, which stops the stack, still do).
    """
    parallel = config.pluginmanager.hasplugin("xdist")
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))
        if parallel:
            shared = [group for fixture, group in SHARED_FIXTURES.items() if fixture in item.fixturenames]
            parts = Path(str(item.fspath)).resolve().relative_to(REPO_ROOT / "tests").parts
            item.add_marker(pytest.mark.xdist_group(shared[0] if shared else "/".join(parts)))
    if parallel:
        # Longest first (the classic rule for two machines): the shared groups (minutes each),
        # then the files of `slow` tests (flows, servers, schedules: up to a minute or two
        # each), then the rest. Started last, a long one was the suite's tail while the other
        # worker sat idle.
        first = list(SHARED_FIXTURES.values())
        slow_files = {item.fspath for item in items if item.get_closest_marker("slow") is not None}

        def rank(item) -> int:
            group = next((m.args[0] for m in item.iter_markers("xdist_group") if m.args), None)
            if group in first:
                return first.index(group)
            return len(first) if item.fspath in slow_files else len(first) + 1

        items.sort(key=rank)


# A run writes gigabytes (every flow test has its models, catalogue bundles and MLflow store), so a
# passed test's tmp_path is emptied once its fixtures are torn down. Emptied, not removed as
# pytest's `tmp_path_retention_policy = "failed"` does: that frees the name, the next test of the
# same name gets the same path, and MLflow's and SQLAlchemy's engines cached by that path in this
# process still read the deleted files. A failed test keeps its directory.
_TMP_PATH_TO_EMPTY = pytest.StashKey[Path]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    tmp_path = (getattr(item, "funcargs", None) or {}).get("tmp_path")
    if report.when == "call" and report.passed and tmp_path is not None:
        item.stash[_TMP_PATH_TO_EMPTY] = tmp_path
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    tmp_path = item.stash.get(_TMP_PATH_TO_EMPTY, None)
    if tmp_path is not None and tmp_path.is_dir():
        for child in tmp_path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
    return result


@pytest.fixture(scope="session")
def synthetic_dataset_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset (built once per test session, read-only for tests)."""
    from components.data.build import build_dataset
    from components.data.config import DataConfig, SyntheticConfig

    out_dir = tmp_path_factory.mktemp("synthetic") / "dataset"
    cfg = DataConfig(source="synthetic", out_dir=out_dir, seed=0, max_ads=None,
                     synthetic=SyntheticConfig(num_ads=120, image_size=96))
    build_dataset(cfg)
    return out_dir
