"""The team stack of infra/compose.yaml on one machine, without Docker: start, stop and
report local binaries bound to 127.0.0.1 (`alignsearch team up|down|status` calls this).

PostgreSQL (the image's /usr/lib/postgresql/15/bin, through `runuser -u postgres` when
root), an S3 endpoint (`minio` when on PATH, else `moto_server`, in memory), the MLflow
tracking server (Postgres backend, proxied S3 artifacts), the Prefect server (on Postgres),
a Dask scheduler with one worker (the fan-out compute of flows/compute.py; its address is
`ALIGNSEARCH_DASK_ADDRESS` in `env`) and a process worker on pool `alignsearch`. State, logs
and `env` live in `.team/`; every process runs in its own session so `down` can stop its
whole group (MLflow's job runners survive a SIGTERM to the main process otherwise).

A process supervisor, not a Prefect flow: it imports nothing of `components` or `flows`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "state.json"
ENV_FILE = "env"
BUCKET = "alignsearch"
POOL = "alignsearch"
# start order; `down` reverses it
SERVICES = ("postgres", "s3", "mlflow", "prefect", "dask-scheduler", "dask-worker", "worker")
DASK_SERVICES = ("dask-scheduler", "dask-worker")
PG_BIN = Path(os.environ.get("ALIGNSEARCH_PG_BIN", "/usr/lib/postgresql/15/bin"))
HOST = "127.0.0.1"


class TeamError(RuntimeError):
    """A service could not start or stop; the message names it and says why."""

    def __init__(self, service: str, reason: str):
        super().__init__(f"{service}: {reason}")
        self.service = service


@dataclass
class Service:
    name: str
    port: int
    pid: int | None = None  # the session leader = process group id
    log: str = ""
    health: str = ""  # URL answered with 200 when healthy ("" = TCP check)


@dataclass
class TeamState:
    root: str
    services: dict[str, Service] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    started_at: float = 0.0
    startup_seconds: float | None = None

    def save(self) -> None:
        write_private(Path(self.root) / STATE_FILE, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, root: Path) -> TeamState | None:
        path = Path(root) / STATE_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        raw["services"] = {k: Service(**v) for k, v in raw["services"].items()}
        return cls(**raw)


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only from the first byte: a scratch file
    created with mode 0600 (not chmod-ed after the write), then renamed over `path`."""
    path = Path(path)
    scratch = path.with_name(f".{path.name}.tmp")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # a leftover scratch file keeps the mode it was created with
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(scratch, path)


# --------------------------------------------------------------------------- processes


def _bin(name: str) -> str:
    """A console script of this environment (beside the interpreter), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(name)
    return found


def _require(service: str, path: str | Path) -> str:
    if not Path(path).exists() or not os.access(path, os.X_OK):
        raise TeamError(service, f"binary {path} not found or not executable")
    return str(path)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _check_bindable(service: str, port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            raise TeamError(service, f"cannot bind {HOST}:{port} ({exc.strerror or exc})") from exc


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _proc_state(pid: int) -> str | None:
    """The /proc state letter of `pid` (None if gone); zombies count as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state = stat.rsplit(")", 1)[1].split()[0]
    return None if state in ("Z", "X") else state


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child (started by another `team up` process)


def _spawn(service: Service, command: list[str], env: dict[str, str], root: Path) -> subprocess.Popen:
    log = root / "logs" / f"{service.name}.log"
    service.log = str(log)
    with log.open("ab") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, cwd=root)
    service.pid = process.pid
    return process


def _log_tail(service: Service, lines: int = 15) -> str:
    try:
        return "\n".join(Path(service.log).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _healthy(service: Service) -> bool:
    if not service.health:
        return _listening(service.port)
    import httpx

    try:
        return httpx.get(service.health, timeout=3).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_healthy(services: list[tuple[Service, subprocess.Popen | None]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = list(services)
    while pending:
        for item in list(pending):
            service, process = item
            if _healthy(service):
                pending.remove(item)
            elif process is not None and process.poll() is not None:
                raise TeamError(service.name, f"exited with code {process.returncode} before it was healthy "
                                f"(log {service.log}):\n{_log_tail(service)}")
        if pending and time.monotonic() > deadline:
            names = ", ".join(s.name for s, _ in pending)
            raise TeamError(names, f"not healthy after {timeout:.0f} s (logs under {Path(pending[0][0].log).parent}):\n"
                            f"{_log_tail(pending[0][0])}")
        if pending:
            time.sleep(0.5)


def _stop_group(service: Service, grace: float = 20.0) -> None:
    if not service.pid:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(service.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5)
        while time.monotonic() < deadline:
            _reap(service.pid)
            if not _group_members(service.pid):
                break
            time.sleep(0.2)
        else:
            continue
        break
    _reap(service.pid)


# --------------------------------------------------------------------------- services


def _as_postgres(command: list[str]) -> list[str]:
    """initdb/pg_ctl refuse to run as root: run them as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _pg_uri(state: TeamState, database: str, driver: str = "postgresql") -> str:
    port = state.services["postgres"].port
    return f"{driver}://postgres:{state.secrets['postgres_password']}@{HOST}:{port}/{database}"


def _start_postgres(state: TeamState, root: Path) -> None:
    service = state.services["postgres"]
    initdb, pg_ctl = _require("postgres", PG_BIN / "initdb"), _require("postgres", PG_BIN / "pg_ctl")
    pg_dir = root / "postgres"
    data = pg_dir / "data"
    pg_dir.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            raise TeamError("postgres", "running as root needs `runuser` to start PostgreSQL as user postgres")
        shutil.chown(pg_dir, "postgres", "postgres")
        if subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(pg_dir)], timeout=30).returncode:
            raise TeamError("postgres", f"user postgres cannot write {pg_dir} (is a parent directory "
                            "closed to other users? use a state dir under a world-searchable path)")
    if not (data / "PG_VERSION").exists():
        pwfile = pg_dir / "pwfile"
        write_private(pwfile, state.secrets["postgres_password"] + "\n")
        if os.geteuid() == 0:
            shutil.chown(pwfile, "postgres", "postgres")
        done = subprocess.run(_as_postgres([initdb, "-D", str(data), "-U", "postgres", "--auth=scram-sha-256",
                                            f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"]),
                              capture_output=True, text=True, timeout=120)
        pwfile.unlink()
        if done.returncode:
            raise TeamError("postgres", f"initdb failed:\n{done.stderr[-2000:]}")
    service.log = str(pg_dir / "server.log")
    options = f"-p {service.port} -c listen_addresses={HOST} -c unix_socket_directories='' -c fsync=off"
    done = subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-l", service.log, "-w", "-t", "60",
                                        "-o", options, "start"]), capture_output=True, text=True, timeout=90)
    if done.returncode:
        raise TeamError("postgres", f"pg_ctl start failed:\n{done.stdout[-1000:]}{done.stderr[-1000:]}\n"
                        f"{_log_tail(service)}")
    service.pid = int((data / "postmaster.pid").read_text().split()[0])
    import psycopg2

    connection = psycopg2.connect(_pg_uri(state, "postgres"))
    connection.autocommit = True
    with connection.cursor() as cursor:
        for database in ("mlflow", "prefect"):
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
            if cursor.fetchone() is None:
                cursor.execute(f'CREATE DATABASE "{database}"')
    connection.close()


def _stop_postgres(root: Path, service: Service) -> None:
    data = root / "postgres" / "data"
    if (data / "postmaster.pid").exists():
        subprocess.run(_as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=90)
    if service.pid and _proc_state(service.pid):
        os.kill(service.pid, signal.SIGKILL)


def s3_env(state: TeamState) -> dict[str, str]:
    endpoint = f"http://{HOST}:{state.services['s3'].port}"
    return {"MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint,
            "AWS_ACCESS_KEY_ID": state.secrets["s3_access_key"],
            "AWS_SECRET_ACCESS_KEY": state.secrets["s3_secret_key"], "AWS_DEFAULT_REGION": "us-east-1"}


def _start_s3(state: TeamState, root: Path, base_env: dict[str, str], timeout: float) -> None:
    service = state.services["s3"]
    service.health = ""
    minio = shutil.which("minio")
    if minio:  # a real S3 server keeps the bucket on disk
        (root / "minio").mkdir(exist_ok=True)
        env = {**base_env, "MINIO_ROOT_USER": state.secrets["s3_access_key"],
               "MINIO_ROOT_PASSWORD": state.secrets["s3_secret_key"]}
        command = [minio, "server", str(root / "minio"), "--address", f"{HOST}:{service.port}"]
        service.health = f"http://{HOST}:{service.port}/minio/health/live"
    else:  # the stand-in: an in-memory S3 endpoint
        try:
            command = [_bin("moto_server"), "-H", HOST, "-p", str(service.port)]
        except FileNotFoundError as exc:
            raise TeamError("s3", "neither `minio` nor `moto_server` (pip install 'moto[server]') found") from exc
        env = base_env
    process = _spawn(service, command, env, root)
    _wait_healthy([(service, process)], timeout)
    import boto3

    s3 = s3_env(state)
    client = boto3.client("s3", endpoint_url=s3["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id=s3["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=s3["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)


def dask_address(state: TeamState) -> str | None:
    scheduler = state.services.get("dask-scheduler")
    return f"tcp://{HOST}:{scheduler.port}" if scheduler else None


def _dask_workers(state: TeamState) -> int:
    """Workers the scheduler knows (its /json/counts.json; 0 when it does not answer)."""
    import httpx

    health = state.services["dask-scheduler"].health
    try:
        return int(httpx.get(health.replace("/health", "/json/counts.json"), timeout=3).json().get("workers", 0))
    except (httpx.HTTPError, ValueError, AttributeError):
        return 0


def _start_dask(state: TeamState, root: Path, base_env: dict[str, str], timeout: float) -> None:
    """`dask scheduler` and one `dask worker` (threads = cores), both on 127.0.0.1, each with
    its HTTP /health on a port of its own (the dashboards need bokeh, the health routes do not)."""
    scheduler, worker = state.services["dask-scheduler"], state.services["dask-worker"]
    try:
        dask = _bin("dask")
    except FileNotFoundError as exc:
        raise TeamError("dask-scheduler", "`dask` (pip install distributed) not found") from exc
    scheduler_http, worker_http = free_port(), free_port()
    scheduler.health = f"http://{HOST}:{scheduler_http}/health"
    worker.health = f"http://{HOST}:{worker_http}/health"
    process = _spawn(scheduler, [dask, "scheduler", "--host", HOST, "--port", str(scheduler.port),
                                 "--dashboard-address", f"{HOST}:{scheduler_http}"], base_env, root)
    _wait_healthy([(scheduler, process)], timeout)
    process = _spawn(worker, [dask, "worker", dask_address(state), "--host", HOST, "--worker-port", str(worker.port),
                              "--dashboard-address", f"{HOST}:{worker_http}", "--nworkers", "1",
                              "--nthreads", str(os.cpu_count() or 1), "--no-nanny"], base_env, root)
    _wait_healthy([(worker, process)], timeout)
    deadline = time.monotonic() + timeout
    while not _dask_workers(state):
        if time.monotonic() > deadline:
            raise TeamError("dask-worker", f"not registered with the scheduler after {timeout:.0f} s:\n"
                            f"{_log_tail(worker)}")
        time.sleep(0.5)


def team_env(state: TeamState) -> dict[str, str]:
    """What a shell (or the worker) needs to use the stack: `.team/env` holds exactly this."""
    env = {
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{state.services['mlflow'].port}",
        "PREFECT_API_URL": f"http://{HOST}:{state.services['prefect'].port}/api",
        **s3_env(state),
        "ALIGNSEARCH_DVC_REMOTE_URL": f"s3://{BUCKET}/dvc",
    }
    if dask_address(state):
        env["ALIGNSEARCH_DASK_ADDRESS"] = dask_address(state)
    return env


def _worker_python(root: Path) -> Path:
    """A venv for the worker layered over this environment's packages: a deployment's pull
    step (`pip install -e .` of its clone) installs into it, never into the project's venv."""
    venv = root / "worker-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
        import site

        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        (venv / "lib" / version / "site-packages" / "_alignsearch_base.pth").write_text(
            "\n".join(site.getsitepackages()) + "\n")
    return python


def _start_servers(state: TeamState, root: Path, base_env: dict[str, str], timeout: float) -> None:
    mlflow, prefect = state.services["mlflow"], state.services["prefect"]
    try:
        mlflow_bin, prefect_bin = _bin("mlflow"), _bin("prefect")
    except FileNotFoundError as exc:
        raise TeamError("mlflow" if "mlflow" in str(exc) else "prefect", f"`{exc}` not found beside {sys.executable}"
                        " or on PATH") from exc
    mlflow.health = f"http://{HOST}:{mlflow.port}/health"
    prefect.health = f"http://{HOST}:{prefect.port}/api/health"
    # The database URI (with its password) goes through the environment, never argv: any user
    # sees a command line in `ps`. MLflow reads --backend-store-uri from MLFLOW_BACKEND_STORE_URI.
    mlflow_process = _spawn(mlflow, [
        mlflow_bin, "server", "--host", HOST, "--port", str(mlflow.port), "--workers", "1",
        "--artifacts-destination", f"s3://{BUCKET}/mlflow", "--serve-artifacts",
    ], {**base_env, **s3_env(state), "MLFLOW_BACKEND_STORE_URI": _pg_uri(state, "mlflow")}, root)
    prefect_env = {**base_env, "PREFECT_API_DATABASE_CONNECTION_URL": _pg_uri(state, "prefect", "postgresql+asyncpg")}
    prefect_env.pop("PREFECT_API_URL", None)
    prefect_process = _spawn(prefect, [prefect_bin, "server", "start", "--host", HOST, "--port", str(prefect.port)],
                             prefect_env, root)
    _wait_healthy([(mlflow, mlflow_process), (prefect, prefect_process)], timeout)


def _worker_online(api: str) -> bool:
    import httpx

    try:
        workers = httpx.post(f"{api}/work_pools/{POOL}/workers/filter", json={}, timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return False
    return isinstance(workers, list) and any(w.get("status") == "ONLINE" for w in workers)


def _start_worker(state: TeamState, root: Path, base_env: dict[str, str], timeout: float) -> None:
    service = state.services["worker"]
    env = worker_env(state, root, base_env)
    created = subprocess.run([env["ALIGNSEARCH_WORKER_PYTHON"], "-m", "prefect", "work-pool", "create", POOL,
                              "--type", "process"], env=env, capture_output=True, text=True, timeout=120)
    if created.returncode and "already exists" not in created.stdout + created.stderr:
        raise TeamError("worker", f"could not create work pool {POOL}:\n{created.stdout[-1000:]}{created.stderr[-1000:]}")
    process = _spawn(service, [env["ALIGNSEARCH_WORKER_PYTHON"], "-m", "prefect", "worker", "start", "--pool", POOL,
                               "--type", "process", "--name", "team-worker"], env, root)
    api = team_env(state)["PREFECT_API_URL"]
    deadline = time.monotonic() + timeout
    while not _worker_online(api):
        if process.poll() is not None:
            raise TeamError("worker", f"exited with code {process.returncode} (log {service.log}):\n{_log_tail(service)}")
        if time.monotonic() > deadline:
            raise TeamError("worker", f"not online in pool {POOL} after {timeout:.0f} s:\n{_log_tail(service)}")
        time.sleep(0.5)


def worker_env(state: TeamState, root: Path, base_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a process worker on this stack (also for `prefect worker start
    --run-once` in tests): the team variables and the worker venv first on PATH."""
    python = _worker_python(root)
    env = {**(base_env or os.environ), **team_env(state), "PREFECT_HOME": str(root / "prefect")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["ALIGNSEARCH_WORKER_PYTHON"] = str(python)
    env.pop("VIRTUAL_ENV", None)
    return env


# --------------------------------------------------------------------------- up, down, status


def up(root: Path = Path(".team"), ports: dict[str, int] | None = None, timeout: float = 240.0,
       worker: bool = True, dask: bool = True) -> TeamState:
    """Start every service, wait until each is healthy, write `state.json` and `env`.

    On any failure the services already started are stopped and `TeamError` names the one
    that failed and why."""
    root = Path(root).resolve()
    previous = TeamState.load(root)
    if previous and any(_running(s) for s in previous.services.values()):
        raise TeamError("team", f"already running from {root} (alignsearch team down first)")
    (root / "logs").mkdir(parents=True, exist_ok=True)
    (root / "prefect").mkdir(exist_ok=True)
    kept = previous.secrets if previous else {}
    state = TeamState(root=str(root), started_at=time.time(), secrets={
        "postgres_password": kept.get("postgres_password") or secrets.token_urlsafe(18),
        "s3_access_key": kept.get("s3_access_key") or "alignsearch",
        "s3_secret_key": kept.get("s3_secret_key") or secrets.token_urlsafe(24)})
    names = [n for n in SERVICES if (worker or n != "worker") and (dask or n not in DASK_SERVICES)]
    ports = dict(ports or {})
    for name in names:
        port = ports.get(name) or (free_port() if name != "worker" else 0)
        if port:
            _check_bindable(name, port)
        state.services[name] = Service(name=name, port=port)
    base_env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    base_env.pop("MLFLOW_TRACKING_URI", None)
    start = time.monotonic()
    state.save()
    try:
        _start_postgres(state, root)
        state.save()
        _start_s3(state, root, base_env, timeout)
        state.save()
        _start_servers(state, root, base_env, timeout)
        state.save()
        if dask:
            _start_dask(state, root, base_env, timeout)
            state.save()
        if worker:
            _start_worker(state, root, base_env, timeout)
    except BaseException:
        state.save()
        down(root)
        raise
    state.startup_seconds = round(time.monotonic() - start, 1)
    state.save()
    write_env(state)
    return state


def write_env(state: TeamState) -> Path:
    """`.team/env` (`team_env` as shell exports; it holds the S3 secret key): private to its owner."""
    path = Path(state.root) / ENV_FILE
    write_private(path, "".join(f"export {k}={v}\n" for k, v in team_env(state).items()))
    return path


def _running(service: Service) -> bool:
    return bool(service.pid and _proc_state(service.pid))


def down(root: Path = Path(".team")) -> list[str]:
    """Stop every service `up` started (whole process groups); returns their names."""
    root = Path(root).resolve()
    state = TeamState.load(root)
    if state is None:
        return []
    stopped = []
    for name in reversed(SERVICES):
        service = state.services.get(name)
        if service is None:
            continue
        if name == "postgres":
            _stop_postgres(root, service)
        else:
            _stop_group(service)
        stopped.append(name)
        service.pid = None
    state.save()
    busy = [f"{s.name}:{s.port}" for s in state.services.values() if s.port and _listening(s.port)]
    if busy:
        raise TeamError("team", f"still listening after down: {', '.join(busy)}")
    return stopped


@dataclass
class ServiceStatus:
    name: str
    port: int
    pid: int | None
    running: bool
    healthy: bool
    url: str


def status(root: Path = Path(".team")) -> list[ServiceStatus]:
    state = TeamState.load(Path(root).resolve())
    if state is None:
        return []
    out = []
    api = team_env(state)["PREFECT_API_URL"] if "prefect" in state.services else ""
    for name in SERVICES:
        service = state.services.get(name)
        if service is None:
            continue
        running = _running(service)
        if name == "worker":
            healthy = running and _worker_online(api)
            url = f"pool {POOL}"
        elif name == "dask-worker":
            healthy = running and _healthy(service) and _dask_workers(state) > 0
            url = f"{dask_address(state)} ({service.health})"
        else:
            healthy = running and _healthy(service)
            url = service.health or f"{HOST}:{service.port}"
        out.append(ServiceStatus(name, service.port, service.pid, running, healthy, url))
    return out
