"""`alignsearch schedule` against a real Prefect server (the temporary one cannot schedule):
the cron deployment must actually fire, retrain and promote; and `prefect deploy` of
prefect.yaml registers the team deployment with its schedule.

The clock is the only thing a cron run must wait for (the next minute): the server creates the
runs of a new deployment within a second, the served process polls every second, and the
prefect.yaml check runs while the cron run is pending, so the test takes about
(time to the next minute) + (one tiny retrain) + start-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from mlflow import MlflowClient
from ops_helpers import TINY_TRAINING, free_port, tracking_uri

from components.registry.config import RegistryConfig
from components.registry.tracking import configure_mlflow

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]


def _wait(predicate, seconds: float, what: str, *processes: subprocess.Popen):
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value:
            return value
        for process in processes:
            assert process.poll() is None, f"{process.args[:4]} exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _completed_runs(api: str, deployment: str) -> list[dict]:
    query = {"flow_runs": {"deployment_id": {"any_": [deployment]}, "state": {"type": {"any_": ["COMPLETED"]}}}}
    try:
        return httpx.post(f"{api}/flow_runs/filter", json=query, timeout=10).json()
    except httpx.TransportError:
        return []


def _deployment_id(api: str, name: str) -> str | None:
    try:
        found = httpx.post(f"{api}/deployments/filter", json={"deployments": {"name": {"any_": [name]}}},
                           timeout=10).json()
    except httpx.TransportError:
        return None
    return found[0]["id"] if found else None


def test_cron_schedule_retrains_and_promotes(synthetic_dataset_dir, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_TRACKING_URI": tracking_uri(tmp_path),
           # no waiting beyond the cron minute: the server schedules a new deployment's runs at
           # once (default loop 5 s) and the served process looks for due runs every second (10 s)
           "PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS": "1",
           "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    prefect = os.path.join(os.path.dirname(sys.executable), "prefect")
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    served = None
    try:
        def healthy() -> bool:
            try:
                return httpx.get(f"{api}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        _wait(healthy, 120, "the Prefect server", server)
        sets = [f"data.path={synthetic_dataset_dir}", f"data.cache_dir={tmp_path / 'cache'}",
                f"paths.flow_dir={tmp_path / 'flow'}", f"registry.tracking_uri={tracking_uri(tmp_path)}",
                f"registry.artifact_location={tmp_path / 'mlruns' / 'artifacts'}",
                # the schedule runs the loop: its log and its ingested dataset stay in tmp too
                f"traffic.store_uri=sqlite:///{tmp_path / 'traffic.db'}", f"traffic.dataset_dir={tmp_path / 'live'}",
                *TINY_TRAINING]
        command = [sys.executable, "-m", "flows.cli", "schedule", "--cron", "* * * * *", "--name", "test-cron"]
        for item in sets:
            command += ["--set", item]
        served = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        deployment = _wait(lambda: _deployment_id(api, "test-cron"), 120, "the deployment", server, served)
        registered = time.time()

        # meanwhile (the cron run waits for the next minute): prefect.yaml's team deployment
        # registers with its cron schedule
        subprocess.run([prefect, "work-pool", "create", "alignsearch", "--type", "process"], env=env, check=True,
                       capture_output=True, timeout=120)
        subprocess.run([prefect, "--no-prompt", "deploy", "--all"], env={**env, "ALIGNSEARCH_REPO": str(REPO_ROOT)},
                       check=True, capture_output=True, timeout=300, cwd=REPO_ROOT)
        [team] = httpx.post(f"{api}/deployments/filter", json={"deployments": {"name": {"any_": ["weekly-retrain"]}}},
                            timeout=10).json()
        assert team["entrypoint"] == "flows/promote.py:retrain_and_promote_flow"
        assert team["schedules"][0]["schedule"]["cron"] == "0 3 * * 1"

        runs = _wait(lambda: _completed_runs(api, deployment), 300, "a completed scheduled run", server, served)
        assert runs[0]["auto_scheduled"] is True
        # it fired at the first minute after the deployment registered, not a later one
        started = datetime.fromisoformat(runs[0]["expected_start_time"]).timestamp()
        assert started - registered <= 61, f"the first cron run was due {started - registered:.0f} s after registering"

        configure_mlflow(RegistryConfig(tracking_uri=tracking_uri(tmp_path)))
        client = MlflowClient()
        champion = client.get_model_version_by_alias("alignsearch", "champion")
        assert str(champion.version) == "1"
        assert champion.tags["alignsearch.promotion.outcome"] == "promoted"
    finally:
        for process in (served, server):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)
