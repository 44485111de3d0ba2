"""Team mode keeps its secrets off command lines (any user sees them in `ps`) and its state
files private from the moment they exist (not chmod-ed after being written)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from infra.team import supervisor as team

pytestmark = pytest.mark.timeout(120)


def _state(root: Path) -> team.TeamState:
    state = team.TeamState(root=str(root), secrets={"postgres_password": "pg-Secret-123", "s3_access_key": "alignsearch",
                                                    "s3_secret_key": "s3-Secret-456"})
    for port, name in enumerate(("postgres", "s3", "mlflow", "prefect"), start=41000):
        state.services[name] = team.Service(name=name, port=port)
    return state


def test_no_secret_on_a_server_command_line(tmp_path, monkeypatch):
    """What `team up` spawns for MLflow and Prefect: the database password only in their
    environment (MLflow reads MLFLOW_BACKEND_STORE_URI), never in argv."""
    spawned: dict[str, tuple[list[str], dict[str, str]]] = {}

    def spawn(service, command, env, root):
        spawned[service.name] = (command, env)
        return None

    monkeypatch.setattr(team, "_spawn", spawn)
    monkeypatch.setattr(team, "_wait_healthy", lambda *_, **__: None)
    monkeypatch.setattr(team, "_bin", lambda name: f"/bin/{name}")
    state = _state(tmp_path)
    team._start_servers(state, tmp_path, {"PATH": "/bin"}, timeout=1)
    assert set(spawned) == {"mlflow", "prefect"}
    for name, (command, _) in spawned.items():
        line = " ".join(command)
        assert "pg-Secret-123" not in line and "s3-Secret-456" not in line, (name, line)
    mlflow_command, mlflow_env = spawned["mlflow"]
    assert "--backend-store-uri" not in mlflow_command
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"] == team._pg_uri(state, "mlflow")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_and_env_files_are_private_from_the_start(tmp_path, monkeypatch):
    """With chmod out of the way, the files are still 0600: they were created so, never
    readable by others for a moment between the write and a chmod."""
    monkeypatch.setattr(Path, "chmod", lambda *_, **__: None)
    state = _state(tmp_path)
    state.save()
    assert _mode(tmp_path / team.STATE_FILE) == 0o600
    team.write_env(state)
    assert _mode(tmp_path / team.ENV_FILE) == 0o600
    assert "s3-Secret-456" in (tmp_path / team.ENV_FILE).read_text()
