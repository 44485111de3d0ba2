"""Interleaving in the real service: two registered versions trained on the synthetic dataset
(v1, the champion; v2, another seed without the word channel, the challenger), served by the
app `alignsearch serve` builds, over real HTTP, logging to a real traffic log.

With serve.interleave_share 1.0 every answer is a team-draft interleaving of the two models'
own rankings, the impression names per position the version that contributed it, both
models rank the same catalogue version's ads (also after an `ads add` to the champion, which
the challenger follows), and a click is credited to the model that contributed its position.
With share 0 nothing changes: no challenger is opened and the answers are the champion's."""

from __future__ import annotations

import shutil
import threading
import time
from contextlib import contextmanager

import httpx
import pandas as pd
import pytest
from conftest import new_ads_dir
from ops_helpers import as_flow_params, free_port, ops_params, relocate_store

from components.catalogue import live
from components.catalogue.serving import build_service
from components.search.bundle import bundle_catalogue
from components.traffic.config import TrafficConfig
from components.traffic.interleaving import impression_preferences

pytestmark = pytest.mark.slow

NAME = "alignsearch"
CHAMPION, CHALLENGER = f"{NAME}/1", f"{NAME}/2"
QUERIES = ["heart", "star", "red circle", "blue square", "tree", "green triangle"]


@pytest.fixture(scope="module")
def pair_template(catalogue_template, synthetic_dataset_dir, tmp_path_factory):
    """The catalogue tests' store plus v2, a genuinely different model: v1 `champion`, v2
    `challenger`. Read only."""
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from components.registry.tracking import configure_mlflow
    from flows.retrain import retrain_flow

    template, _ = catalogue_template
    root = tmp_path_factory.mktemp("interleave-template") / "store"
    shutil.copytree(template, root)
    relocate_store(root, template)
    cfg = ops_params(root, synthetic_dataset_dir)
    configure_mlflow(cfg.registry)
    storage = tmp_path_factory.mktemp("interleave-prefect")
    with prefect_test_harness(server_startup_timeout=60), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        second = retrain_flow(as_flow_params(ops_params(root, synthetic_dataset_dir, "match.seed=1",
                                                        "match.word_channel=false")))
    assert str(second["version"]) == "2", second
    client = MlflowClient()
    client.set_registered_model_alias(NAME, "champion", "1")
    client.set_registered_model_alias(NAME, "challenger", "2")
    return root


@pytest.fixture
def pair(pair_template, synthetic_dataset_dir, tmp_path):
    """This test's own copy of the two-version store: (root, params)."""
    from mlflow.tracking._tracking_service import utils as mlflow_service_utils

    from components.registry.tracking import configure_mlflow

    root = tmp_path / "store"
    shutil.copytree(pair_template, root)
    relocate_store(root, pair_template)
    cfg = ops_params(root, synthetic_dataset_dir)
    configure_mlflow(cfg.registry)
    mlflow_service_utils._artifact_repos_cache.clear()
    yield root, cfg
    mlflow_service_utils._artifact_repos_cache.clear()


@contextmanager
def serving(cfg, tmp_path, share: float, **serve):
    """The app `alignsearch serve` builds for the champion, on a real uvicorn server, logging to
    a traffic log in tmp: (url, service). The log is closed (everything written) on exit."""
    import uvicorn

    port = free_port()
    serve_cfg = cfg.serve.model_copy(update={"host": "127.0.0.1", "port": port, "interleave_share": share,
                                             "model_uri": f"models:/{NAME}@champion", **serve})
    traffic = TrafficConfig(store_uri=f"sqlite:///{tmp_path / 'traffic.db'}", flush_ms=20)
    service = build_service(serve_cfg.model_uri, serve_cfg, cache_dir=cfg.data.cache_dir, poll_s=0.2,
                            traffic=traffic)
    server = uvicorn.Server(uvicorn.Config(service.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    service.watcher.start()
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the test server did not answer /health in 30 s"
            time.sleep(0.1)
        yield url, service
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        service.watcher.stop()


def _ranking(engine, query: str, k: int) -> list[str]:
    """The engine's own top k, each ad named by its image (ads with one image are one result)."""
    frame = engine.search_frame(pd.DataFrame({"query": [query], "k": [k]}))
    return [h or a for a, h in zip(frame["ad_id"].astype(str), frame["image_hash"], strict=True)]


def _check_team_draft(answer: dict, contributors: list[str], rankings: dict[str, list[str]]) -> None:
    """Each position holds the best ad of its contributor's own ranking not shown above it."""
    shown = [hit["image_hash"] or hit["ad_id"] for hit in answer["results"]]
    assert len(shown) == len(set(shown)) == answer["k"]
    for position, (image, label) in enumerate(zip(shown, contributors, strict=True)):
        above = set(shown[:position])
        assert image == next(a for a in rankings[label] if a not in above), (position, label, shown, rankings)


def _wait_for(url: str, check, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        health = httpx.get(url + "/health", timeout=5).json()
        if check(health):
            return health
        assert time.monotonic() < deadline, f"/health never got there: {health}"
        time.sleep(0.2)


def test_share_one_interleaves_every_answer_on_one_catalogue_and_credits_clicks(pair, synthetic_dataset_dir,
                                                                                tmp_path):
    root, cfg = pair
    k = 6
    with serving(cfg, tmp_path, 1.0) as (url, service):
        challenger = service.challenger
        assert challenger is not None, service.interleave_off
        engines = {CHAMPION: service.engine, CHALLENGER: challenger.engine}
        health = httpx.get(url + "/health").json()["interleave"]
        assert health["status"] == "on" and health["champion"] == CHAMPION and health["challenger"] == CHALLENGER
        assert health["challenger_catalogue_version"] == "v0" and health["challenger_catalogue_error"] == ""

        # Both rank the champion's catalogue v0: the same ads, in the same order.
        def same_ads() -> None:
            served, copy = service.engine.catalogue, challenger.engine.catalogue
            assert copy.label == served.label
            assert copy.ads["ad_id"].tolist() == served.ads["ad_id"].tolist()
            assert copy.model_version == "2" and served.model_version == "1"

        same_ads()
        differ = 0
        answers = []
        for query in QUERIES:
            answer = httpx.post(url + "/search", json={"query": query, "k": k}).json()
            assert answer["interleaved"] is True and answer["catalogue_version"] == "v0"
            assert answer["model_version"] == "1", "the served model answers; the challenger contributes"
            rankings = {label: _ranking(engine, query, k) for label, engine in engines.items()}
            differ += rankings[CHAMPION] != rankings[CHALLENGER]
            answers.append((answer, rankings))
        assert differ, "the two models rank alike on every query: nothing tells their contributions apart"

        # The log: each answer is an impression naming, per position, who contributed it.
        service.traffic_log.writer.flush()
        stored = service.traffic_log.store.read().impressions.set_index("event_id")
        clicked = None
        for answer, rankings in answers:
            row = stored.loc[answer["request_id"]]
            contributors = list(row["contributors"])
            assert set(contributors) == {CHAMPION, CHALLENGER}
            assert sorted([contributors.count(CHAMPION), contributors.count(CHALLENGER)]) == [k // 2, k - k // 2]
            assert [h["ad_id"] for h in row["hits"]] == [h["ad_id"] for h in answer["results"]]
            assert row["model_version"] == "1" and row["catalogue_version"] == "v0"
            _check_team_draft(answer, contributors, rankings)
            if clicked is None:
                position = contributors.index(CHALLENGER)
                clicked = (answer["request_id"], answer["results"][position]["ad_id"])

        # A click on a position the challenger contributed counts for the challenger.
        request_id, ad_id = clicked
        assert httpx.post(url + "/click", json={"request_id": request_id, "ad_id": ad_id}).status_code == 200
        preferences = impression_preferences(service.traffic_log.store.read(), CHALLENGER, CHAMPION)
        assert len(preferences) == len(QUERIES)
        row = preferences.set_index("event_id").loc[request_id]
        assert (row["challenger_clicks"], row["champion_clicks"], row["preference"]) == (1, 0, "challenger")
        assert set(preferences.drop(index=preferences.index[preferences["event_id"] == request_id])["preference"]) \
            == {"tie"}

        # An ad added to the champion's live catalogue: the watcher swaps in v1, the challenger
        # follows (the new ad encoded by its own model), and interleaving goes on over v1.
        first_ad = pd.read_parquet(synthetic_dataset_dir / "ads.parquet")["ad_id"].iloc[0]
        live.add_ads(f"models:/{NAME}@champion",
                     new_ads_dir(synthetic_dataset_dir, tmp_path / "new", [("new:1", "zenko offer", first_ad)]),
                     validate_cfg=cfg.validation, cache_dir=cfg.data.cache_dir, experiment=cfg.registry.experiment,
                     progress=False)
        _wait_for(url, lambda h: h["catalogue_version"] == "v1"
                  and h["interleave"]["challenger_catalogue_version"] == "v1")
        same_ads()
        assert "new:1" in challenger.engine.catalogue.ads["ad_id"].tolist()
        copy = challenger.engine.catalogue
        assert copy.change["encoded"] == 1 and copy.change["reused"] == len(copy) - 1
        answer = httpx.post(url + "/search", json={"query": "zenko offer", "k": k}).json()
        assert answer["interleaved"] is True and answer["catalogue_version"] == "v1"
        _check_team_draft(answer, list(_contributors(service, answer)),
                          {label: _ranking(engine, "zenko offer", k) for label, engine in engines.items()})

        # While the challenger holds another catalogue version (as right after a swap, before it
        # has followed), searches are the champion's alone, counted as skipped.
        challenger.engine.use_catalogue(bundle_catalogue(challenger.ref.bundle_dir, model_name=NAME,
                                                         model_version="2"))
        answer = httpx.post(url + "/search", json={"query": "heart", "k": k}).json()
        assert answer["interleaved"] is False
        assert [h["image_hash"] or h["ad_id"] for h in answer["results"]] == _ranking(service.engine, "heart", k)
        assert httpx.get(url + "/health").json()["interleave"]["skipped"] == 1
        assert _contributors(service, answer) is None

    # The challenger's copy of each catalogue version is cached: a new service reads it back.
    cached = live.encoded_copy_dir(cfg.data.cache_dir, challenger.ref, challenger.catalogue.key_of(
        service.engine.catalogue))
    assert (cached / "catalogue.json").is_file()


def _contributors(service, answer: dict) -> list[str] | None:
    service.traffic_log.writer.flush()
    return service.traffic_log.store.impression(answer["request_id"]).contributors


def test_share_zero_changes_nothing(pair, tmp_path):
    root, cfg = pair
    with serving(cfg, tmp_path, 0.0) as (url, service):
        assert service.challenger is None
        assert httpx.get(url + "/health").json()["interleave"] == {"status": "off", "share": 0.0}
        for query in QUERIES[:3]:
            answer = httpx.post(url + "/search", json={"query": query, "k": 5}).json()
            assert answer["interleaved"] is False
            assert [h["image_hash"] or h["ad_id"] for h in answer["results"]] == _ranking(service.engine, query, 5)
            assert _contributors(service, answer) is None


def test_no_interleaving_with_itself_or_a_missing_challenger(pair, tmp_path):
    root, cfg = pair
    for uri, reason in ((f"models:/{NAME}/1", "is the served version"), (f"models:/{NAME}/9", "no challenger")):
        with serving(cfg, tmp_path / uri.rsplit("/", 1)[1], 1.0, challenger_uri=uri) as (url, service):
            health = httpx.get(url + "/health").json()["interleave"]
            assert service.challenger is None and health["status"] == "off" and reason in health["reason"]
            answer = httpx.post(url + "/search", json={"query": "heart", "k": 5}).json()
            assert answer["interleaved"] is False and _contributors(service, answer) is None
