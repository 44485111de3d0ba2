"""`alignsearch bench-serve`: start a real `alignsearch serve` on 127.0.0.1 (a free port), load
it (N requests at a concurrency), sweep bad inputs, stop it, and write a small report."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from components.search.config import API_KEY_ENV
from components.search.load import bad_input_sweep, run_load

# Queries a user might type (the catalogue is clip art); the load cycles through them.
DEFAULT_QUERIES = ["christmas tree", "red car", "star", "cat", "flower", "house", "tree box", "blue bird",
                   "sun", "heart", "dog", "book", "apple", "music note", "airplane", "boat"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def key_headers(env: dict | None = None) -> dict[str, str]:
    """The API key header of a service started with `env` (every route but the page needs it)."""
    key = (env or {}).get(API_KEY_ENV) or os.environ.get(API_KEY_ENV)
    return {"X-API-Key": key} if key else {}


def start_server(serve_args: list[str], port: int, log_path: Path, *, env: dict | None = None,
                 wait_s: float = 300) -> subprocess.Popen:
    """`alignsearch serve` in a child process; returns once /health answers 200."""
    import httpx

    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("w")
    process = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--host", "127.0.0.1",
                                "--port", str(port), *serve_args], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})}, start_new_session=True)
    headers = key_headers(env)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", headers=headers, timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_server(process)
            raise RuntimeError(f"`alignsearch serve` did not come up (exit {process.poll()}); see {log_path}:\n"
                               + log_path.read_text()[-2000:])
        time.sleep(0.5)


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def bench_serve(serve_args: list[str], out_dir: Path, *, requests: int = 2000, concurrency: int = 8, k: int = 10,
                queries: list[str] | None = None, env: dict | None = None) -> dict:
    """Run the benchmark; writes `bench_serve.json` and `bench_serve.md` into `out_dir`."""
    import httpx

    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    started = time.perf_counter()
    process = start_server(serve_args, port, out_dir / "serve.log", env=env)
    try:
        up_s = time.perf_counter() - started
        headers = key_headers(env) or None
        health = httpx.get(f"{base}/health", headers=headers, timeout=5).json()
        run_load(base, queries or DEFAULT_QUERIES, requests=min(50, requests), concurrency=concurrency, k=k,
                 headers=headers)  # warm-up, not reported
        load = run_load(base, queries or DEFAULT_QUERIES, requests=requests, concurrency=concurrency, k=k,
                        headers=headers)
        sweep = bad_input_sweep(base, headers=headers)
    finally:
        stop_server(process)
    report = {"model": health, "startup_s": round(up_s, 1), "k": k,
              "load": {**asdict(load), "throughput_rps": round(load.throughput, 1)},
              "bad_inputs": sweep, "bad_inputs_failed": [c["name"] for c in sweep if not c["ok"]],
              "threads": os.environ.get("OMP_NUM_THREADS", "default"), "cpus": os.cpu_count(),
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out_dir / "bench_serve.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "bench_serve.md").write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    load, lat = report["load"], report["load"]["latency_ms"]
    lines = [f"# bench-serve: {report['model'].get('model_uri')} (v{report['model'].get('version', '?')})", "",
             f"`alignsearch bench-serve --requests {load['requests']} --concurrency {load['concurrency']}` at "
             f"{report['measured_at']} ({report['cpus']} CPUs, threads {report['threads']}); k={report['k']}; "
             f"server up in {report['startup_s']} s.", "",
             "| requests | concurrency | p50 ms | p95 ms | p99 ms | max ms | throughput req/s | errors |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| {load['requests']} | {load['concurrency']} | {lat['p50']} | {lat['p95']} | {lat['p99']} | "
             f"{lat['max']} | {load['throughput_rps']} | {load['errors']} |", "",
             f"Statuses: {load['statuses']}", "",
             f"## Bad inputs ({len(report['bad_inputs'])}; failed: {report['bad_inputs_failed'] or 'none'})", "",
             "| input | expected | status |", "|---|---|---:|",
             *(f"| {c['name']} | {c['expected']} | {c['status']}{'' if c['ok'] else ' FAIL'} |"
               for c in report["bad_inputs"]), ""]
    return "\n".join(lines)
