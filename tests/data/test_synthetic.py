"""The synthetic source: deterministic, structured, and honest about what only the image shows."""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components.data.build import build_dataset
from components.data.config import DataConfig, SyntheticConfig
from components.data.format import SPLITS, dataset_hash, read_dataset
from components.data.synthetic import (
    FILLER_WORDS,
    PART_KINDS,
    PART_WORDS,
    THEMES,
    TRUTH_FILE,
    build_synthetic,
    load_synthetic_truth,
)

NUM_ADS = 160


def _cfg(seed: int = 0, **synthetic) -> DataConfig:
    return DataConfig(source="synthetic", seed=seed, synthetic=SyntheticConfig(num_ads=NUM_ADS, **synthetic))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    out = {}
    for name, seed in (("a", 0), ("b", 0), ("other", 1)):
        out[name] = build_dataset(_cfg(seed), root / name).out_dir
    return out


@pytest.fixture(scope="module")
def dataset(built):
    return read_dataset(built["a"])


@pytest.fixture(scope="module")
def truth(built):
    return load_synthetic_truth(built["a"])


def _image_bytes(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "images").iterdir())}


def test_same_seed_gives_identical_tables_images_and_truth(built):
    a, b = read_dataset(built["a"]), read_dataset(built["b"])
    pd.testing.assert_frame_equal(a.ads, b.ads)
    pd.testing.assert_frame_equal(a.queries, b.queries)
    pd.testing.assert_frame_equal(a.qrels, b.qrels)
    assert _image_bytes(built["a"]) == _image_bytes(built["b"])
    assert (built["a"] / TRUTH_FILE).read_bytes() == (built["b"] / TRUTH_FILE).read_bytes()
    # the whole directory, README.txt included (no timings in it): the same content hash, so a
    # rebuild leaves DVC and the retraining flow's caches valid
    assert dataset_hash(built["a"]) == dataset_hash(built["b"])


def test_different_seed_gives_different_data(built):
    a, other = read_dataset(built["a"]), read_dataset(built["other"])
    assert not a.ads["title"].equals(other.ads["title"])
    bytes_a, bytes_other = _image_bytes(built["a"]), _image_bytes(built["other"])
    assert bytes_a.keys() == bytes_other.keys()
    assert sum(bytes_a[k] != bytes_other[k] for k in bytes_a) > 0.9 * len(bytes_a)


def test_tables_images_and_truth_agree(dataset, truth, built):
    assert len(dataset.ads) == NUM_ADS
    assert dataset.ads["ad_id"].is_unique and dataset.queries["query_id"].is_unique
    assert set(truth["ads"]) == set(dataset.ads["ad_id"])
    size = truth["image_size"]
    for row in dataset.ads.itertuples():
        ad = truth["ads"][row.ad_id]
        assert ad["title"] == row.title and ad["split"] == row.split and ad["theme"] == row.category
        with Image.open(built["a"] / row.image_path) as im:
            assert im.format == "PNG" and im.size == (size, size)


def test_parts_are_in_bounds_non_overlapping_and_drawn(dataset, truth, built):
    for ad_id, ad in list(truth["ads"].items())[:40]:
        image = np.asarray(Image.open(built["a"] / ad["image_path"]).convert("RGB")).astype(int)
        background = image[0, 0]
        boxes = [p["bbox"] for p in ad["parts"]]
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]
            crop = image[y0:y1, x0:x1]
            # Most of a part's box is ink, not background (shapes fill their box well).
            assert (np.abs(crop - background).sum(axis=2) > 30).mean() > 0.2, ad_id
        for (a0, b0, a1, b1), (c0, d0, c1, d1) in combinations(boxes, 2):
            assert a1 <= c0 or c1 <= a0 or b1 <= d0 or d1 <= b0, f"{ad_id}: parts overlap"
        kinds = [p["kind"] for p in ad["parts"]]
        assert len(set(kinds)) == len(kinds), f"{ad_id}: a kind repeats within an ad"


def test_vocabulary_is_visually_distinct_and_fillers_never_collide():
    assert 12 <= len(PART_KINDS) <= 16
    words = set(PART_WORDS.values())
    assert len(words) == len(PART_KINDS)
    assert not (FILLER_WORDS & words)
    looks = {(k.kind, k.colour_name, k.pattern) for k in PART_KINDS}
    assert len({k.colour_name for k in PART_KINDS}) == len(PART_KINDS)
    assert len(looks) == len(PART_KINDS)
    assert {k.pattern for k in PART_KINDS} == {"solid", "stripes", "dots", "checks"}


def test_titles_name_only_some_parts_and_the_rest_is_filler(truth):
    words = set(PART_WORDS.values())
    multi_part = 0
    for ad_id, ad in truth["ads"].items():
        tokens = ad["title"].split()
        assert all(t in words or t in FILLER_WORDS for t in tokens), ad["title"]
        named_in_title = {t for t in tokens if t in words}
        flagged = {p["word"] for p in ad["parts"] if p["named_in_title"]}
        assert named_in_title == flagged, ad_id
        if len(ad["parts"]) > 1:
            multi_part += 1
            assert len(flagged) < len(ad["parts"]), f"{ad_id}: title names every part"
    assert multi_part > 0


def test_truth_is_consistent_with_qrels(dataset, truth):
    words_of = {ad_id: {p["word"] for p in ad["parts"]} for ad_id, ad in truth["ads"].items()}
    split_of = dict(zip(dataset.ads["ad_id"], dataset.ads["split"], strict=True))
    assert (dataset.qrels["relevance"] == 1).all()
    relevant = dataset.qrels.groupby("query_id")["ad_id"].apply(set).to_dict()
    for query in dataset.queries.itertuples():
        expected = {a for a, w in words_of.items() if split_of[a] == query.split and set(query.text.split()) <= w}
        assert expected, query.query_id
        assert relevant.get(query.query_id, set()) == expected, query.query_id
    qrel_splits = dataset.qrels["ad_id"].map(split_of)
    assert (qrel_splits == dataset.qrels["split"]).all()


def test_queries_are_words_and_frequent_pairs(dataset, truth):
    cfg = _cfg()
    pair_counts = Counter()
    for ad in truth["ads"].values():
        pair_counts.update(combinations(sorted(p["word"] for p in ad["parts"]), 2))
    texts = set(dataset.queries["text"])
    words = set(PART_WORDS.values())
    assert {t for t in texts if " " not in t} == words
    pairs = {tuple(t.split()) for t in texts if " " in t}
    assert pairs, "no pair queries"
    assert all(pair_counts[p] >= cfg.pair_min_ads for p in pairs)
    assert all(q.query_id == f"q:{q.split}:{q.text}" for q in dataset.queries.itertuples())


def test_image_only_queries_exist(dataset):
    titles = dict(zip(dataset.ads["ad_id"], dataset.ads["title"].str.split().map(set), strict=True))
    texts = dict(zip(dataset.queries["query_id"], dataset.queries["text"].str.split(), strict=True))
    image_only = [
        not (set(texts[q]) & titles[a]) for q, a in zip(dataset.qrels["query_id"], dataset.qrels["ad_id"], strict=True)
    ]
    assert 0.1 < np.mean(image_only) < 0.9


def test_every_split_has_ads_and_queries(dataset):
    for split in SPLITS:
        part = dataset.split(split)
        assert len(part.ads) > 0 and len(part.queries) > 0 and len(part.qrels) > 0, split
    counts = dataset.ads["split"].value_counts()
    assert counts["train"] > counts["test"] > counts["valid"]


def test_cooccurrence_follows_themes(truth):
    in_theme = [p["word"] in THEMES[ad["theme"]] for ad in truth["ads"].values() for p in ad["parts"]]
    assert np.mean(in_theme) > 0.75
    # Not uniform: some pairs are much more frequent than others.
    pair_counts = Counter()
    for ad in truth["ads"].values():
        pair_counts.update(combinations(sorted(p["word"] for p in ad["parts"]), 2))
    all_pairs = list(combinations(sorted(PART_WORDS.values()), 2))
    counts = np.array([pair_counts[p] for p in all_pairs])
    assert counts.max() >= 4 * max(1, np.median(counts))


def test_build_returns_stats_and_writes_truth(tmp_path):
    dataset, stats = build_synthetic(_cfg(seed=3, parts_per_ad_min=1, parts_per_ad_max=5), tmp_path)
    assert stats["num_ads"] == NUM_ADS and stats["num_part_kinds"] == len(PART_KINDS)
    assert 0 < stats["image_only_share"] < 1
    assert stats["positive_qrels"] == len(dataset.qrels)
    truth = json.loads((tmp_path / TRUTH_FILE).read_text())
    assert truth["vocabulary"] == PART_WORDS
    assert {len(ad["parts"]) for ad in truth["ads"].values()} == {1, 2, 3, 4, 5}


def test_bad_config_and_missing_truth_are_named(tmp_path):
    with pytest.raises(ValueError, match="parts_per_ad_max"):
        build_synthetic(_cfg(parts_per_ad_min=3, parts_per_ad_max=2), tmp_path / "x")
    with pytest.raises(ValueError, match="parts_per_ad_max"):
        build_synthetic(_cfg(parts_per_ad_max=len(PART_KINDS) + 1), tmp_path / "y")
    with pytest.raises(FileNotFoundError, match=TRUTH_FILE):
        load_synthetic_truth(tmp_path)
