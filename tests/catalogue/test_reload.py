"""The HTTP service follows the live catalogue: a new version is loaded and swapped in while
requests keep coming, and none is lost; answers and /health name the model and catalogue
versions; ad images are served from the version that holds them."""

from __future__ import annotations

import threading
import time

import httpx
import pandas as pd
import pytest
from conftest import URI, LiveServer, new_ads_dir
from test_live import _image_ad

from components.catalogue import live

pytestmark = pytest.mark.slow


def _wait_for(url: str, version: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = httpx.get(url + "/health", timeout=5).json()
        if health.get("catalogue_version") == version:
            return health
        time.sleep(0.1)
    raise AssertionError(f"/health never showed catalogue {version}: {health}")


def test_a_reload_under_concurrent_requests_loses_none(store, synthetic_dataset_dir, tmp_path):
    root, cfg = store
    with LiveServer(cfg) as server:
        health = httpx.get(server.url + "/health").json()
        assert health["version"] == "1" and health["catalogue_version"] == "v0"
        num_ads = health["num_ads"]

        stop = threading.Event()
        seen: list[list[tuple[int, str | None, list[str]]]] = [[] for _ in range(4)]

        def hammer(out):
            with httpx.Client(base_url=server.url, timeout=30) as client:
                while not stop.is_set():
                    r = client.get("/search", params={"q": "heart", "k": 200})
                    body = r.json() if r.status_code == 200 else {}
                    out.append((r.status_code, body.get("catalogue_version"),
                                [h["ad_id"] for h in body.get("results", [])]))

        threads = [threading.Thread(target=hammer, args=(s,)) for s in seen]
        for t in threads:
            t.start()
        try:
            time.sleep(0.5)
            source = _image_ad(synthetic_dataset_dir, "heart")
            live.add_ads(URI, new_ads_dir(synthetic_dataset_dir, tmp_path / "new", [("new:heart", "zenko", source)]),
                         validate_cfg=cfg.validation, cache_dir=cfg.data.cache_dir,
                         experiment=cfg.registry.experiment, progress=False)
            after_add = _wait_for(server.url, "v1")
            time.sleep(0.5)
            live.remove_ads(URI, ["new:heart"], cache_dir=cfg.data.cache_dir, experiment=cfg.registry.experiment)
            after_remove = _wait_for(server.url, "v2")
            time.sleep(0.5)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=30)

        assert after_add["num_ads"] == num_ads + 1 and after_remove["num_ads"] == num_ads
        assert after_add["catalogue_run_id"] and after_add["catalogue_reload_error"] == ""
        answers = [a for s in seen for a in s]
        assert len(answers) > 20 and {status for status, _, _ in answers} == {200}, answers[:3]
        for stream in seen:  # each client sees v0, then v1, then v2: never back, never mixed
            order = [v for _, v, _ in stream]
            assert order == sorted(order, key=lambda v: int(v[1:])) and order[-1] == "v2"
        for _, version, ids in answers:
            assert ("new:heart" in ids) == (version == "v1"), version
            assert len(ids) == num_ads + (version == "v1")


def test_answers_health_and_images_name_their_versions(store, synthetic_dataset_dir, tmp_path):
    root, cfg = store
    source = _image_ad(synthetic_dataset_dir, "heart")
    # The added ad's file is the dataset ad's, byte for byte: /image must answer exactly it.
    live.add_ads(URI, new_ads_dir(synthetic_dataset_dir, tmp_path / "new", [("new:heart", "zenko", source)],
                                  same_bytes=True),
                 validate_cfg=cfg.validation, cache_dir=cfg.data.cache_dir, experiment=cfg.registry.experiment,
                 progress=False)
    with LiveServer(cfg) as server:
        body = httpx.post(server.url + "/search", json={"query": "heart", "k": 3}).json()
        assert body["model_version"] == "1" and body["catalogue_version"] == "v1"
        health = httpx.get(server.url + "/health").json()
        assert health["catalogue_version"] == "v1" and health["version"] == "1"
        added = httpx.get(server.url + "/image", params={"ad_id": "new:heart"})
        ads = pd.read_parquet(synthetic_dataset_dir / "ads.parquet").set_index("ad_id")
        assert added.status_code == 200
        assert added.content == (synthetic_dataset_dir / ads.loc[source, "image_path"]).read_bytes()
        trained = httpx.get(server.url + "/image", params={"ad_id": source})
        assert trained.status_code == 200 and trained.headers["content-type"].startswith("image/")
        assert httpx.get(server.url + "/image", params={"ad_id": "nope"}).status_code == 404
        page = httpx.get(server.url + "/")
        assert page.status_code == 200 and "<form" in page.text and "http" not in page.text.split("<script>")[1]
