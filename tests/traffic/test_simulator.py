"""Simulated users: click-through per position follows the configured propensities, and the
HTTP driver searches and clicks against a service.

The service here is a tiny FastAPI app written in this file (a fake ranking over real HTTP,
uvicorn on 127.0.0.1) that logs through the real event store, batch writer and click rules:
`alignsearch serve` gets its `POST /click` and its impression logging with the next change,
and the driver runs against it unchanged."""

import contextlib
import hashlib
import socket
import threading
import time

import numpy as np
import pandas as pd
import pytest
import uvicorn
from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel

from components.traffic.clicks import ClickError, record_click
from components.traffic.config import SimulatorConfig
from components.traffic.events import EventStore, Hit, Impression, new_id
from components.traffic.simulator import relevant_by_query, run_users, simulate_clicks
from components.traffic.writer import BatchWriter

ADS = [f"ad{i:02d}" for i in range(20)]


def click_through(ranked: list[str], relevant: set[str], cfg: SimulatorConfig, people: int) -> np.ndarray:
    rng = np.random.default_rng(cfg.seed)
    clicks = np.zeros(len(ranked))
    for _ in range(people):
        for position in simulate_clicks(ranked, relevant, rng, cfg):
            clicks[position - 1] += 1
    return clicks / people


def test_click_through_per_position_follows_the_propensities():
    cfg = SimulatorConfig(eta=0.7, click_relevant=0.9, click_nonrelevant=0.05, seed=1)
    relevant = set(ADS[0:10:2])  # positions 1, 3, 5, 7, 9
    ctr = click_through(ADS[:10], relevant, cfg, people=20_000)
    propensity = np.array([cfg.propensity(k) for k in range(1, 11)])
    expected = propensity * np.where(np.isin(ADS[:10], list(relevant)), 0.9, 0.05)
    # 20,000 people: a click-through's standard error is at most 0.0035.
    np.testing.assert_allclose(ctr, expected, atol=0.015)
    assert ctr[0] > ctr[2] > ctr[4] > ctr[6] > ctr[8]  # position bias among equally relevant ads


def test_explicit_propensities_and_the_same_seed_give_the_same_people():
    cfg = SimulatorConfig(propensities=[1.0, 0.5], click_relevant=1.0, click_nonrelevant=1.0)
    ctr = click_through(ADS[:4], set(), cfg, people=5000)
    assert ctr[0] == 1.0 and abs(ctr[1] - 0.5) < 0.03 and ctr[2] == ctr[3] == 0.0  # past the list: unseen
    runs = [[simulate_clicks(ADS[:10], set(ADS[:3]), rng, SimulatorConfig()) for _ in range(50)]
            for rng in (np.random.default_rng(5), np.random.default_rng(5))]
    assert runs[0] == runs[1]
    with pytest.raises(ValueError, match="propensities"):
        SimulatorConfig(propensities=[1.0, 1.5])


class SearchBody(BaseModel):
    query: str
    k: int = 10


class ClickBody(BaseModel):
    request_id: str
    ad_id: str


def fake_service(store: EventStore, writer: BatchWriter, *, api_key: str, id_in_body: bool) -> FastAPI:
    """/search ranks ADS by a hash of (query, ad) and logs the impression through `writer`;
    /click goes through the click rules; both need the API key."""
    app = FastAPI()

    @app.middleware("http")
    async def key(request: Request, call_next):
        if request.headers.get("X-API-Key") != api_key:
            return Response(status_code=401)
        return await call_next(request)

    @app.post("/search")
    def search(body: SearchBody, response: Response) -> dict:
        ranked = sorted(ADS, key=lambda ad: hashlib.md5(f"{body.query}|{ad}".encode()).hexdigest())[:body.k]
        request_id = new_id()
        writer.put(Impression(request_id, body.query, body.k,
                              tuple(Hit(ad, rank, 1.0 / rank) for rank, ad in enumerate(ranked, start=1))))
        response.headers["X-Request-ID"] = request_id
        results = [{"rank": rank, "ad_id": ad} for rank, ad in enumerate(ranked, start=1)]
        return {"request_id": request_id, "results": results} if id_in_body else {"results": results}

    @app.post("/click")
    def click(body: ClickBody) -> dict:
        try:
            record_click(store, body.request_id, body.ad_id, window_s=600, writer=writer)
        except ClickError as exc:
            raise HTTPException(exc.http_status, exc.reason) from exc
        return {"logged": True}

    return app


@contextlib.contextmanager
def serving(app: FastAPI):
    # IPPROTO_TCP named: asyncio turns Nagle off only on sockets that say they are TCP (with
    # proto 0 each response waits ~40 ms for the client's delayed ACK).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(20)
        sock.close()


def toy_dataset() -> tuple[pd.DataFrame, pd.DataFrame]:
    queries = pd.DataFrame({"query_id": [f"q{i}" for i in range(6)],
                            "text": ["red car", "blue bike", "green tree", "old house", "cat", "dog"],
                            "split": ["train"] * 4 + ["test"] * 2})
    qrels = pd.DataFrame([(f"q{i}", ADS[(3 * i + j) % 20], 1, "train") for i in range(4) for j in range(4)]
                         + [("q0", ADS[19], 0, "train")], columns=["query_id", "ad_id", "relevance", "split"])
    return queries, qrels


@pytest.mark.parametrize("id_in_body", [True, False], ids=["id-in-json", "id-in-header"])
def test_users_search_and_click_over_http_and_the_log_holds_exactly_their_clicks(tmp_path, id_in_body):
    queries, qrels = toy_dataset()
    store = EventStore(f"sqlite:///{tmp_path / 'traffic.db'}")
    writer = BatchWriter(store, batch_size=16, flush_ms=50)
    cfg = SimulatorConfig(num_searches=60, k=10, split="train", seed=3, click_relevant=0.9, click_nonrelevant=0.1)
    with serving(fake_service(store, writer, api_key="s3cret", id_in_body=id_in_body)) as url:
        result = run_users(url, queries, qrels, cfg, headers={"X-API-Key": "s3cret"})
        refused = run_users(url, queries, qrels, cfg.model_copy(update={"num_searches": 3}))
    writer.close()

    assert result.searches == 60 and result.num_errors == 0
    assert 0 < result.clicks_acknowledged == result.clicks_sent == len(result.acknowledged)
    events = store.read()
    assert sorted(events.impressions["event_id"]) == sorted(result.request_ids)
    assert set(events.impressions["query"]) <= {"red car", "blue bike", "green tree", "old house"}  # train only
    logged = sorted(zip(events.clicks["request_id"], events.clicks["ad_id"], events.clicks["position"], strict=True))
    assert logged == sorted(result.acknowledged)
    # Mostly relevant ads are clicked (noise 0.1 against 0.9).
    relevant = relevant_by_query(qrels)
    text_to_id = dict(zip(queries["text"], queries["query_id"], strict=True))
    query_of = dict(zip(events.impressions["event_id"], events.impressions["query"], strict=True))
    on_relevant = [ad in relevant[text_to_id[query_of[r]]] for r, ad, _ in result.acknowledged]
    assert np.mean(on_relevant) > 0.6

    assert refused.searches == 0 and refused.errors == {"search:401": 3}
    # The same seed sends the same people: the same clicks at the same positions.
    assert [p for _, _, p in result.acknowledged] == [p for _, _, p in run_again(queries, qrels, cfg, tmp_path)]
    store.close()


def run_again(queries: pd.DataFrame, qrels: pd.DataFrame, cfg: SimulatorConfig, tmp_path) -> list:
    store = EventStore(f"sqlite:///{tmp_path / 'again.db'}")
    with BatchWriter(store, batch_size=16, flush_ms=50) as writer, \
            serving(fake_service(store, writer, api_key="k", id_in_body=True)) as url:
        again = run_users(url, queries, qrels, cfg, headers={"X-API-Key": "k"})
    store.close()
    return again.acknowledged


def test_a_split_without_queries_is_refused():
    queries, qrels = toy_dataset()
    with pytest.raises(ValueError, match="valid"):
        run_users("http://127.0.0.1:9", queries, qrels, SimulatorConfig(split="valid"))
