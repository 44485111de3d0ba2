"""`alignsearch bench-serve`: start real `alignsearch serve`s on 127.0.0.1 (free ports), one with
the traffic log off and one with it on, load them (N requests each at a concurrency, in
alternating rounds), sweep bad inputs against the logging one, stop them, and write a small
report: latency and throughput with logging off and on, side by side.

Why two servers at once and alternating rounds: on a machine doing other work (a shared
box, a laptop), one server measured after the other compares two different moments; rounds
taken in turn (off, on, on, off, ...) see the same moments, so the difference is the log's.

The logging-on server logs to a scratch SQLite file in the report's directory (fresh each run),
not to `traffic.store_uri`: the benchmark's searches are not people's, and must never reach
training. `--set traffic.store_uri=...` measures another store (a team's PostgreSQL) instead.

With `interleave_share` above 0 a third server joins the rounds: the traffic log on (its own
scratch file) and that share of searches interleaved with the challenger
(`serve.challenger_uri`), so what interleaving costs is its difference from the logging one."""

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
from components.search.load import bad_input_sweep, run_rounds

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


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far; None where /proc is not there.
    Unlike latency, a server's CPU per request hardly moves when other work shares the machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scratch_store(out_dir: Path, name: str = "bench_traffic.db") -> str:
    """A fresh SQLite traffic log in `out_dir` for a logging server (an older one removed)."""
    path = (out_dir / name).resolve()
    for stale in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        stale.unlink(missing_ok=True)
    return f"sqlite:///{path}"


# How the report names each server: its traffic log, and whether it interleaves.
SERVER_NAMES = {"off": "off", "on": "on", "interleaved": "on, interleaved"}


def bench_serve(serve_args: list[str], out_dir: Path, *, requests: int = 2000, concurrency: int = 8, k: int = 10,
                rounds: int = 10, queries: list[str] | None = None, env: dict | None = None,
                interleave_share: float = 0.0) -> dict:
    """Run the benchmark: `requests` searches to each server (traffic log off, on, and with
    `interleave_share` > 0 on and interleaving) in `rounds` alternating rounds, then the
    bad-input sweep (clicks included) against the logging server; writes `bench_serve.json` and
    `bench_serve.md` into `out_dir`. `serve_args` come after the benchmark's own, so their
    `--set traffic.store_uri=...` wins over the scratch store."""
    import httpx

    out_dir.mkdir(parents=True, exist_ok=True)
    queries = queries or DEFAULT_QUERIES
    headers = key_headers(env) or None
    logging_args = {"off": ["--no-log", "--interleave-share", "0"],
                    "on": ["--log", "--interleave-share", "0", "--set", f"traffic.store_uri={scratch_store(out_dir)}"]}
    if interleave_share > 0:
        logging_args["interleaved"] = ["--log", "--interleave-share", str(interleave_share), "--set",
                                       f"traffic.store_uri={scratch_store(out_dir, 'bench_traffic_interleaved.db')}"]
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    startup_s = {}
    try:
        for name, args in logging_args.items():
            port, started = free_port(), time.perf_counter()
            servers[name] = (start_server([*args, *serve_args], port, out_dir / f"serve-{name}.log", env=env),
                             f"http://127.0.0.1:{port}")
            startup_s[name] = round(time.perf_counter() - started, 1)
        bases = {name: base for name, (_, base) in servers.items()}
        load_before = os.getloadavg()[0]
        run_rounds(bases, queries, requests=min(50, requests), rounds=2, concurrency=concurrency, k=k,
                   headers=headers)  # warm-up, not reported
        cpu_before = {name: cpu_seconds(process.pid) for name, (process, _) in servers.items()}
        loads = run_rounds(bases, queries, requests=requests, rounds=max(1, min(rounds, requests)),
                           concurrency=concurrency, k=k, headers=headers)
        cpu_after = {name: cpu_seconds(process.pid) for name, (process, _) in servers.items()}
        load_after = os.getloadavg()[0]
        health = httpx.get(f"{bases['on']}/health", headers=headers, timeout=5).json()
        interleave = (httpx.get(f"{bases['interleaved']}/health", headers=headers, timeout=5).json()["interleave"]
                      if "interleaved" in bases else None)
        sweep = bad_input_sweep(bases["on"], headers=headers)
    finally:
        for process, _ in servers.values():
            stop_server(process)
    traffic = health.pop("traffic", None)
    health.pop("interleave", None)
    cpu_ms = {name: None if cpu_before[name] is None or cpu_after[name] is None
              else round((cpu_after[name] - cpu_before[name]) * 1000 / load.requests, 2) for name, load in loads.items()}
    report = {"model": health, "startup_s": startup_s["on"], "k": k, "rounds": rounds,
              "load": {name: {**asdict(load), "throughput_rps": round(load.throughput, 1),
                              "cpu_ms_per_request": cpu_ms[name]} for name, load in loads.items()},
              # The logging server's writer after the warm-up and the load: every search queued,
              # none dropped or failed.
              "traffic": traffic,
              # The interleaving server's /health entry after the load: the challenger, the
              # searches interleaved and those skipped (catalogue versions apart). None: not run.
              "interleave": interleave,
              "bad_inputs": sweep, "bad_inputs_failed": [c["name"] for c in sweep if not c["ok"]],
              "threads": os.environ.get("OMP_NUM_THREADS", "default"), "cpus": os.cpu_count(),
              # The machine's 1-minute load average before and after the load: other work
              # running beside the benchmark shows here (the servers and the load add about 2).
              "load_average": [round(load_before, 2), round(load_after, 2)],
              "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out_dir / "bench_serve.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "bench_serve.md").write_text(markdown(report))
    return report


def errors(report: dict) -> list[str]:
    """What makes a benchmark run fail: failed requests, bad inputs not refused as they must be,
    searches the logging server did not log, an interleaving server that did not interleave."""
    out = [f"{run['errors']} failed request(s) with logging {SERVER_NAMES.get(name, name)}"
           for name, run in report["load"].items() if run["errors"]]
    interleave = report.get("interleave")
    if interleave is not None and interleave.get("status") != "on":
        out.append(f"the interleaving server did not interleave: {interleave.get('reason', 'no challenger')}")
    elif interleave is not None and not interleave.get("interleaved"):
        out.append(f"the interleaving server interleaved no search ({interleave.get('skipped')} skipped)")
    if interleave is not None and interleave.get("challenger_failed"):
        out.append(f"the challenger failed on {interleave['challenger_failed']} search(es) (see serve-interleaved.log)")
    if report["bad_inputs_failed"]:
        out.append(f"bad inputs not answered as expected: {', '.join(report['bad_inputs_failed'])}")
    traffic = report.get("traffic") or {}
    if traffic.get("logging") != "on":
        out.append("the logging-on server did not log (health shows no traffic log)")
    elif traffic.get("dropped") or traffic.get("failed"):
        out.append(f"the traffic log dropped {traffic['dropped']} and failed {traffic['failed']} event(s)")
    return out


def markdown(report: dict) -> str:
    load, traffic, interleave = report["load"], report.get("traffic") or {}, report.get("interleave")
    any_run = next(iter(load.values()))
    rows = [f"| {SERVER_NAMES.get(name, name)} | {run['requests']} | {run['concurrency']} | {run['latency_ms']['p50']} | "
            f"{run['latency_ms']['p95']} | {run['latency_ms']['p99']} | {run['latency_ms']['max']} | "
            f"{run['throughput_rps']} | {run.get('cpu_ms_per_request')} | {run['errors']} |"
            for name, run in load.items()]
    lines = [f"# bench-serve: {report['model'].get('model_uri')} (v{report['model'].get('version', '?')})", "",
             f"`alignsearch bench-serve --requests {any_run['requests']} --concurrency {any_run['concurrency']}` at "
             f"{report['measured_at']} ({report['cpus']} CPUs, threads {report['threads']}, load average "
             f"{' -> '.join(str(x) for x in report.get('load_average', []))}); k={report['k']}; "
             f"server up in {report['startup_s']} s. Servers side by side (the traffic log off and on"
             + (", and on with interleaving" if interleave else "")
             + f"), loaded in {report.get('rounds', 1)} alternating rounds.", "",
             "| traffic log | requests | concurrency | p50 ms | p95 ms | p99 ms | max ms | throughput req/s | "
             "server CPU ms/request | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
             *(f"Statuses with logging {SERVER_NAMES.get(name, name)}: {run['statuses']}" for name, run in load.items()),
             "",
             *([f"Interleaving: {interleave.get('share', 0):.0%} of searches, {interleave.get('champion')} with "
                f"{interleave.get('challenger')} (catalogue {interleave.get('challenger_catalogue_version')}): "
                f"{interleave.get('interleaved')} interleaved, {interleave.get('skipped')} skipped (catalogue "
                "versions apart).", ""] if interleave and interleave.get("status") == "on" else
               [f"Interleaving: off ({interleave.get('reason', '')}).", ""] if interleave else []),
             (f"Traffic log ({traffic.get('store_uri')}): {traffic.get('written')} events written in "
              f"{traffic.get('batches')} batches, {traffic.get('queued')} queued, {traffic.get('dropped')} dropped, "
              f"{traffic.get('failed')} failed (batch_size {traffic.get('batch_size')}, flush_ms "
              f"{traffic.get('flush_ms')})." if traffic.get("logging") == "on" else "Traffic log: off."), "",
             f"## Bad inputs ({len(report['bad_inputs'])}; failed: {report['bad_inputs_failed'] or 'none'})", "",
             "| input | expected | status |", "|---|---|---:|",
             *(f"| {c['name']} | {c['expected']} | {c['status']}{'' if c['ok'] else ' FAIL'} |"
               for c in report["bad_inputs"]), ""]
    return "\n".join(lines)
