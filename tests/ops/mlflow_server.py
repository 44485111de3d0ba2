"""A real `mlflow server` on 127.0.0.1 for a test (importable: the tests' directory is on
sys.path): a server store takes the registry's lock-model path (`components.registry.lock`),
which a sqlite store in-process never does."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from ops_helpers import free_port


@contextlib.contextmanager
def mlflow_server(root: Path, backend_uri: str, timeout_s: float = 120.0) -> Iterator[str]:
    """Serve `backend_uri` (e.g. a test's sqlite store) until the block ends; yields the URL.
    The backend URI reaches the server through its environment, as team mode does."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": backend_uri}
    env.pop("MLFLOW_TRACKING_URI", None)
    log_path = root / f"mlflow-server-{port}.log"
    mlflow = Path(sys.executable).parent / "mlflow"
    with log_path.open("ab") as log:
        process = subprocess.Popen([str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                   cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start (exit {process.poll()}):\n"
                                   f"{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
