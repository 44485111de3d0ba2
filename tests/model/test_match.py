"""Behaviour of the six matching systems on a tiny synthetic dataset (CPU, a few steps)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from components.match.config import MatchConfig
from components.match.data import QuerySide, match_data
from components.match.encoder import TextTower, TowerConfig
from components.match.module import MatcherModule
from components.match.scorers import load_scorer
from components.match.systems import select_learning_rate, train_system
from components.systems import SYSTEMS, TWO_TOWER_SYSTEMS

pytestmark = pytest.mark.slow

# A few steps, one C and two weights: behaviour, not quality.
TINY = dict(lr=1e-4, max_steps=4, eval_every=2, batch_size=16, late_fusion_c=[0.1],
            late_fusion_weights=[0.0, 1.0], late_fusion_max_iter=20)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """train/valid/test MatchData of an 80-ad synthetic dataset, with image features."""
    from components.data.build import build_dataset
    from components.data.config import DataConfig, SyntheticConfig
    from components.data.format import read_dataset

    out_dir = tmp_path_factory.mktemp("match") / "dataset"
    build_dataset(DataConfig(source="synthetic", out_dir=out_dir, seed=0, max_ads=None,
                             synthetic=SyntheticConfig(num_ads=80, image_size=64)))
    dataset = read_dataset(out_dir)
    try:
        from components.vision.parts import PartsConfig, extract_parts

        cfg = PartsConfig(input_size=64, num_parts=4, logits_topk=0)
        features = extract_parts([dataset.image_file(p) for p in dataset.ads["image_path"]], cfg, "cpu",
                                 progress=False)
        rows = {aid: i for i, aid in enumerate(dataset.ads["ad_id"])}
    except ImportError:  # vision not available: random features keep the plumbing tested
        features, rows = None, None
    out = {}
    for name in ("train", "valid", "test"):
        part = dataset.split(name)
        if features is not None:
            split_features = features.take([rows[a] for a in part.ads["ad_id"]])
        else:
            rng = np.random.default_rng(0)
            n = len(part.ads)
            split_features = type("F", (), dict(pooled=rng.random((n, 1280), dtype=np.float32),
                                                parts=rng.random((n, 4, 1280), dtype=np.float32),
                                                mask=np.ones((n, 4), bool)))
        out[name] = match_data(part, features=split_features)
    return out


@pytest.fixture(scope="module")
def trained(splits, tmp_path_factory):
    """Every system fitted once (tiny budget), with the directory it was saved to."""
    root = tmp_path_factory.mktemp("systems")
    cfg = MatchConfig(**TINY)
    return {name: (train_system(name, cfg, splits["train"], splits["valid"], root / name), root / name)
            for name in SYSTEMS}


@pytest.mark.parametrize("name", SYSTEMS)
def test_system_scores_every_pair_and_reloads_identically(name, splits, trained):
    scorer, out_dir = trained[name]
    test = splits["test"]
    scores = scorer.score(test.queries, test.ads)
    assert scores.shape == (len(test.queries), len(test.ads))
    assert np.isfinite(scores).all()
    reloaded = load_scorer(out_dir / "scorer")
    np.testing.assert_allclose(reloaded.score(test.queries, test.ads), scores, atol=1e-6)
    if name in TWO_TOWER_SYSTEMS:  # the score is the inner product of the indexed vectors
        q, a = scorer.encode_queries(test.queries), scorer.encode_ads(test.ads)
        assert q.shape[1] == a.shape[1] == 384
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(q @ a.T, scores, atol=1e-5)


@pytest.mark.parametrize("name", ["text_zero_shot", "text_only"])
def test_query_equal_to_an_ad_title_puts_that_ad_in_the_top_5(name, splits, trained):
    scorer, _ = trained[name]
    ads = splits["test"].ads
    titles = {}
    for i, title in enumerate(ads.titles):  # ads with a unique title
        titles.setdefault(title, []).append(i)
    rows = [idx[0] for title, idx in titles.items() if len(idx) == 1][:8]
    queries = QuerySide([f"t{i}" for i in rows], [ads.titles[i] for i in rows])
    scores = scorer.score(queries, ads)
    for k, row in enumerate(rows):
        top5 = np.argsort(-scores[k], kind="stable")[:5]
        assert row in top5, f"{name}: ad {ads.titles[row]!r} not in the top 5 for its own title"


@pytest.mark.parametrize("name", ["lexical", "text_zero_shot", "text_only", "ours"])
def test_casing_and_spacing_do_not_move_the_top_1(name, splits, trained):
    scorer, _ = trained[name]
    test = splits["test"]
    texts = test.queries.texts[:10]
    plain = scorer.score(QuerySide([f"q{i}" for i in range(len(texts))], texts), test.ads)
    noisy = scorer.score(QuerySide([f"q{i}" for i in range(len(texts))],
                                   ["  " + "   ".join(t.upper().split()) + " " for t in texts]), test.ads)
    np.testing.assert_array_equal(plain.argmax(1), noisy.argmax(1))


def test_training_is_deterministic_for_a_seed(splits, tmp_path):
    cfg = MatchConfig(**TINY)
    test = splits["test"]
    first = train_system("implicit_fusion", cfg, splits["train"], splits["valid"], tmp_path / "a")
    second = train_system("implicit_fusion", cfg, splits["train"], splits["valid"], tmp_path / "b")
    np.testing.assert_array_equal(first.score(test.queries, test.ads), second.score(test.queries, test.ads))
    other = train_system("implicit_fusion", cfg.model_copy(update={"seed": 1}), splits["train"],
                         splits["valid"], tmp_path / "c")
    assert not np.array_equal(first.score(test.queries, test.ads), other.score(test.queries, test.ads))


def test_training_changes_the_model_and_keeps_the_best_checkpoint(splits, trained):
    zero_shot, _ = trained["text_zero_shot"]
    text_only, out_dir = trained["text_only"]
    test = splits["test"]
    assert not np.allclose(zero_shot.score(test.queries, test.ads), text_only.score(test.queries, test.ads))
    info = text_only.info
    assert info["steps"] == TINY["max_steps"]
    assert [step for step, _ in info["val_history"]] == [2, 4]
    assert info["val_ndcg@10"] == max(v for _, v in info["val_history"])
    # The Lightning checkpoint holds only the trained tensors and reloads on its own.
    module = MatcherModule.load_from_checkpoint(out_dir / "run" / "checkpoints" / "best.ckpt",
                                                map_location="cpu")
    expected = text_only.net.trainable_state_dict()
    for key, value in module.net.trainable_state_dict().items():
        torch.testing.assert_close(value, expected[key].cpu(), atol=0, rtol=0)


def test_ours_reads_title_and_aligned_words(splits, tmp_path):
    train, valid = splits["train"], splits["valid"]
    words = [[("planted", 1.0), ("word", 0.5)] for _ in train.ads.ad_ids]
    train_words = replace(train, ads=replace(train.ads, words=words))
    scorer = train_system("ours", MatchConfig(**TINY), train_words, valid, tmp_path)
    assert scorer.ad_texts(train_words.ads)[0].endswith("[SEP] planted word")
    assert scorer.ad_texts(valid.ads) == valid.ads.titles  # no words: the title alone


def test_learning_rate_search_picks_the_best_grid_value(splits, tmp_path):
    cfg = MatchConfig(**{**TINY, "lr": None, "lr_grid": [1e-5, 3e-4]})
    best, values = select_learning_rate("text_only", cfg, splits["train"], splits["valid"], tmp_path)
    assert set(values) == {1e-5, 3e-4}
    assert values[best] == max(values.values())
    with pytest.raises(ValueError):
        select_learning_rate("lexical", cfg, splits["train"], splits["valid"], tmp_path)


@pytest.mark.parametrize("trainable_layers", [0, 2, 6])
def test_cached_prefix_plus_top_layers_equals_the_full_model(trainable_layers):
    tower = TextTower(TowerConfig(trainable_layers=trainable_layers)).eval()
    texts = ["red ball", "a star and a cup on a table [SEP] gold star", "x", "red ball", "",
             "Architetto Francesco Rollandin"]
    with torch.no_grad():
        reference = tower.full_model_embedding(texts, 48)  # the unmodified HF forward
        uncached = tower.encode_text(texts, 48)
        tower.cache_texts(texts, 48)
        assert tower.prefix_states(texts, 48)[0] is tower.prefix_states(texts, 48)[0]  # from the cache
        cached = tower.encode_text(texts, 48)
    torch.testing.assert_close(uncached, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, reference, atol=1e-5, rtol=0)
    assert not torch.allclose(cached[0], cached[1])
