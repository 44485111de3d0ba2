"""The no-Docker team stack (`alignsearch team up`): every service healthy, `.team/env`
usable by a shell, MLflow on Postgres with artifacts in the S3 bucket and the registry,
the Kubernetes template accepted by the Prefect server, prefect.yaml deployed and run by a
worker, and `down` leaving no listening port. The tests that need a registered champion ask
for the module's `deployment_run`; the last test stops the stack (the session fixture stops
it again if that test is skipped), so every other file of this directory must sort before
this one (one worker runs the directory in file order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import pytest

# Bound at import: loading a models-from-code pyfunc in this process (the deployment test) puts
# the model's own copy of `components` first on sys.path.
from components.registry.lock import lock_model_name
from components.registry.promotion import TAG, logged_model_id
from infra.team import supervisor as team

REPO_ROOT = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
# The shrunk config of the ops tests (tests/ops/ops_helpers.py TINY_TRAINING) on a small
# synthetic dataset (tests/conftest.py sizes).
TINY = ["data.source=synthetic", "data.synthetic.num_ads=120", "data.synthetic.image_size=96",
        "align.max_iter=20", "match.max_steps=4", "match.eval_every=2", "match.lr=0.0001", "benchmark.gallery_size=4"]

pytestmark = pytest.mark.slow


def _s3(env: dict[str, str]):
    import boto3

    return boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def _keys(env: dict[str, str], prefix: str) -> list[str]:
    listed = _s3(env).list_objects_v2(Bucket=team.BUCKET, Prefix=prefix)
    return [item["Key"] for item in listed.get("Contents", [])]


@pytest.mark.timeout(480)  # includes the session's `team up`
def test_team_up_every_service_healthy(team_stack, team_root):
    rows = team.status(team_root)
    assert [r.name for r in rows] == list(team.SERVICES)
    assert all(r.healthy for r in rows), rows
    assert all(s.port for n, s in team_stack.services.items() if n != "worker")
    state = json.loads((team_root / team.STATE_FILE).read_text())
    assert state["startup_seconds"] > 0
    cli = subprocess.run([sys.executable, "-m", "flows.cli", "team", "status", "--dir", str(team_root)],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert cli.stdout.count("healthy") == len(team.SERVICES)


@pytest.mark.timeout(120)
def test_no_secret_on_any_command_line(team_stack):
    """What `ps` shows every user: no process of the machine carries the stack's database
    password or S3 secret key in its arguments (MLflow gets its backend URI from the environment)."""
    secrets = [team_stack.secrets["postgres_password"], team_stack.secrets["s3_secret_key"]]
    assert team._running(team_stack.services["mlflow"])
    leaking = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # not a process, or gone
        if any(secret in command for secret in secrets):
            leaking.append(f"{entry.name}: {command[:200]}")
    assert not leaking


@pytest.mark.timeout(120)
def test_env_file_exports_every_url(team_stack, team_root):
    names = ["MLFLOW_TRACKING_URI", "PREFECT_API_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
             "AWS_SECRET_ACCESS_KEY", "ALIGNSEARCH_DVC_REMOTE_URL", "ALIGNSEARCH_DASK_ADDRESS"]
    script = f"source {team_root / team.ENV_FILE} && " + " && ".join(f'echo "{n}=${n}"' for n in names)
    shell = subprocess.run(["bash", "-c", script], env={"PATH": os.environ["PATH"]}, capture_output=True,
                           text=True, check=True, timeout=30)
    exported = dict(line.split("=", 1) for line in shell.stdout.splitlines())
    assert exported == {n: team.team_env(team_stack)[n] for n in names}
    assert all(exported.values())
    assert httpx.get(f"{exported['MLFLOW_TRACKING_URI']}/health", timeout=10).status_code == 200
    assert httpx.get(f"{exported['PREFECT_API_URL']}/health", timeout=10).status_code == 200
    assert team.BUCKET in {b["Name"] for b in _s3(exported).list_buckets()["Buckets"]}
    assert exported["ALIGNSEARCH_DVC_REMOTE_URL"].startswith(f"s3://{team.BUCKET}/")
    for url in (exported["MLFLOW_TRACKING_URI"], exported["PREFECT_API_URL"], exported["MLFLOW_S3_ENDPOINT_URL"]):
        assert url.startswith("http://127.0.0.1:")


@pytest.mark.timeout(120)
def test_the_team_dask_scheduler_runs_project_code(team_env):
    """flows/compute.py sends feature shards to ALIGNSEARCH_DASK_ADDRESS (the shard results are
    compared with the sequential ones in tests/code/test_distributed.py); here: the team's
    scheduler is that address and its worker runs the project's code."""
    from distributed import Client

    address = team_env["ALIGNSEARCH_DASK_ADDRESS"]
    assert address.startswith("tcp://127.0.0.1:")
    with Client(address, timeout=30) as client:
        assert len(client.scheduler_info()["workers"]) == 1
        # a builtin and a string travel (the worker cannot import this test module): the project imports there
        probe = "__import__('components.vision.parts', fromlist=['PartsConfig']).PartsConfig.__name__"
        assert client.submit(eval, probe, pure=False).result(timeout=60) == "PartsConfig"


class _Echo(mlflow.pyfunc.PythonModel):  # a minimal pyfunc model: nothing of the project needed
    def predict(self, context, model_input, params=None):
        return model_input


@pytest.mark.timeout(300)
def test_mlflow_on_postgres_artifacts_in_bucket_registry_alias(team_stack, team_env, monkeypatch, tmp_path):
    import psycopg2
    from mlflow import MlflowClient

    for key, value in team_env.items():
        monkeypatch.setenv(key, value)
    mlflow.set_tracking_uri(team_env["MLFLOW_TRACKING_URI"])
    mlflow.set_registry_uri(team_env["MLFLOW_TRACKING_URI"])
    # not mlflow.set_experiment: it would stay the process's active experiment for later tests
    experiment_id = mlflow.MlflowClient().create_experiment("team-smoke")
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_param("where", "postgres")
        mlflow.log_metric("ndcg_at_10", 0.5)
        mlflow.log_text("hello bucket", "notes/hello.txt")
        info = mlflow.pyfunc.log_model(name="model", python_model=_Echo(), pip_requirements=[])
    # the artifact went through the server's proxy into the bucket
    keys = _keys(team_env, "mlflow/")
    assert any(k.endswith(f"{run.info.run_id}/artifacts/notes/hello.txt") for k in keys), keys
    # the run is in Postgres
    pg = psycopg2.connect(team._pg_uri(team_stack, "mlflow"))
    with pg, pg.cursor() as cursor:
        cursor.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,))
        assert cursor.fetchone() == ("FINISHED",)
    pg.close()

    client = MlflowClient()
    version = mlflow.register_model(info.model_uri, "team-smoke-model")
    client.set_registered_model_alias("team-smoke-model", "champion", version.version)
    assert client.get_model_version_by_alias("team-smoke-model", "champion").version == version.version
    loaded = mlflow.pyfunc.load_model("models:/team-smoke-model@champion", dst_path=str(tmp_path))
    assert loaded is not None


@pytest.mark.timeout(120)
def test_kubernetes_gpu_pool_accepted_by_prefect_server(team_env):
    env = {**os.environ, "PREFECT_API_URL": team_env["PREFECT_API_URL"]}
    done = subprocess.run([*PREFECT, "work-pool", "create", "alignsearch-k8s", "--type", "kubernetes",
                           "--base-job-template", str(REPO_ROOT / "infra" / "k8s" / "base-job-template.json")],
                          env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr
    pool = httpx.get(f"{team_env['PREFECT_API_URL']}/work_pools/alignsearch-k8s", timeout=10).json()
    assert pool["type"] == "kubernetes"
    assert pool["base_job_template"]["variables"]["properties"]["gpu_count"]["default"] == 0


def _flow_runs(api: str, deployment_id: str) -> list[dict]:
    return httpx.post(f"{api}/flow_runs/filter", json={"flow_runs": {"deployment_id": {"any_": [deployment_id]}}},
                      timeout=10).json()


@pytest.fixture(scope="module")
def deployment_run(team_stack, team_root, tmp_path_factory) -> dict:
    """prefect.yaml cloned from a file:// repository of the current commit: deploy, run, and
    a `--run-once` process worker retrains against the team's MLflow. Done once per module;
    the tests that need the registered champion ask for it, so none depends on test order."""
    team_env = team.team_env(team_stack)
    tmp_path = tmp_path_factory.mktemp("deployment")
    # The team's worker would take the run itself: stop it so `--run-once` gets it.
    team._stop_group(team_stack.services["worker"])
    repo = tmp_path / "alignsearch.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(REPO_ROOT), str(repo)], check=True, timeout=120)
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", repo.as_uri(), str(checkout)], check=True, timeout=120)
    worker_env = {**team.worker_env(team_stack, team_root), "ALIGNSEARCH_REPO": repo.as_uri()}
    cli_env = {**os.environ, **team_env, "ALIGNSEARCH_REPO": repo.as_uri(), "PREFECT_HOME": str(tmp_path / "prefect")}

    deployed = subprocess.run([*PREFECT, "--no-prompt", "deploy", "--all"], cwd=checkout, env=cli_env,
                              capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]
    started = subprocess.run([*PREFECT, "deployment", "run", "alignsearch-retrain-and-promote/weekly-retrain",
                              "--params", json.dumps({"overrides": TINY})], env=cli_env, capture_output=True,
                             text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr

    began = time.monotonic()
    worker = subprocess.run([worker_env["ALIGNSEARCH_WORKER_PYTHON"], "-m", "prefect", "worker", "start", "--pool",
                             team.POOL, "--type", "process", "--run-once"], env=worker_env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=1100)
    seconds = time.monotonic() - began
    print(f"\ndeployment run through the --run-once worker: {seconds:.1f} s")
    (team_root.parent / "deployment_run_seconds.txt").write_text(f"{seconds:.1f}\n")
    api = team_env["PREFECT_API_URL"]
    [deployment] = httpx.post(f"{api}/deployments/filter",
                              json={"deployments": {"name": {"any_": ["weekly-retrain"]}}}, timeout=10).json()
    states = [run["state"]["type"] for run in _flow_runs(api, deployment["id"]) if run["state"]["type"] != "SCHEDULED"]
    assert states == ["COMPLETED"], f"{states}\n{worker.stdout[-4000:]}\n{worker.stderr[-4000:]}"
    return {"seconds": seconds}


@pytest.mark.timeout(1200)  # includes the module's deployment run
def test_prefect_yaml_deployment_runs_on_a_worker_and_registers(deployment_run, team_env, tmp_path):
    """The worker's venv over the project's packages retrained on a tiny synthetic dataset:
    the run is COMPLETED, version 1 is challenger then champion, its artifacts are in the bucket,
    and the promoted model answers from the server's registry."""
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(team_env["MLFLOW_TRACKING_URI"])
    client = MlflowClient(tracking_uri=team_env["MLFLOW_TRACKING_URI"], registry_uri=team_env["MLFLOW_TRACKING_URI"])
    challenger = client.get_model_version_by_alias("alignsearch", "challenger")
    champion = client.get_model_version_by_alias("alignsearch", "champion")
    assert challenger.version == champion.version == "1"
    run = client.get_run(challenger.run_id)
    assert run.data.tags.get("dataset_hash")
    keys = _keys(team_env, "mlflow/")
    assert any(challenger.run_id in k for k in keys), "the run's artifacts are not in the bucket"
    # the promoted model answers from the server's registry and the bucket
    import pandas as pd

    mlflow.set_registry_uri(team_env["MLFLOW_TRACKING_URI"])
    model = mlflow.pyfunc.load_model("models:/alignsearch@champion", dst_path=str(tmp_path))  # not a /tmp leftover
    hits = model.predict(pd.DataFrame({"query": ["red"], "k": [3]}))
    assert 0 < len(hits) <= 3 and {"ad_id", "score"} <= set(hits.columns)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=alignsearch-test", "-c", "user.email=test@localhost", *args], cwd=cwd,
                   check=True, capture_output=True, text=True, timeout=60)


def _dvc(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, f"dvc {' '.join(args)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done


@pytest.mark.timeout(300)
def test_dvc_push_to_the_s3_remote_and_pull_into_a_fresh_clone(team_env, synthetic_dataset_dir, tmp_path):
    """The README's team remote (`ALIGNSEARCH_DVC_REMOTE_URL`, endpoint from `.team/env`, dvc-s3):
    a dataset pushed from one clone is pulled into another with the same DVC hash."""
    import shutil

    import yaml

    from components.data.format import dataset_hash

    env = {**os.environ, **team_env, "DVC_NO_ANALYTICS": "1"}
    origin = tmp_path / "origin"
    origin.mkdir()
    _git("init", "-q", cwd=origin)
    _dvc("init", "-q", cwd=origin, env=env)
    shutil.copytree(synthetic_dataset_dir, origin / "data" / "synthetic")
    _dvc("add", "-q", "data/synthetic", cwd=origin, env=env)
    _git("add", "-A", cwd=origin)
    _git("commit", "-q", "-m", "dataset", cwd=origin)

    def use_team_remote(repo: Path) -> None:  # the README's two commands (--local: not committed)
        _dvc("remote", "add", "-d", "--local", "team", team_env["ALIGNSEARCH_DVC_REMOTE_URL"], cwd=repo, env=env)
        _dvc("remote", "modify", "--local", "team", "endpointurl", team_env["MLFLOW_S3_ENDPOINT_URL"], cwd=repo,
             env=env)

    use_team_remote(origin)
    _dvc("push", "-q", cwd=origin, env=env)
    assert any(k.startswith("dvc/files/md5/") for k in _keys(team_env, "dvc/")), "nothing pushed to the bucket"

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True, timeout=60)
    assert not (clone / "data" / "synthetic").exists()
    use_team_remote(clone)
    _dvc("pull", "-q", cwd=clone, env=env)
    pinned = yaml.safe_load((clone / "data" / "synthetic.dvc").read_text())["outs"][0]["md5"]
    assert dataset_hash(clone / "data" / "synthetic") == dataset_hash(synthetic_dataset_dir) == pinned


def _decision_files(client, version) -> list[str]:
    model_id = logged_model_id(version)
    listed = client.list_logged_model_artifacts(model_id, "promotion") if model_id else []
    return sorted(item.path for item in listed if item.path.rsplit("/", 1)[-1].startswith("decision-"))


@pytest.mark.timeout(1200)  # includes the deployment run when it is the first to ask for it
def test_two_concurrent_promotions_on_the_server_leave_one_champion_and_one_record(deployment_run, team_env,
                                                                                  synthetic_dataset_dir, tmp_path):
    """Two `alignsearch promote` processes at once against the MLflow server (Postgres store):
    the registry lock lets one decide; the other waits and finds the work done. One champion,
    one decision record for the challenger, and the lock model is gone afterwards."""
    from mlflow import MlflowClient

    uri = team_env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    v1 = client.get_model_version_by_alias("alignsearch", "champion")  # from the deployment run
    tags = {k: v for k, v in (v1.tags or {}).items() if not k.startswith(TAG)}
    v2 = client.create_model_version("alignsearch", v1.source, run_id=v1.run_id, tags=tags,
                                     model_id=logged_model_id(v1))
    # No champion yet and v2 the challenger: whichever promotion decides promotes v2.
    client.delete_registered_model_alias("alignsearch", "champion")
    client.set_registered_model_alias("alignsearch", "challenger", v2.version)
    before = _decision_files(client, v2)
    env = {**os.environ, **team_env}
    # The dataset the deployment trained on (TINY: the same generator, size and seed), by absolute path.
    command = [sys.executable, "-m", "flows.cli", "promote", "--data", str(synthetic_dataset_dir),
               "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    procs = [subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    import re

    said = sorted(match.group(1) for o in outputs if (match := re.search(r"Promotion: (\w+)", o)))
    assert said == ["promoted", "unchanged"], outputs  # the second waited, then found v2 champion

    assert client.get_model_version_by_alias("alignsearch", "champion").version == v2.version
    v2 = client.get_model_version("alignsearch", v2.version)
    assert v2.tags[f"{TAG}.outcome"] == "promoted"
    new = [f for f in _decision_files(client, v2) if f not in before]
    assert new == [f"promotion/decision-{v2.tags[f'{TAG}.key']}.json"], new
    names = [m.name for m in client.search_registered_models()]
    assert lock_model_name("alignsearch", "promotion") not in names


@pytest.mark.timeout(1200)  # likewise
def test_alignsearch_serve_answers_from_the_team_registry(deployment_run, team_env, tmp_path):
    """`alignsearch serve` with `.team/env`: models:/alignsearch@champion from the server and the
    bucket, over HTTP."""
    port = _free_port()
    env = {**os.environ, **team_env}
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(port),
                                 "--model-uri", "models:/alignsearch@champion",  # its searches logged in tmp
                                 "--set", f"traffic.store_uri=sqlite:///{tmp_path / 'traffic.db'}"],
                                cwd=REPO_ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = httpx.get(f"{base}/health", timeout=5)
                if health.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert health is not None and health.status_code == 200, \
            f"alignsearch serve did not become healthy (exit {proc.poll()}):\n{log_path.read_text()[-3000:]}"
        from mlflow import MlflowClient

        champion = MlflowClient(tracking_uri=team_env["MLFLOW_TRACKING_URI"],
                                registry_uri=team_env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias(
            "alignsearch", "champion")
        assert str(health.json()["version"]) == str(champion.version)
        found = httpx.get(f"{base}/search", params={"q": "red", "k": 3}, timeout=30)
        assert found.status_code == 200, found.text
        hits = found.json()["results"]
        assert 0 < len(hits) <= 3 and all("ad_id" in h for h in hits)
    finally:
        import contextlib
        import signal

        with contextlib.suppress(ProcessLookupError):  # it may have exited on its own (the assert says why)
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.timeout(180)
def test_team_down_leaves_no_listening_port(team_stack, team_root):
    ports = [s.port for s in team_stack.services.values() if s.port]
    stopped = team.down(team_root)
    assert stopped == list(reversed(team.SERVICES))
    assert not [p for p in ports if team._listening(p)]
    assert not any(r.running for r in team.status(team_root))
    for service in team_stack.services.values():
        if service.pid and service.name != "postgres":
            assert not team._group_members(service.pid), service.name
