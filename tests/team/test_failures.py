"""`team up` fails loudly, naming the service and the reason, and leaves nothing running."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from infra.team import supervisor as team

pytestmark = pytest.mark.timeout(120)


def test_port_taken_names_the_service(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(team.TeamError, match=rf"^mlflow: cannot bind 127\.0\.0\.1:{port}") as caught:
            team.up(tmp_path / "state", ports={"mlflow": port})
    assert caught.value.service == "mlflow"


def test_missing_binary_names_the_service(tmp_path, monkeypatch):
    monkeypatch.setattr(team, "PG_BIN", Path("/nonexistent/postgresql/bin"))
    with pytest.raises(team.TeamError, match=r"^postgres: binary /nonexistent/postgresql/bin/initdb not found"):
        team.up(tmp_path / "state")
    assert not any(s.running for s in team.status(tmp_path / "state"))
