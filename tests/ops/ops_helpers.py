"""Helpers of the operations tests (importable: the tests' directory is on sys.path)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import mlflow
import pytest

from components.config import Params, load_params

TINY_TRAINING = ["align.max_iter=20", "match.max_steps=4", "match.eval_every=2", "match.lr=0.0001",
                 "benchmark.gallery_size=4"]


def ops_params(root: Path, dataset_dir: Path, *overrides: str) -> Params:
    """Params for a flow run whose every output (stages, MLflow store, caches) is under `root`."""
    return load_params(None, [
        f"data.path={dataset_dir}", f"data.cache_dir={root / 'cache'}", f"paths.flow_dir={root / 'flow'}",
        f"registry.tracking_uri={tracking_uri(root)}",
        f"registry.artifact_location={root / 'mlruns' / 'artifacts'}",
        # promotion reads the traffic log: this store's own, never the repository's
        f"traffic.store_uri=sqlite:///{root / 'traffic.db'}", f"traffic.dataset_dir={root / 'live'}",
        *TINY_TRAINING, *overrides])


def tracking_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"


def as_flow_params(cfg: Params) -> dict:
    return cfg.model_dump(mode="json", by_alias=True)


def fresh_env(root: Path) -> dict[str, str]:
    """The environment of a child process pointed at the test store."""
    return {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(root)}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def relocate_store(root: Path, old_root: Path) -> None:
    """Make a copied store (`old_root` copied to `root`) self-contained: every path under
    `old_root` recorded in its MLflow database (artifact locations, model sources, params)
    now points under `root`."""
    import sqlite3

    db = root / "mlruns" / "mlflow.db"
    old, new = str(old_root), str(root)
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")]
        for table in tables:
            for column in conn.execute(f'pragma table_info("{table}")').fetchall():
                name, kind = column[1], (column[2] or "").upper()
                if any(t in kind for t in ("CHAR", "TEXT", "CLOB")):
                    conn.execute(f'update "{table}" set "{name}" = replace("{name}", ?, ?) '
                                 f'where "{name}" like ?', (old, new, f"%{old}%"))


def relocate_paths(value, old_root: Path, root: Path):
    """`value` (JSON-able) with every path under `old_root` moved under `root`."""
    import json

    return json.loads(json.dumps(value).replace(str(old_root), str(root)))


def start_serve(root: Path, model_uri: str, sets: list[str], *, cwd: Path, log_path: Path,
                timeout_s: float = 240) -> tuple[subprocess.Popen, str]:
    """`alignsearch serve` of `model_uri` in a child process on a free port (`--set` each of
    `sets`; output to `log_path`), once its /health answers 200: (process, base URL). Fails the
    test with the end of the log when it exits or does not come up in `timeout_s`."""
    port = free_port()
    with log_path.open("w") as log:  # the child keeps its own handle
        server = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(port),
                                   "--model-uri", model_uri, *[arg for item in sets for arg in ("--set", item)]],
                                  env=fresh_env(root), cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail("`alignsearch serve` did not come up:\n" + log_path.read_text()[-3000:])
        time.sleep(0.3)


def decision_records(model_uri: str, folder: str) -> list[dict]:
    """The decision records (`<folder>/decision-*.json`, by file name) a registered model version
    carries: `folder` is "promotion" or "rollback"."""
    with tempfile.TemporaryDirectory() as scratch:  # mlflow's default would be a /tmp directory nobody removes
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=scratch))
        return [json.loads(p.read_text()) for p in sorted((local / folder).glob("decision-*.json"))]
