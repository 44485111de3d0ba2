"""Load and robustness checks of a running search service (`alignsearch bench-serve`): N
requests at a given concurrency (latency percentiles, throughput, errors), and a sweep of bad
inputs each of which must be answered 4xx: never 5xx, never left unanswered; clicks the traffic
log must refuse get their rule's own status."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

# (name, method, request kwargs for httpx): each must get a 4xx.
BAD_INPUTS: list[tuple[str, str, dict]] = [
    ("empty query", "post", {"json": {"query": ""}}),
    ("whitespace query", "post", {"json": {"query": " \t\n "}}),
    ("10 kB query", "post", {"json": {"query": "tree " * 2048}}),
    ("300-char query (over max_query_chars)", "post", {"json": {"query": "t" * 300}}),
    ("k=0", "post", {"json": {"query": "tree", "k": 0}}),
    ("k=-1", "post", {"json": {"query": "tree", "k": -1}}),
    ("k=10^6", "post", {"json": {"query": "tree", "k": 10**6}}),
    ("k=10^30", "post", {"json": {"query": "tree", "k": 10**30}}),
    ("k float", "post", {"json": {"query": "tree", "k": 2.5}}),
    ("k string", "post", {"json": {"query": "tree", "k": "many"}}),
    ("query a number", "post", {"json": {"query": 5}}),
    ("query a list", "post", {"json": {"query": ["tree"]}}),
    ("query null", "post", {"json": {"query": None}}),
    ("no query", "post", {"json": {"k": 3}}),
    ("body a list", "post", {"json": ["tree"]}),
    ("body a string", "post", {"json": "tree"}),
    ("invalid JSON", "post", {"content": b'{"query": "tree"', "headers": {"content-type": "application/json"}}),
    ("body not UTF-8", "post", {"content": b'{"query": "\xff\xfe"}', "headers": {"content-type": "application/json"}}),
    ("lone surrogate", "post", {"content": b'{"query": "\\ud800"}', "headers": {"content-type": "application/json"}}),
    ("empty body", "post", {"content": b"", "headers": {"content-type": "application/json"}}),
    ("GET without q", "get", {"params": {}}),
    ("GET blank q", "get", {"params": {"q": "  "}}),
    ("GET k=0", "get", {"params": {"q": "tree", "k": 0}}),
    ("GET k=10^6", "get", {"params": {"q": "tree", "k": 10**6}}),
    ("GET k text", "get", {"params": {"q": "tree", "k": "x"}}),
    ("GET 10 kB q", "get", {"params": {"q": "x" * 10_000}}),
    # Beyond /search: a page elsewhere reaching a loopback service by a rebound name (answered
    # only with an API key, which such a page cannot send), and /image asked for files.
    ("wrong Host header (DNS rebinding)", "get", {"url": "/health",
                                                  "headers": {"host": "rebind.example", "x-api-key": ""}}),
    ("/image of a file path", "get", {"url": "/image?ad_id=/etc/passwd"}),
    ("/image of a path out of the dataset", "get", {"url": "/image?ad_id=../../../../etc/passwd"}),
    ("/image of no ad", "get", {"url": "/image?ad_id=no-such-ad"}),
    # POST /click bodies (the clicks that break a rule of the log are CLICK_CASES).
    ("click without ad_id", "post", {"url": "/click", "json": {"request_id": "0" * 32}}),
    ("click without request_id", "post", {"url": "/click", "json": {"ad_id": "a"}}),
    ("click ids numbers", "post", {"url": "/click", "json": {"request_id": 5, "ad_id": 6}}),
    ("click empty request_id", "post", {"url": "/click", "json": {"request_id": "", "ad_id": "a"}}),
    ("click 10 kB ad_id", "post", {"url": "/click", "json": {"request_id": "0" * 32, "ad_id": "a" * 10_000}}),
    ("click body a list", "post", {"url": "/click", "json": ["0" * 32, "a"]}),
]
# Clicks on a search just answered (`click_sweep`), each with the exact status the service
# answers when it logs traffic: the first click counts, the rest break a rule.
CLICK_CASES: list[tuple[str, int]] = [
    ("click on a shown ad", 200),
    ("click repeated", 409),
    ("click on an ad the search did not show", 422),
    ("click on an unknown request id", 404),
]
# Sent over a raw socket (a client library finishes what it starts): a body announced and
# never completed must be answered (408), not wait forever holding a place in flight.
SLOW_BODY = "slow body (announced, never completed)"
# Valid but unusual: must be answered (2xx), never 5xx.
ODD_INPUTS: list[tuple[str, str, dict]] = [
    ("unicode query", "post", {"json": {"query": "árbol 🎄 ёлка 木", "k": 3}}),
    ("punctuation only", "post", {"json": {"query": "?!.,;", "k": 3}}),
    ("NUL inside", "post", {"json": {"query": "tree\u0000box", "k": 3}}),
    ("GET q not UTF-8", "get", {"url": "/search?q=%ff%fe"}),
]


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    seconds: float
    errors: int
    statuses: dict[str, int]
    latency_ms: dict[str, float] = field(default_factory=dict)  # p50, p95, p99, max, mean

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _send(base_url: str, queries: list[str], first: int, count: int, *, concurrency: int, k: int,
          headers: dict[str, str] | None, timeout_s: float) -> tuple[np.ndarray, dict[str, int], float]:
    """`count` POST /search at `concurrency` (one keep-alive connection per worker), queries
    cycled from position `first`: (latencies ms, statuses, seconds)."""
    import httpx

    latencies = np.zeros(count)
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    local = threading.local()
    clients: list = []

    def one(i: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=base_url, timeout=timeout_s, headers=headers or {})
            with lock:
                clients.append(local.client)
        started = time.perf_counter()
        try:
            query = queries[(first + i) % len(queries)]
            status = str(local.client.post("/search", json={"query": query, "k": k}).status_code)
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        latencies[i] = (time.perf_counter() - started) * 1000
        with lock:
            statuses[status] = statuses.get(status, 0) + 1

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(count)))
    seconds = time.perf_counter() - started
    for client in clients:
        client.close()
    return latencies, statuses, seconds


def _result(latencies: np.ndarray, statuses: dict[str, int], seconds: float, concurrency: int) -> LoadResult:
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return LoadResult(len(latencies), concurrency, round(seconds, 3), len(latencies) - statuses.get("200", 0),
                      statuses, {"p50": round(float(p50), 2), "p95": round(float(p95), 2),
                                 "p99": round(float(p99), 2), "max": round(float(latencies.max()), 2),
                                 "mean": round(float(latencies.mean()), 2)})


def run_load(base_url: str, queries: list[str], *, requests: int = 2000, concurrency: int = 8, k: int = 10,
             headers: dict[str, str] | None = None, timeout_s: float = 30.0) -> LoadResult:
    """`requests` POST /search at `concurrency` (one keep-alive connection per worker)."""
    latencies, statuses, seconds = _send(base_url, queries, 0, requests, concurrency=concurrency, k=k,
                                         headers=headers, timeout_s=timeout_s)
    return _result(latencies, statuses, seconds, concurrency)


def run_rounds(base_urls: dict[str, str], queries: list[str], *, requests: int = 2000, rounds: int = 10,
               concurrency: int = 8, k: int = 10, headers: dict[str, str] | None = None,
               timeout_s: float = 30.0) -> dict[str, LoadResult]:
    """`requests` POST /search to each of several services (by name), in `rounds` alternating
    rounds (the first service first in even rounds, last in odd ones) with the same queries:
    a machine busy with other work for a while slows each alike, so their difference is the
    services'. Throughput is requests over the seconds spent on that service."""
    names = list(base_urls)
    sizes = [requests // rounds + (1 if r < requests % rounds else 0) for r in range(rounds)]
    parts: dict[str, list[tuple[np.ndarray, dict[str, int], float]]] = {name: [] for name in names}
    first = 0
    for r, size in enumerate(sizes):
        for name in names if r % 2 == 0 else names[::-1]:
            parts[name].append(_send(base_urls[name], queries, first, size, concurrency=concurrency, k=k,
                                     headers=headers, timeout_s=timeout_s))
        first += size
    out = {}
    for name in names:
        statuses: dict[str, int] = {}
        for _, part, _ in parts[name]:
            for status, count in part.items():
                statuses[status] = statuses.get(status, 0) + count
        out[name] = _result(np.concatenate([p[0] for p in parts[name]]), statuses,
                            sum(p[2] for p in parts[name]), concurrency)
    return out


def slow_body_status(base_url: str, *, headers: dict[str, str] | None = None, wait_s: float = 60.0) -> int | str:
    """POST /search announcing a 100-byte body, sending 10 bytes of it, then nothing: the status
    the service answers within `wait_s` (or what went wrong instead, e.g. "no answer")."""
    url = urlsplit(base_url)
    lines = ["POST /search HTTP/1.1", f"Host: {url.netloc}", "Content-Type: application/json", "Content-Length: 100",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    try:
        with socket.create_connection((url.hostname, url.port or 80), timeout=wait_s) as sock:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + b'{"query": ')
            answer = sock.recv(4096)
    except OSError as exc:
        return type(exc).__name__
    status_line = answer.split(b"\r\n", 1)[0].split()
    return int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else "no answer"


def click_sweep(client) -> list[dict]:
    """CLICK_CASES against a service that logs traffic, through `client` (an httpx.Client at
    its base URL): name, expected status, status, ok."""
    answer = client.post("/search", json={"query": "tree", "k": 3})
    if answer.status_code != 200 or not answer.json().get("results"):
        return [{"name": name, "expected": str(expected), "status": f"no search to click ({answer.status_code})",
                 "ok": False} for name, expected in CLICK_CASES]
    request_id, shown = answer.json()["request_id"], answer.json()["results"][0]["ad_id"]
    bodies = {"click on a shown ad": {"request_id": request_id, "ad_id": shown},
              "click repeated": {"request_id": request_id, "ad_id": shown},
              "click on an ad the search did not show": {"request_id": request_id, "ad_id": "no-such-ad"},
              "click on an unknown request id": {"request_id": uuid.uuid4().hex, "ad_id": shown}}
    out = []
    for name, expected in CLICK_CASES:
        status = client.post("/click", json=bodies[name]).status_code
        out.append({"name": name, "expected": str(expected), "status": status, "ok": status == expected})
    return out


def bad_input_sweep(base_url: str, *, headers: dict[str, str] | None = None, clicks: bool = True) -> list[dict]:
    """Every case of BAD_INPUTS and SLOW_BODY (expect 4xx), ODD_INPUTS (expect 2xx) and, with
    `clicks` (a service that logs traffic), CLICK_CASES (each its exact status): name, expected,
    status, ok."""
    import httpx

    out = []
    with httpx.Client(base_url=base_url, timeout=30, headers=headers or {}) as client:
        for expected, cases in (("4xx", BAD_INPUTS), ("2xx", ODD_INPUTS)):
            for name, method, kwargs in cases:
                kwargs = dict(kwargs)
                status = client.request(method.upper(), kwargs.pop("url", "/search"), **kwargs).status_code
                ok = 400 <= status < 500 if expected == "4xx" else 200 <= status < 300
                out.append({"name": name, "expected": expected, "status": status, "ok": ok})
        if clicks:
            out += click_sweep(client)
    status = slow_body_status(base_url, headers=headers)
    out.append({"name": SLOW_BODY, "expected": "4xx", "status": status,
                "ok": isinstance(status, int) and 400 <= status < 500})
    return out
