"""The search service logs what it answers: the app of `search.service` over a toy ranking,
with the real traffic log `alignsearch serve` gives it (`catalogue.serving.TrafficLog`: a
SQLite event store in tmp, the batch writer, the click rules). Each answered search is an
impression equal to its JSON answer; POST /click records a click or refuses it by rule, writing
nothing; /health shows the writer; logging off opens no store; shutdown writes what is queued.
The real server, SIGKILLed under load, is tests/traffic/test_server_sigkill.py."""

from __future__ import annotations

import time

import pandas as pd
import pytest
from fastapi.testclient import TestClient

from components.catalogue.serving import TrafficLog, open_traffic_log
from components.search.config import ServeConfig
from components.search.service import create_app
from components.traffic.config import TrafficConfig
from components.traffic.events import EventStore

BASE = "http://127.0.0.1:8080"  # the Host a loopback service on the default port answers
INFO = {"name": "alignsearch", "version": "7", "run_id": "r"}


class RankedAds:
    """Ranks five ads by a fixed order; the query "boom" raises (a model failing on a valid request)."""

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for query, k in zip(frame["query"], frame["k"], strict=True):
            if query == "boom":
                raise RuntimeError("the model failed")
            rows += [{"query": query, "rank": i + 1, "ad_id": f"ad{i}", "title": f"title {i}",
                      "score": round(0.9 - i / 7, 6), "visual_words": ["tree"], "matched_words": [],
                      "catalogue_version": "v3"} for i in range(min(int(k), 5))]
        return pd.DataFrame(rows)


def _traffic(tmp_path, **fields) -> TrafficConfig:
    # flush_ms long: an impression is written only by a flush (a click's, the test's, or shutdown).
    return TrafficConfig(store_uri=f"sqlite:///{tmp_path / 'traffic.db'}", **{"flush_ms": 60_000, **fields})


def _app(traffic_log, serve: ServeConfig | None = None, **kw):
    return create_app(RankedAds(), serve or ServeConfig(), model_uri="models:/alignsearch@champion", info=INFO,
                      search_log=traffic_log, **kw)


@pytest.fixture
def logged(tmp_path):
    """(client, traffic log) of a running app (its lifespan entered: shutdown closes the log)."""
    traffic_log = TrafficLog(_traffic(tmp_path))
    with TestClient(_app(traffic_log), base_url=BASE) as client:
        yield client, traffic_log


def _stored(traffic_log: TrafficLog):
    traffic_log.writer.flush()
    return traffic_log.store.read()


def test_each_answered_search_is_an_impression_equal_to_its_answer(logged):
    client, traffic_log = logged
    post = client.post("/search", json={"query": "red car", "k": 3})
    get = client.get("/search", params={"q": "star", "k": 4, "source": "page"})
    page_post = client.post("/search", json={"query": "tree", "k": 2, "source": "page"})
    get_api = client.get("/search", params={"q": "moon"})
    assert [r.status_code for r in (post, get, page_post, get_api)] == [200] * 4

    traffic_log.writer.flush()
    for response, source in ((post, "api"), (get, "page"), (page_post, "page"), (get_api, "api")):
        answer = response.json()
        assert answer["request_id"] == response.headers["x-request-id"] and len(answer["request_id"]) == 32
        stored = traffic_log.store.impression(answer["request_id"])
        assert stored is not None, answer["query"]
        assert stored.event_id == answer["request_id"] and stored.source == source
        assert (stored.query, stored.k) == (answer["query"], answer["k"])
        assert (stored.model_name, stored.model_version, stored.catalogue_version) == ("alignsearch", "7", "v3")
        assert stored.took_ms == answer["took_ms"] and stored.took_ms > 0
        assert [(h.ad_id, h.position, h.score) for h in stored.hits] == \
            [(r["ad_id"], r["rank"], r["score"]) for r in answer["results"]]
        assert [h.position for h in stored.hits] == list(range(1, len(answer["results"]) + 1))
        assert abs((pd.Timestamp.now(tz="UTC") - pd.Timestamp(stored.time)).total_seconds()) < 60
    assert traffic_log.store.counts().impressions == 4


def test_failed_and_refused_searches_log_nothing(logged):
    client, traffic_log = logged
    assert client.post("/search", json={"query": "boom"}).status_code == 500
    assert client.post("/search", json={"query": " "}).status_code == 422
    assert client.get("/search", params={"q": "tree", "k": 0}).status_code == 422
    assert client.get("/search", params={"q": "tree", "source": "mail"}).status_code == 422
    assert client.post("/search", json={"query": "tree", "source": "import"}).status_code == 422  # not the API's to say
    assert _stored(traffic_log).impressions.empty
    assert traffic_log.writer.stats.written == 0 and traffic_log.writer.stats.dropped == 0


def test_query_text_is_redacted_as_configured(tmp_path):
    traffic_log = TrafficLog(_traffic(tmp_path, redact_queries="drop-digits"))
    with TestClient(_app(traffic_log), base_url=BASE) as client:
        answer = client.post("/search", json={"query": "red car 0612345678", "k": 2}).json()
    assert answer["query"] == "red car 0612345678"  # the answer is the person's; the log is redacted
    assert EventStore(traffic_log.cfg.store_uri).impression(answer["request_id"]).query == "red car"


def test_a_click_is_recorded_at_the_position_its_search_showed(logged):
    client, traffic_log = logged
    answer = client.post("/search", json={"query": "red car", "k": 4}).json()
    # No flush before the click: the impression is still queued; the click finds it anyway.
    assert traffic_log.writer.stats.pending == 1
    response = client.post("/click", json={"request_id": answer["request_id"], "ad_id": "ad2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body == {"click_id": body["click_id"], "request_id": answer["request_id"], "ad_id": "ad2", "position": 3}
    clicks = traffic_log.store.read().clicks
    assert clicks[["click_id", "request_id", "ad_id", "position"]].to_dict("records") == [body]


def _counts(traffic_log: TrafficLog):
    traffic_log.writer.flush()
    return traffic_log.store.counts()


@pytest.mark.parametrize("case", ["unknown request", "ad not shown", "repeated"])
def test_each_refused_click_answers_its_status_and_writes_nothing(logged, case):
    client, traffic_log = logged
    answer = client.post("/search", json={"query": "red car", "k": 3}).json()
    request_id = answer["request_id"]
    if case == "repeated":
        assert client.post("/click", json={"request_id": request_id, "ad_id": "ad0"}).status_code == 200
    before = _counts(traffic_log)
    click = {"unknown request": {"request_id": "f" * 32, "ad_id": "ad0"},
             "ad not shown": {"request_id": request_id, "ad_id": "ad4"},  # ranked 5th, k=3
             "repeated": {"request_id": request_id, "ad_id": "ad0"}}[case]
    expected = {"unknown request": (404, "unknown_request"), "ad not shown": (422, "ad_not_shown"),
                "repeated": (409, "repeated_click")}[case]
    response = client.post("/click", json=click)
    body = response.json()
    assert (response.status_code, body["reason"]) == expected
    assert set(body) == {"detail", "reason", "request_id"} and body["request_id"] == click["request_id"]
    assert click["ad_id"] in body["detail"]
    assert _counts(traffic_log) == before


def test_a_click_after_the_window_is_410_and_writes_nothing(tmp_path):
    traffic_log = TrafficLog(_traffic(tmp_path, click_window_s=0.05))
    with TestClient(_app(traffic_log), base_url=BASE) as client:
        answer = client.post("/search", json={"query": "red car", "k": 3}).json()
        time.sleep(0.1)
        response = client.post("/click", json={"request_id": answer["request_id"], "ad_id": "ad1"})
        assert response.status_code == 410 and response.json()["reason"] == "click_too_late"
        assert _counts(traffic_log).clicks == 0


@pytest.mark.parametrize("body", [{}, {"request_id": "abc"}, {"ad_id": "ad0"}, {"request_id": "", "ad_id": "ad0"},
                                  {"request_id": 5, "ad_id": "ad0"}, {"request_id": "x" * 201, "ad_id": "ad0"},
                                  ["abc", "ad0"]])
def test_a_malformed_click_body_is_422_like_other_routes(logged, body):
    client, traffic_log = logged
    response = client.post("/click", json=body)
    assert response.status_code == 422
    assert response.json()["request_id"] == response.headers["x-request-id"]
    assert _counts(traffic_log).clicks == 0


def test_click_needs_the_api_key(tmp_path):
    traffic_log = TrafficLog(_traffic(tmp_path))
    with TestClient(_app(traffic_log, api_key="s3cret"), base_url=BASE) as client:
        answer = client.post("/search", json={"query": "red car"}, headers={"X-API-Key": "s3cret"}).json()
        click = {"request_id": answer["request_id"], "ad_id": "ad0"}
        assert client.post("/click", json=click).status_code == 401
        assert _counts(traffic_log).clicks == 0
        assert client.post("/click", json=click, headers={"X-API-Key": "s3cret"}).status_code == 200


def test_health_shows_the_writer(logged):
    client, traffic_log = logged
    for query in ("a", "b", "c"):
        client.get("/search", params={"q": query})
    queued = client.get("/health").json()["traffic"]
    assert queued["logging"] == "on" and queued["queued"] == 3 and queued["written"] == 0
    traffic_log.writer.flush()
    health = client.get("/health").json()["traffic"]
    assert {k: health[k] for k in ("queued", "written", "dropped", "failed", "failed_batches", "batches")} == \
        {"queued": 0, "written": 3, "dropped": 0, "failed": 0, "failed_batches": 0, "batches": 1}
    assert health["store_uri"] == traffic_log.cfg.store_uri and health["batch_size"] == 256


def test_health_shows_the_store_without_its_password(tmp_path):
    traffic_log = TrafficLog(_traffic(tmp_path))
    # What /health shows is the configured URI, redacted (a team's PostgreSQL URI may carry one).
    traffic_log.cfg = traffic_log.cfg.model_copy(update={"store_uri": "postgresql://user:pw@db:5432/traffic"})
    with TestClient(_app(traffic_log), base_url=BASE) as client:
        health = client.get("/health").json()["traffic"]
    assert health["store_uri"] == "postgresql://db:5432/traffic" and "pw" not in str(health)


def test_shutdown_writes_what_is_queued(tmp_path):
    traffic_log = TrafficLog(_traffic(tmp_path))
    with TestClient(_app(traffic_log), base_url=BASE) as client:
        ids = [client.get("/search", params={"q": f"query {i}"}).json()["request_id"] for i in range(5)]
        assert traffic_log.writer.stats.written == 0  # flush_ms is a minute away
    stored = EventStore(traffic_log.cfg.store_uri).read().impressions
    assert sorted(stored["event_id"]) == sorted(ids)


@pytest.mark.parametrize("off", ["serve.log_traffic false", "no traffic settings"])
def test_logging_off_opens_no_store_and_takes_no_clicks(tmp_path, off):
    traffic = _traffic(tmp_path)
    if off == "serve.log_traffic false":
        traffic_log = open_traffic_log(ServeConfig(log_traffic=False), traffic)
    else:
        traffic_log = open_traffic_log(ServeConfig(), None)
    assert traffic_log is None
    with TestClient(_app(traffic_log), base_url=BASE) as client:
        answer = client.post("/search", json={"query": "red car"})
        assert answer.status_code == 200
        response = client.post("/click", json={"request_id": answer.json()["request_id"], "ad_id": "ad0"})
        assert response.status_code == 404 and response.json()["reason"] == "logging_off"
        assert client.get("/health").json()["traffic"] == {"logging": "off"}
    assert not (tmp_path / "traffic.db").exists()
    on_by_default = open_traffic_log(ServeConfig(), traffic)
    assert isinstance(on_by_default, TrafficLog)
    on_by_default.close()


def test_a_log_written_before_took_ms_existed_opens_and_gains_the_column(tmp_path):
    import sqlite3

    db = tmp_path / "old.db"
    with sqlite3.connect(db) as conn:  # the impressions table as the first version of the log made it
        conn.execute("CREATE TABLE impressions (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id VARCHAR(200) NOT NULL "
                     "UNIQUE, time_us BIGINT NOT NULL, query TEXT NOT NULL, k INTEGER NOT NULL, model_name VARCHAR(200), "
                     "model_version VARCHAR(64), catalogue_version VARCHAR(64), source VARCHAR(16) NOT NULL, "
                     "hits JSON NOT NULL)")
        conn.execute("INSERT INTO impressions (event_id, time_us, query, k, source, hits) VALUES "
                     "('old', 1, 'star', 1, 'api', '[{\"ad_id\": \"ad0\", \"position\": 1, \"score\": 0.5}]')")
    traffic_log = TrafficLog(TrafficConfig(store_uri=f"sqlite:///{db}"))
    with TestClient(_app(traffic_log), base_url=BASE) as client:
        new = client.post("/search", json={"query": "tree", "k": 1}).json()
    store = EventStore(f"sqlite:///{db}")
    assert store.impression("old").took_ms is None and store.impression("old").hits[0].ad_id == "ad0"
    assert store.impression(new["request_id"]).took_ms == new["took_ms"]
    assert store.read().impressions["took_ms"].isna().tolist() == [True, False]
