"""Shared test set-up: offline environment, tiny datasets built in temporary directories.

Nothing here reads a developer's data/ or mlruns/: every fixture writes under tmp paths.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.runtime import OFFLINE_ENV

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

REPO_ROOT = Path(__file__).resolve().parents[1]

SLOW_TIMEOUT_S = 1200  # flows end to end and training on a shared 2-core box; the default is 600 s


def pytest_collection_modifyitems(config, items):
    """A `slow` test without its own `timeout` mark gets SLOW_TIMEOUT_S (pyproject: 600 s for the rest)."""
    for item in items:
        if item.get_closest_marker("slow") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture(scope="session")
def synthetic_dataset_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset (built once per test session, read-only for tests)."""
    from components.config import DataConfig, SyntheticConfig
    from components.data.build import build_dataset

    out_dir = tmp_path_factory.mktemp("synthetic") / "dataset"
    cfg = DataConfig(source="synthetic", out_dir=out_dir, seed=0, max_ads=None,
                     synthetic=SyntheticConfig(num_ads=120, image_size=96))
    build_dataset(cfg)
    return out_dir
