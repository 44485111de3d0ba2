"""Interrupted work is safe, with real processes: a second retrain on the same repo and store
refuses while one runs; a retrain killed with SIGKILL in the middle of the matcher leaves no
stage directory that looks finished, and the rerun completes, reuses the finished stages,
registers exactly one version and marks the killed run's MLflow run FAILED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from ops_helpers import TINY_TRAINING, tracking_uri

from components.outputs import is_scratch
from components.registry.config import RegistryConfig
from components.registry.tracking import configure_mlflow
from flows.retrain import DONE_FILE, LOCK_FILE

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]


def retrain_command(root: Path, dataset_dir: Path) -> list[str]:
    """`alignsearch retrain` on the tiny dataset with every output under `root` (no params.yaml)."""
    sets = [f"data.path={dataset_dir}", f"data.cache_dir={root / 'cache'}", f"paths.flow_dir={root / 'flow'}",
            f"registry.tracking_uri={tracking_uri(root)}", f"registry.artifact_location={root / 'mlruns' / 'artifacts'}",
            *TINY_TRAINING]
    defaults = root / "defaults.yaml"  # an empty parameter file: every default
    defaults.parent.mkdir(parents=True, exist_ok=True)
    defaults.write_text("# every parameter at its default\n")
    command = [sys.executable, "-m", "flows.cli", "retrain", "--params", str(defaults)]
    for item in sets:
        command += ["--set", item]
    return command


def child_env(root: Path) -> dict[str, str]:
    """Children talk to this session's Prefect test server (no temporary server each) and keep
    Prefect's task results under `root`, as one machine's runs would share them."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(),
           "PREFECT_LOCAL_STORAGE_PATH": str(root / "prefect-results"), "MLFLOW_TRACKING_URI": tracking_uri(root)}
    return env


def _wait(predicate, seconds: float, what: str, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + seconds
    while not (value := predicate()):
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the retrain exited ({process.returncode}) while waiting for {what}: "
                                 f"{Path(process.args[-1]).name}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def _stage_dirs(flow_dir: Path, stage: str) -> tuple[list[Path], list[Path]]:
    """(finished, temporary) directories of a stage."""
    entries = sorted((flow_dir / stage).iterdir()) if (flow_dir / stage).is_dir() else []
    return [p for p in entries if not is_scratch(p)], [p for p in entries if is_scratch(p)]


def test_concurrent_retrain_refuses_and_killed_retrain_resumes(prefect_harness, synthetic_dataset_dir, tmp_path):
    root, flow_dir = tmp_path, tmp_path / "flow"
    command, env = retrain_command(root, synthetic_dataset_dir), child_env(root)
    log = (root / "first.log").open("w")
    first = subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        # 1. while it runs, a second retrain on the same repo and store refuses, naming the holder
        _wait(lambda: f"pid {first.pid} " in _read(flow_dir / LOCK_FILE), 180, "the first retrain's lock", first)
        second = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1, second.stdout + second.stderr
        assert "already running" in second.stderr and f"pid {first.pid}" in second.stderr, second.stderr
        assert "Traceback" not in second.stderr

        # 2. SIGKILL in the middle of the matcher
        _wait(lambda: _stage_dirs(flow_dir, "matcher")[1], 600, "the matcher stage", first)
        time.sleep(2.0)  # inside training (loading MiniLM alone takes longer than this)
        finished, partial = _stage_dirs(flow_dir, "matcher")
        assert first.poll() is None and partial and not finished, "the matcher finished before the kill"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=60)
        log.close()
    for stage in ("validation", "features", "align"):
        [done], _ = _stage_dirs(flow_dir, stage)
        assert (done / DONE_FILE).is_file(), stage
    assert _stage_dirs(flow_dir, "matcher")[0] == []  # nothing that looks finished

    # 3. the rerun (the dead run's lock is no obstacle) completes, reusing the finished stages
    third = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    for stage in ("validation", "features", "align", "matcher", "evaluate"):
        finished, partial = _stage_dirs(flow_dir, stage)
        assert len(finished) == 1 and (finished[0] / DONE_FILE).is_file() and not partial, stage

    configure_mlflow(RegistryConfig(tracking_uri=tracking_uri(root), artifact_location=str(root / "mlruns" / "artifacts")))
    client = MlflowClient()
    assert [str(v.version) for v in client.search_model_versions("name = 'alignsearch'")] == ["1"]
    assert str(client.get_model_version_by_alias("alignsearch", "challenger").version) == "1"
    experiment = client.get_experiment_by_name("alignsearch")
    [done_run] = client.search_runs([experiment.experiment_id], "attributes.status = 'FINISHED'")
    # the killed run does not stay RUNNING forever: the rerun, holding the lock, closed it
    [killed] = client.search_runs([experiment.experiment_id], "attributes.status = 'FAILED'")
    assert f"pid {first.pid} " in killed.data.tags["alignsearch.failure"]
    assert "interrupted" in killed.data.tags["alignsearch.failure"]
    assert not client.search_runs([experiment.experiment_id], "attributes.status = 'RUNNING'")
    assert done_run.data.tags["alignsearch.cached_stages"].split(",")[:3] == ["validate", "features", "align"]
    assert "train_matcher" not in done_run.data.tags["alignsearch.cached_stages"]
    metrics = json.loads(_stage_dirs(flow_dir, "evaluate")[0][0].joinpath("metrics.json").read_text())
    assert 0.0 <= metrics["ours"]["test"]["ndcg@10"] <= 1.0


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""
