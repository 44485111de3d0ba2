"""Ads whose image files are byte-identical are one search result (openclipart files one
drawing under two folders): the best-scoring ad stands for them and lists the others, the
engine still answers k distinct images, every client (the engine, the HTTP API) sees the same
list, and the hashes are stored with the catalogue version when it is built. A version written
before hashes existed still loads and searches."""

from __future__ import annotations

import hashlib
import json

import httpx
import pandas as pd
import pytest
from conftest import URI, LiveServer, new_ads_dir
from test_live import _image_ad

from components.catalogue import live
from components.registry.models import open_model
from components.search.catalogue import AD_COLUMNS, ADS_FILE, META_FILE, Catalogue
from components.search.engine import SearchEngine

pytestmark = pytest.mark.slow


def _add_copy(cfg, dataset_dir, tmp_path, source: str, new_id: str = "dup:heart"):
    """`new_id`: a new ad whose image file is `source`'s, byte for byte (another title)."""
    folder = new_ads_dir(dataset_dir, tmp_path / new_id.replace(":", "-"), [(new_id, "zenko offer", source)],
                         same_bytes=True)
    return live.add_ads(URI, folder, validate_cfg=cfg.validation, cache_dir=cfg.data.cache_dir,
                        experiment=cfg.registry.experiment, progress=False)


def _raw_ranking(engine: SearchEngine, query: str) -> list[str]:
    """Every ad, best first, straight from the index (no collapsing)."""
    _, ids = engine.index.search(engine.query_tower.encode([query]), len(engine))
    return ids[0]


def test_identical_images_are_one_hit_listing_the_others(store, synthetic_dataset_dir, tmp_path):
    root, cfg = store
    cache = cfg.data.cache_dir
    source = _image_ad(synthetic_dataset_dir, "heart")
    _add_copy(cfg, synthetic_dataset_dir, tmp_path, source)
    catalogue = live.current_catalogue(open_model(URI, cache), cache)

    # Stored with the version when it was built: every ad's hash, the two equal to the file's.
    hashes = dict(zip(catalogue.ads["ad_id"], catalogue.ads["image_hash"], strict=True))
    image_path = pd.read_parquet(synthetic_dataset_dir / "ads.parquet").set_index("ad_id").loc[source, "image_path"]
    expected = hashlib.sha256((synthetic_dataset_dir / image_path).read_bytes()).hexdigest()
    assert hashes["dup:heart"] == hashes[source] == expected
    assert all(hashes.values())
    saved = pd.read_parquet(catalogue_dir(cache, catalogue) / ADS_FILE)
    assert dict(zip(saved["ad_id"], saved["image_hash"], strict=True)) == hashes

    engine = SearchEngine(open_model(URI, cache).bundle_dir, catalogue=catalogue)
    raw = _raw_ranking(engine, "heart")
    first, second = sorted([source, "dup:heart"], key=raw.index)
    # k reaches past both copies in the raw ranking: k distinct results still come back.
    k = raw.index(second) + 1
    hits = engine.search(["heart"], k)[0]
    ids = [h.ad_id for h in hits]
    assert len(hits) == k and len({h.image_hash for h in hits}) == k
    assert first in ids and second not in ids, "the best-scoring copy stands for both"
    kept = hits[ids.index(first)]
    assert kept.duplicates == [second] and kept.image_hash == expected
    # The answer is the raw ranking with the second copy taken out, one more ad filling in.
    assert ids == [a for a in raw if a != second][:k]
    assert [h.rank for h in hits] == list(range(1, k + 1))
    assert all(h.duplicates == [] for h in hits if h.ad_id != first)

    # Every result of the whole catalogue: one per distinct image.
    everything = engine.search(["heart"], len(engine))[0]
    assert len(everything) == len(set(hashes.values()))

    # The frame the pyfunc and the service answer from carries the same list.
    frame = engine.search_frame(pd.DataFrame({"query": ["heart"], "k": [k]}))
    assert frame["ad_id"].tolist() == ids
    assert frame.loc[frame["ad_id"] == first, "duplicates"].iloc[0] == [second]


def catalogue_dir(cache, catalogue: Catalogue):
    from components.catalogue.versions import local_dir

    return local_dir(cache, catalogue.run_id)


def test_the_api_answers_the_collapsed_list(store, synthetic_dataset_dir, tmp_path):
    root, cfg = store
    source = _image_ad(synthetic_dataset_dir, "heart")
    _add_copy(cfg, synthetic_dataset_dir, tmp_path, source)
    with LiveServer(cfg) as server:
        raw = _raw_ranking(server.engine, "heart")
        first, second = sorted([source, "dup:heart"], key=raw.index)
        k = raw.index(second) + 1
        body = httpx.post(server.url + "/search", json={"query": "heart", "k": k}, timeout=30).json()
    results = body["results"]
    ids = [hit["ad_id"] for hit in results]
    assert len(ids) == k and second not in ids
    kept = results[ids.index(first)]
    assert kept["duplicates"] == [second] and len(kept["image_hash"]) == 64
    assert all(hit["duplicates"] == [] for hit in results if hit["ad_id"] != first)


def _as_format_1(directory) -> None:
    """Rewrite a saved catalogue version as the code before image hashes wrote it."""
    ads = pd.read_parquet(directory / ADS_FILE)
    ads[AD_COLUMNS].to_parquet(directory / ADS_FILE, index=False)
    meta = json.loads((directory / META_FILE).read_text())
    meta["format_version"] = 1
    meta.pop("words_shown")
    (directory / META_FILE).write_text(json.dumps(meta))


def test_a_version_without_hashes_still_loads_and_searches(store, synthetic_dataset_dir, tmp_path):
    root, cfg = store
    cache = cfg.data.cache_dir
    source = _image_ad(synthetic_dataset_dir, "heart")
    _add_copy(cfg, synthetic_dataset_dir, tmp_path, source)
    ref = open_model(URI, cache)
    old = tmp_path / "old-version"
    live.current_catalogue(ref, cache).save(old)
    _as_format_1(old)

    catalogue = Catalogue.load(old)
    assert catalogue.words_shown is None and set(catalogue.ads["image_hash"]) == {""}
    assert all(boxes == [] for boxes in catalogue.ads["word_boxes"])
    engine = SearchEngine(ref.bundle_dir, catalogue=catalogue)
    hits = engine.search(["heart"], 10)[0]
    assert len(hits) == 10 and all(h.word_regions == {} for h in hits)
    assert all(len(h.words_shown) <= 3 and h.words_shown == h.visual_words[:3] for h in hits)
    # The dataset's images are hashed once by the engine that serves the version; the added
    # image (a run: ref, hashed only when encoded) has none, so nothing collapses with it.
    by_id = {h.ad_id: h for h in engine.search(["heart"], len(engine))[0]}
    assert len(by_id) == len(engine)
    assert by_id["dup:heart"].image_hash is None and by_id[source].image_hash is not None

    # The version built next from it stores a hash for every dataset ad (`file:` refs).
    removed = catalogue.changed(removed=["dup:heart"])
    assert all(removed.ads["image_hash"])


def test_the_registered_ads_alone_search_with_their_images_hashed(store):
    """Version 0 (the bundle's own ads, no stored hashes): hashed once when served."""
    root, cfg = store
    cache = cfg.data.cache_dir
    ref = open_model(URI, cache)
    catalogue = live.current_catalogue(ref, cache)
    assert catalogue.version == 0
    engine = SearchEngine(ref.bundle_dir, catalogue=catalogue)
    hits = engine.search(["heart"], 5)[0]
    assert len(hits) == 5 and all(h.image_hash and len(h.image_hash) == 64 for h in hits)
