"""Team-mode tests: one `alignsearch team up` stack per session (real Postgres, moto S3,
MLflow and Prefect servers, a process worker) on 127.0.0.1, stopped at the end.

The state dir is made under /tmp and opened to other users: PostgreSQL runs as user
`postgres`, which cannot enter pytest's private temp dirs."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from infra.team import supervisor as team

# The stack under test is the only server these tests may talk to.
for _name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_name, None)

STARTUP: dict[str, float] = {}


@pytest.fixture(scope="session")
def team_root():
    root = Path(tempfile.mkdtemp(prefix="alignsearch-team-"))
    root.chmod(0o755)
    yield root / "state"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def team_stack(team_root):
    """The running stack: its TeamState (ports, secrets) and `.team/env` as a dict."""
    started = time.monotonic()
    state = team.up(team_root)  # raises TeamError naming the service that failed and why
    STARTUP["seconds"] = time.monotonic() - started
    print(f"\nteam up: all services healthy in {STARTUP['seconds']:.1f} s")
    try:
        yield state
    finally:
        team.down(team_root)


@pytest.fixture
def team_env(team_stack) -> dict[str, str]:
    return team.team_env(team_stack)
