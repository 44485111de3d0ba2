"""A registered model's own ads (catalogue version 0, its search bundle's) carry what the search
page shows beside an ad, stored when the bundle is built at registration: each ad's image hash
and, for each of its first `align.words_shown` words, the part of the image the alignment
scores highest for it. The engine and the HTTP API serve them; a bundle built before they
existed still loads and searches, with no regions."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import URI, LiveServer

from components.align.model import read_words_shown
from components.align.stage import load_ad_words
from components.catalogue import live
from components.data.format import read_dataset
from components.registry.models import open_model
from components.search.bundle import (
    ALIGN_DIR,
    CATALOGUE_FILE,
    META_FILE,
    build_bundle,
    bundle_catalogue,
    read_meta,
)
from components.search.engine import SearchEngine, ad_features
from components.vision.stage import load_features

pytestmark = pytest.mark.slow

QUERIES = ["heart", "star", "leaf"]


def _file_hashes(dataset_dir: Path) -> dict[str, str]:
    ads = pd.read_parquet(dataset_dir / "ads.parquet")
    return {a: hashlib.sha256((dataset_dir / p).read_bytes()).hexdigest()
            for a, p in zip(ads["ad_id"], ads["image_path"], strict=True)}


def _expected_boxes(engine: SearchEngine, dataset_dir: Path, cache: Path, words: dict[str, list[str]]):
    """ad id -> the box of each word in `words[ad]`, computed apart from the code under test:
    each part's logit of the word under the head, the best valid part, as fractions of the image."""
    dataset = read_dataset(dataset_dir)
    features = ad_features(dataset, engine.vision, cache)
    z, mask = engine.alignment.instances(features)
    with torch.inference_mode():
        logits = engine.alignment.head.instance_logits(torch.as_tensor(z[:, 1:])).numpy()  # (N, P, V)
    vocabulary = {w: j for j, w in enumerate(engine.alignment.words)}
    out = {}
    for i, ad_id in enumerate(dataset.ads["ad_id"].astype(str)):
        width, height = features.image_sizes[i]
        boxes = []
        for word in words[ad_id]:
            best = int(np.argmax(np.where(mask[i, 1:], logits[i, :, vocabulary[word]], -np.inf)))
            boxes.append(features.boxes[i, best] / [width, height, width, height])
        out[ad_id] = boxes
    return out


def test_the_registered_ads_serve_their_regions_and_hashes(store, synthetic_dataset_dir):
    root, cfg = store
    cache = cfg.data.cache_dir
    ref = open_model(URI, cache)
    meta = read_meta(ref.bundle_dir)
    shown = read_words_shown(ref.bundle_dir / ALIGN_DIR)
    assert shown == cfg.align.words_shown == 3
    assert meta["format_version"] == 2 and meta["words_shown"] == shown and meta["word_regions"] is True

    catalogue = live.current_catalogue(ref, cache)
    assert catalogue.version == 0 and catalogue.words_shown == shown
    ads = catalogue.ads.set_index("ad_id")
    assert ads["image_hash"].to_dict() == _file_hashes(synthetic_dataset_dir), "stored, each its file's sha256"
    words = {a: list(ws)[:shown] for a, ws in ads["words"].items()}
    assert all(len(ws) == shown for ws in words.values())
    engine = SearchEngine(ref.bundle_dir, catalogue=catalogue)
    expected = _expected_boxes(engine, synthetic_dataset_dir, cache, words)
    for ad_id, boxes in ads["word_boxes"].items():
        assert len(boxes) == len(expected[ad_id]) == shown, ad_id
        for box, want in zip(boxes, expected[ad_id], strict=True):
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, (ad_id, box)
            assert np.allclose(box, want, atol=1e-4), (ad_id, box, want)

    # The engine: each hit's shown words with their regions and its stored hash.
    hits = {q: engine.search([q], 10)[0] for q in QUERIES}
    for hit in (h for found in hits.values() for h in found):
        assert hit.words_shown == hit.visual_words[:shown] == words[hit.ad_id]
        assert hit.word_regions == dict(zip(words[hit.ad_id], ads.loc[hit.ad_id, "word_boxes"], strict=True))
        assert hit.image_hash == ads.loc[hit.ad_id, "image_hash"]

    # The HTTP API: the same fields, as a client reads them.
    with LiveServer(cfg) as server:
        bodies = {q: httpx.post(server.url + "/search", json={"query": q, "k": 10}, timeout=30).json()
                  for q in QUERIES}
    for q, body in bodies.items():
        assert body["catalogue_version"] == "v0"
        assert [r["ad_id"] for r in body["results"]] == [h.ad_id for h in hits[q]]
        for result in body["results"]:
            ad_id = result["ad_id"]
            assert result["image_hash"] == ads.loc[ad_id, "image_hash"]
            assert result["words_shown"] == words[ad_id]
            assert set(result["word_regions"]) == set(words[ad_id])
            for word, box in result["word_regions"].items():
                assert np.allclose(box, ads.loc[ad_id, "word_boxes"][words[ad_id].index(word)], atol=1e-6)


def _as_format_1(bundle_dir: Path) -> None:
    """Rewrite a bundle as the code before hashes and regions wrote it."""
    table = pd.read_parquet(bundle_dir / CATALOGUE_FILE)
    table[["ad_id", "title", "words", "scores"]].to_parquet(bundle_dir / CATALOGUE_FILE, index=False)
    meta = json.loads((bundle_dir / META_FILE).read_text())
    for key in ("words_shown", "word_regions", "annotate_seconds"):
        meta.pop(key)
    meta["format_version"] = 1
    (bundle_dir / META_FILE).write_text(json.dumps(meta))


def test_a_bundle_from_before_regions_still_loads_and_searches(store, synthetic_dataset_dir, tmp_path):
    root, cfg = store
    cache = cfg.data.cache_dir
    ref = open_model(URI, cache)
    old = tmp_path / "old-bundle"
    shutil.copytree(ref.bundle_dir, old)
    _as_format_1(old)

    assert read_meta(old)["format_version"] == 1
    catalogue = bundle_catalogue(old, dataset_dir=synthetic_dataset_dir)
    assert catalogue.words_shown is None and set(catalogue.ads["image_hash"]) == {""}
    assert all(boxes == [] for boxes in catalogue.ads["word_boxes"])
    engine = SearchEngine(old, catalogue=catalogue)
    new = SearchEngine(ref.bundle_dir, catalogue=live.current_catalogue(ref, cache))
    hashes = _file_hashes(synthetic_dataset_dir)
    for q in QUERIES:
        hits = engine.search([q], 10)[0]
        assert [h.ad_id for h in hits] == [h.ad_id for h in new.search([q], 10)[0]], "the same index, same answer"
        assert all(h.word_regions == {} and h.words_shown == h.visual_words[:3] for h in hits)
        # Its dataset images are hashed once by the engine that serves it.
        assert all(h.image_hash == hashes[h.ad_id] for h in hits)

    (old / META_FILE).write_text(json.dumps({**read_meta(old), "format_version": 3}))
    with pytest.raises(ValueError, match=r"bundle\.json: bundle format 3, expected one of \(1, 2\)"):
        SearchEngine(old)


def _stage_output(root: Path, stage: str, name: str) -> Path:
    """The one output `name` of a stage of the store's flow run."""
    (found,) = (root / "flow" / stage).glob(f"*/{name}")
    return found


def test_a_bundle_built_without_features_stores_hashes_but_no_regions(store, synthetic_dataset_dir, tmp_path):
    root, cfg = store
    ref = open_model(URI, cfg.data.cache_dir)
    words, word_logits = load_ad_words(_stage_output(root, "align", "words.parquet"))
    inputs = {"align_dir": _stage_output(root, "align", "model"), "scorer_dir": _stage_output(root, "matcher", "scorer"),
              "dataset_dir": synthetic_dataset_dir, "words": words, "word_logits": word_logits,
              "vision": cfg.vision, "index_cfg": cfg.retrieve, "dataset_hash": "test"}
    features = load_features(_stage_output(root, "features", "parts.npz"))
    n = len(pd.read_parquet(synthetic_dataset_dir / "ads.parquet"))
    with pytest.raises(ValueError, match=rf"features for {n - 1} images, but .*ads\.parquet has {n} ads"):
        build_bundle(tmp_path / "short", features=features.take(np.arange(len(features) - 1)), **inputs)
    assert not (tmp_path / "short").exists(), "refused before anything is written"

    bundle = build_bundle(tmp_path / "plain", features=None, **inputs)
    meta = read_meta(bundle)
    assert meta["words_shown"] == 3 and meta["word_regions"] is False
    catalogue = bundle_catalogue(bundle)
    assert catalogue.words_shown == 3
    assert dict(zip(catalogue.ads["ad_id"], catalogue.ads["image_hash"], strict=True)) == \
        _file_hashes(synthetic_dataset_dir)
    assert all(boxes == [[], [], []] for boxes in catalogue.ads["word_boxes"])
    # The same words and ranking as the registered bundle (built with the features).
    registered = bundle_catalogue(ref.bundle_dir)
    assert catalogue.ads["words"].tolist() == registered.ads["words"].tolist()
    hits = SearchEngine(bundle, catalogue=catalogue).search(["heart"], 5)[0]
    assert all(h.word_regions == {} and len(h.words_shown) == 3 for h in hits)
