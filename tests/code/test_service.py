"""The HTTP service as a service, on a toy model (the real one is in tests/ops): request ids,
a generic 500 with the traceback logged, body/in-flight limits, /health, the API key, and a
sweep of bad inputs that must all be 4xx, never 5xx."""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import httpx
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_catalogue_images import png_with_script

from components.search.config import ServeConfig
from components.search.load import BAD_INPUTS  # the sweep bench-serve runs against a real server
from components.search.service import create_app

URI = "models:/alignsearch@champion"
BASE = "http://127.0.0.1:8080"  # the Host a loopback service on the default port answers


class ToyModel:
    """Ranks three ads; the query "boom" raises, the query "slow" waits for `release`."""

    def __init__(self):
        self.release = threading.Event()

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for query, k in zip(frame["query"], frame["k"], strict=True):  # the pyfunc's contract: any batch
            if query == "boom":
                raise RuntimeError("secret internal detail /srv/model/path")
            if query == "slow":
                self.release.wait(10)
            rows += [{"query": query, "rank": i + 1, "ad_id": f"ad{i}", "title": f"title {i}",
                      "score": 1.0 - i / 10, "visual_words": ["tree"], "matched_words": []}
                     for i in range(min(int(k), 3))]
        return pd.DataFrame(rows)


def _client(model=None, **cfg) -> TestClient:
    return TestClient(create_app(ToyModel() if model is None else model, ServeConfig(**cfg), model_uri=URI,
                                 info={"name": "alignsearch", "version": "7", "run_id": "r"}, **cfg.pop("_kw", {})),
                      base_url=BASE)


def test_answers_with_a_request_id_and_health_names_the_version():
    client = _client()
    response = client.post("/search", json={"query": "tree", "k": 2})
    assert response.status_code == 200 and len(response.json()["results"]) == 2
    assert len(response.headers["x-request-id"]) == 32
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["version"] == "7"
    assert health.json()["model_uri"] == URI


def test_no_model_loaded_is_503():
    client = TestClient(create_app(None, ServeConfig(), model_uri=URI), base_url=BASE)
    assert client.get("/health").status_code == 503
    assert client.post("/search", json={"query": "tree"}).status_code == 503


def test_internal_error_is_a_generic_500_with_the_traceback_logged(caplog):
    client = _client()
    with caplog.at_level(logging.ERROR, logger="components.search.service"):
        response = client.post("/search", json={"query": "boom"})
    assert response.status_code == 500
    body = response.json()
    assert body["detail"] == "internal error" and body["request_id"] == response.headers["x-request-id"]
    assert "secret" not in response.text and "RuntimeError" not in response.text
    [record] = [r for r in caplog.records if body["request_id"] in r.getMessage()]
    assert record.exc_info and "secret internal detail" in str(record.exc_info[1])


def test_body_larger_than_the_limit_is_413():
    client = _client(max_body_bytes=200)
    response = client.post("/search", content=b'{"query": "' + b"x" * 500 + b'"}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 413 and "larger than 200 bytes" in response.json()["detail"]

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"query": "'
        yield b"x" * 500
        yield b'"}'
    response = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_requests_beyond_the_in_flight_limit_get_429():
    model = ToyModel()
    app = create_app(model, ServeConfig(max_in_flight=2), model_uri=URI)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            slow = [asyncio.create_task(client.post("/search", json={"query": "slow"})) for _ in range(2)]
            await asyncio.sleep(0.5)  # both are in the model now
            refused = await client.post("/search", json={"query": "tree"})
            model.release.set()
            done = await asyncio.gather(*slow)
            after = await client.post("/search", json={"query": "tree"})
            return refused, done, after

    refused, done, after = asyncio.run(go())
    assert refused.status_code == 429 and "limit 2" in refused.json()["detail"]
    assert [r.status_code for r in done] == [200, 200] and after.status_code == 200


class ImageEngine:
    """What the service asks of an engine: an ad's image reference (here, the file's own path),
    the catalogue version and its description."""

    catalogue_version = "v0"

    def __init__(self, files: dict[str, Path]):
        self.files = files
        self.catalogue = self

    def describe(self) -> dict:
        return {"catalogue_version": self.catalogue_version, "num_ads": len(self.files)}

    def image_ref(self, ad_id: str) -> str | None:
        return str(self.files[ad_id]) if ad_id in self.files else None


def _image_client(files: dict[str, Path], **kw) -> TestClient:
    engine = ImageEngine(files)
    return TestClient(create_app(ToyModel(), ServeConfig(), model_uri=URI, info={"version": "7"}, engine=engine,
                                 image_file=lambda ref: Path(ref), **kw), base_url=BASE)


def test_an_image_is_served_as_its_detected_format_never_as_its_name(tmp_path):
    """A PNG named x.html (with <script> in a text chunk) is image/png, not sniffed, and
    sandboxed if opened on its own; a file that is no PNG, JPEG or WebP is not served."""
    page = png_with_script(tmp_path / "x.html")
    (tmp_path / "notes.png").write_text("<html><script>alert(1)</script></html>")
    gif = tmp_path / "anim.gif"
    Image.new("RGB", (40, 40), "red").save(gif, format="GIF")
    client = _image_client({"html": page, "text": tmp_path / "notes.png", "gif": gif})
    served = client.get("/image", params={"ad_id": "html"})
    assert served.status_code == 200 and served.content == page.read_bytes()
    assert served.headers["content-type"] == "image/png"
    assert served.headers["x-content-type-options"] == "nosniff"
    policy = served.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "sandbox" in policy
    for ad_id in ("text", "gif", "nope"):
        assert client.get("/image", params={"ad_id": ad_id}).status_code == 404, ad_id


def test_the_page_has_a_content_security_policy_that_allows_only_itself():
    """No inline script but the page's own (by hash), no other origin; every answer nosniff."""
    import base64
    import hashlib
    import re

    from components.search.page import PAGE

    response = _client().get("/")
    assert response.status_code == 200 and response.headers["x-content-type-options"] == "nosniff"
    policy = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'" and "unsafe-inline" not in response.headers["content-security-policy"]
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        [body] = re.findall(f"<{tag}>(.*?)</{tag}>", PAGE, flags=re.S)
        digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
        assert policy[directive] == f"'sha256-{digest}'"
    assert _client().get("/health").headers["x-content-type-options"] == "nosniff"


def test_api_key_is_enforced_on_every_route_but_the_page(tmp_path):
    """/health (it names the model and store), /image, the API docs: all need the key; the page
    itself is static (no data in it) and asks for the key when the service answers 401."""
    png = png_with_script(tmp_path / "x.png")
    client = _image_client({"ad": png}, api_key="s3cret")
    assert client.post("/search", json={"query": "tree"}).status_code == 401
    assert client.post("/search", json={"query": "tree"}, headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.post("/search", json={"query": "tree"}, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert client.get("/search", params={"q": "tree"}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    for path in ("/health", "/image?ad_id=ad", "/docs", "/openapi.json", "/nowhere"):
        refused = client.get(path)
        assert refused.status_code == 401 and "models:/" not in refused.text, path
    assert client.get("/health", headers={"X-API-Key": "s3cret"}).json()["version"] == "7"
    assert client.get("/image?ad_id=ad", headers={"X-API-Key": "s3cret"}).content == png.read_bytes()
    page = client.get("/")
    assert page.status_code == 200 and URI not in page.text and "X-API-Key" in page.text


class StubWatcher:
    reloads = 3
    last_error = ("OperationalError: (psycopg2.OperationalError) connection to server at "
                  "postgresql://mlflow:hunter2@db.internal:5432/mlflow failed; "
                  "https://minio:9000/bucket/x?X-Amz-Credential=AKIA123&X-Amz-Signature=abc123 expired")


def test_health_never_shows_credentials():
    """A catalogue reload error quotes the store's URI as the driver said it: /health shows it
    without the user, password and signed-URL secrets."""
    client = TestClient(create_app(ToyModel(), ServeConfig(), model_uri=URI, info={"version": "7"},
                                   watcher=StubWatcher()), base_url=BASE)
    body = client.get("/health").json()
    shown = body["catalogue_reload_error"]
    assert "db.internal:5432/mlflow" in shown and "minio:9000/bucket/x" in shown
    for secret in ("hunter2", "mlflow:", "AKIA123", "abc123"):
        assert secret not in shown, secret


def test_image_requests_beyond_the_in_flight_limit_get_429(tmp_path):
    """An image can take a download: at most `max_in_flight` at once, like searches."""
    png = png_with_script(tmp_path / "x.png")
    release = threading.Event()

    def slow_file(ref):
        release.wait(10)
        return Path(ref)

    app = create_app(ToyModel(), ServeConfig(max_in_flight=2), model_uri=URI, engine=ImageEngine({"ad": png}),
                     image_file=slow_file)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            slow = [asyncio.create_task(client.get("/image", params={"ad_id": "ad"})) for _ in range(2)]
            await asyncio.sleep(0.5)
            refused = await client.get("/image", params={"ad_id": "ad"})
            searched = await client.post("/search", json={"query": "tree"})  # images have their own count
            release.set()
            return refused, searched, await asyncio.gather(*slow)

    refused, searched, done = asyncio.run(go())
    assert refused.status_code == 429 and searched.status_code == 200
    assert [r.status_code for r in done] == [200, 200]


async def _asgi(app, path: str = "/search", chunks: tuple[bytes, ...] = (b'{"query": "tree"}',), *,
                stall: bool = False, method: str = "POST", host: str | None = "127.0.0.1:8080") -> int:
    """One request straight through the ASGI app, as a server hands it over; `stall`: the client
    sends `chunks`, then nothing more (its body never ends); `host` None: no Host header.
    Returns the status answered."""
    pending = list(chunks)

    async def receive():
        if pending:
            return {"type": "http.request", "body": pending.pop(0), "more_body": bool(pending) or stall}
        if stall:
            await asyncio.Event().wait()  # never set: a client that went quiet
        return {"type": "http.disconnect"}

    answered = []

    async def send(message):
        if message["type"] == "http.response.start":
            answered.append(message["status"])

    headers = [(b"content-type", b"application/json")] + ([(b"host", host.encode())] if host is not None else [])
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080)}
    await app(scope, receive, send)
    return answered[0]


@pytest.mark.parametrize(("bind", "host", "status"), [
    ("127.0.0.1", "127.0.0.1:8080", 200), ("127.0.0.1", "localhost:8080", 200), ("127.0.0.1", "[::1]:8080", 200),
    ("127.0.0.1", "LOCALHOST:8080", 200), ("localhost", "127.0.0.1:8080", 200), ("::1", "[::1]:8080", 200),
    ("127.0.0.1", "rebind.example:8080", 421), ("127.0.0.1", "127.0.0.1:9999", 421), ("127.0.0.1", "127.0.0.1", 421),
    ("127.0.0.1", "", 421), ("10.0.0.5", "10.0.0.5:8080", 200), ("10.0.0.5", "rebind.example:8080", 421),
    ("0.0.0.0", "search.example:8080", 200),
])
def test_without_a_key_only_the_bind_address_is_answered(bind, host, status):
    """DNS rebinding: a page on rebind.example whose name then resolves to 127.0.0.1 reaches a
    loopback service from the user's browser, with Host: rebind.example. Without an API key
    only Host values naming the bind address are answered (a wildcard bind names none: any)."""
    app = create_app(ToyModel(), ServeConfig(host=bind, port=8080), model_uri=URI)
    assert asyncio.run(_asgi(app, "/health", (b"",), method="GET", host=host or None)) == status
    headers = {"host": host} if host else {}
    keyed = TestClient(create_app(ToyModel(), ServeConfig(host=bind, port=8080), model_uri=URI, api_key="k"),
                       base_url=BASE)
    assert keyed.get("/health", headers={**headers, "X-API-Key": "k"}).status_code == 200  # the key is the check


def test_slow_bodies_count_as_in_flight_and_time_out_with_408():
    """A request is in flight from the moment it is accepted, body reading included, so clients
    that send a body slowly cannot pile up past the limit; a body not complete in
    `body_timeout_s` gets 408."""
    app = create_app(ToyModel(), ServeConfig(max_in_flight=2, body_timeout_s=1.0), model_uri=URI)

    async def go():
        slow = [asyncio.create_task(_asgi(app, chunks=(b'{"query": ',), stall=True)) for _ in range(2)]
        await asyncio.sleep(0.3)  # both are reading their bodies now
        refused = await _asgi(app)
        timed_out = await asyncio.wait_for(asyncio.gather(*slow), timeout=10)
        return refused, timed_out, await _asgi(app)

    refused, timed_out, after = asyncio.run(go())
    assert refused == 429 and timed_out == [408, 408] and after == 200


@pytest.mark.parametrize(("name", "method", "kwargs"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_4xx_never_5xx(name, method, kwargs):
    kwargs = dict(kwargs)
    response = getattr(_client(), method)(kwargs.pop("url", "/search"), **kwargs)
    assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])


def test_unicode_query_is_answered():
    response = _client().post("/search", json={"query": "árbol 🎄 ёлка 木", "k": 2})
    assert response.status_code == 200 and response.json()["query"] == "árbol 🎄 ёлка 木"


@pytest.mark.parametrize("url", ["/search?q=%ff%fe", "/search?q=%ED%A0%80", "/search?q=tree%00box",
                                 "/search?q=tree&k=3&k=4", "/search?q=tree&extra=1"])
def test_odd_query_strings_are_never_a_server_error(url):
    """Invalid UTF-8 in a URL is decoded with replacement characters (a query like any other)."""
    assert _client().get(url).status_code < 500


def test_concurrent_searches_share_model_calls_and_each_gets_its_own_answer():
    calls: list[list[str]] = []
    release = threading.Event()

    class CountingModel(ToyModel):
        def predict(self, frame):
            calls.append(list(frame["query"]))
            release.wait(10)  # the first call holds the batcher: the others queue up behind it
            return super().predict(frame)

    app = create_app(CountingModel(), ServeConfig(batch_max=16, batch_wait_ms=5), model_uri=URI)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as client:
            first = asyncio.create_task(client.post("/search", json={"query": "q0", "k": 1}))
            await asyncio.sleep(0.3)
            rest = [asyncio.create_task(client.post("/search", json={"query": f"q{i % 3 + 1}", "k": 1 + i % 3}))
                    for i in range(6)]
            await asyncio.sleep(0.3)
            release.set()
            return await first, await asyncio.gather(*rest), (await client.get("/health")).json()

    first, rest, health = asyncio.run(go())
    assert first.status_code == 200 and [r.status_code for r in rest] == [200] * 6
    for i, response in enumerate(rest):
        body = response.json()
        assert body["query"] == f"q{i % 3 + 1}" and len(body["results"]) == 1 + i % 3
    # q0 alone, then the six waiting requests in one call with their three distinct queries
    assert len(calls) == 2 and calls[0] == ["q0"] and sorted(calls[1]) == ["q1", "q2", "q3"]  # any arrival order
    assert health["batches"] == 2 and health["batched_queries"] == 7


def test_a_failing_batch_fails_its_requests_and_the_next_batch_is_answered():
    from components.search.batching import MicroBatcher

    batcher = MicroBatcher(ToyModel().predict, max_batch=4, max_wait_ms=1)
    try:
        with pytest.raises(RuntimeError, match="secret internal detail"):
            batcher.search("boom", 3, timeout=10)
        frame = batcher.search("tree", 2, timeout=10)
        assert list(frame["rank"]) == [1, 2] and set(frame["query"]) == {"tree"}
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit("tree", 1)


def test_the_bench_serve_sweep_against_a_real_server_on_the_toy_model(tmp_path):
    """The sweep `alignsearch bench-serve` runs, over a socket to a real uvicorn (a slow body
    cannot be sent through the test client) logging to a real traffic log: every bad input 4xx,
    every odd one 2xx, each click its rule's status."""
    import socket

    import uvicorn

    from components.catalogue.serving import TrafficLog
    from components.search.load import CLICK_CASES, ODD_INPUTS, SLOW_BODY, bad_input_sweep
    from components.traffic.config import TrafficConfig

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    traffic_log = TrafficLog(TrafficConfig(store_uri=f"sqlite:///{tmp_path / 'traffic.db'}"))
    app = create_app(ToyModel(), ServeConfig(port=port, body_timeout_s=1.0), model_uri=URI, search_log=traffic_log)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            thread.join(0.05)
        sweep = {case["name"]: case for case in bad_input_sweep(f"http://127.0.0.1:{port}")}
    finally:
        server.should_exit = True
        thread.join(10)
    assert set(sweep) == {name for name, _, _ in BAD_INPUTS + ODD_INPUTS} | {SLOW_BODY} | {n for n, _ in CLICK_CASES}
    assert [case for case in sweep.values() if not case["ok"]] == []
    assert [sweep[name]["status"] for name, _ in CLICK_CASES] == [200, 409, 422, 404]
    assert traffic_log.store.counts().clicks == 1
    assert sweep[SLOW_BODY]["status"] == 408 and sweep["wrong Host header (DNS rebinding)"]["status"] == 421
