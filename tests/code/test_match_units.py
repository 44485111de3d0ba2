"""Matcher building blocks on toy inputs with hand-checked answers (no model weights)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from components.match.config import MatchConfig
from components.match.data import AdSide, MatchData, QuerySide, ad_text, training_pairs
from components.match.lexical import bm25_scores, bm25_tokens
from components.match.losses import InfoNCELoss
from components.match.probe import fit_logistic, term_labels, zscore_rows

# ----------------------------------------------------------------------------- loss


def test_infonce_on_identical_embeddings_is_log_batch_size():
    # Every query and ad is the same unit vector: all logits equal, the loss is log(B).
    e = torch.nn.functional.normalize(torch.ones(4, 8), dim=-1)
    out = InfoNCELoss(temperature=0.05, symmetric=True)(e, e)
    assert out["loss"].item() == pytest.approx(math.log(4), abs=1e-6)
    assert out["query_to_ad"].item() == pytest.approx(math.log(4), abs=1e-6)


def test_infonce_on_orthonormal_pairs_matches_hand_computed_value():
    # query_i = ad_i = e_i: logit 1/t on the diagonal, 0 elsewhere.
    # loss = -log(e^(1/t) / (e^(1/t) + (B-1))) = log(1 + (B-1) e^(-1/t)).
    t, b = 0.5, 3
    e = torch.eye(b)
    expected = math.log(1 + (b - 1) * math.exp(-1 / t))
    out = InfoNCELoss(temperature=t, symmetric=False)(e, e)
    assert out["loss"].item() == pytest.approx(expected, abs=1e-6)
    assert out["ad_to_query"].item() == 0.0


def test_infonce_masks_in_batch_false_negatives():
    t, b = 0.5, 3
    e = torch.eye(b)
    false_negative = torch.zeros(b, b, dtype=torch.bool)
    false_negative[0, 1] = True  # ad 1 is also relevant to query 0: not a negative for it
    false_negative[0, 0] = True  # the diagonal is the positive and never masked
    out = InfoNCELoss(temperature=t, symmetric=False)(e, e, false_negative)
    row0 = math.log(1 + (b - 2) * math.exp(-1 / t))
    other = math.log(1 + (b - 1) * math.exp(-1 / t))
    assert out["loss"].item() == pytest.approx((row0 + 2 * other) / 3, abs=1e-6)
    # Symmetric: ad 1's row masks query 0 (the transpose).
    sym = InfoNCELoss(temperature=t, symmetric=True)(e, e, false_negative)
    assert sym["ad_to_query"].item() == pytest.approx((row0 + 2 * other) / 3, abs=1e-6)


# ----------------------------------------------------------------------------- ad text


def test_ad_text_formats_title_and_words():
    assert ad_text("Red Ball", [("toy", 0.9), ("sphere", 0.5)]) == "Red Ball [SEP] toy sphere"
    assert ad_text("Red Ball", None) == "Red Ball"
    assert ad_text("Red Ball", []) == "Red Ball"
    assert ad_text("", [("toy", 0.9)]) == "toy"
    assert ad_text(None, ["toy", "ball"]) == "toy ball"
    assert ad_text("  Red   Ball ", ["toy", "toy", " ball "], max_words=1) == "Red Ball [SEP] toy"
    assert ad_text("", []) == ""


def test_ad_side_texts_use_words_only_when_asked():
    ads = AdSide(ad_ids=["a", "b"], titles=["cat", ""], words=[[("pet", 1.0)], []])
    assert ads.texts(use_words=False) == ["cat", ""]
    assert ads.texts(use_words=True) == ["cat [SEP] pet", ""]
    with pytest.raises(ValueError):
        AdSide(ad_ids=["a"], titles=["x"], pooled=np.zeros((2, 4)))


# ----------------------------------------------------------------------------- pairs


def _toy_match_data(num_queries: int = 20) -> MatchData:
    queries = QuerySide([f"q{i}" for i in range(num_queries)], [f"word{i}" for i in range(num_queries)])
    ads = AdSide([f"a{i}" for i in range(10)], [f"title {i}" for i in range(10)])
    rows = [(f"q{i}", f"a{(i + j) % 10}", 1) for i in range(num_queries) for j in range(2)]
    qrels = pd.DataFrame(rows, columns=["query_id", "ad_id", "relevance"]).assign(split="train")
    return MatchData(queries=queries, ads=ads, qrels=qrels)


def test_training_pairs_subsample_queries_nested_and_seeded():
    data = _toy_match_data()
    full = training_pairs(data, 1.0, seed=0)
    assert len(full) == 40
    half = training_pairs(data, 0.5, seed=0)
    quarter = training_pairs(data, 0.25, seed=0)
    assert len(np.unique(half[:, 0])) == 10 and len(np.unique(quarter[:, 0])) == 5
    # Every pair of a kept query is kept; smaller fractions are subsets of larger ones.
    assert len(half) == 20
    assert set(map(tuple, quarter)) <= set(map(tuple, half)) <= set(map(tuple, full))
    np.testing.assert_array_equal(half, training_pairs(data, 0.5, seed=0))
    assert not np.array_equal(half, training_pairs(data, 0.5, seed=1))
    with pytest.raises(ValueError):
        training_pairs(data, 0.0)


# ----------------------------------------------------------------------------- lexical


def test_bm25_ranks_the_matching_title_first():
    docs = ["red ball", "blue cup", "green tree with a red star", "AZ-lizard"]
    scores = bm25_scores(["ball", "lizard", "unknownword", "RED  Ball"], docs)
    assert scores.shape == (4, 4)
    assert scores[0].argmax() == 0 and scores[0, 1] == 0.0
    assert scores[1].argmax() == 3  # hyphenated title pieces are tokens too
    assert not scores[2].any()
    np.testing.assert_allclose(scores[3], bm25_scores(["red ball"], docs)[0])  # casing, spacing
    assert bm25_tokens("AZ-lizard") == ["az-lizard", "az", "lizard"]
    assert not bm25_scores(["ball"], ["", ""]).any()


# ----------------------------------------------------------------------------- probe


def test_fit_logistic_matches_sklearn():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    y = np.stack([(x[:, 0] + 0.5 * rng.normal(size=200) > 0.8), (x[:, 1] - x[:, 2] > 0)], axis=1).astype(float)
    w, b = fit_logistic(x, y, c=0.5, max_iter=500, tol=1e-9)
    for j in range(2):
        ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=5000).fit(x, y[:, j])
        np.testing.assert_allclose(w[j], ref.coef_[0], atol=1e-4)
        assert b[j] == pytest.approx(ref.intercept_[0], abs=1e-4)


def test_term_labels_and_zscore():
    queries = QuerySide(["q0", "q1"], ["red ball", "ball"])
    ads = AdSide(["a0", "a1", "a2"], ["x", "y", "z"])
    data = MatchData(queries, ads, pd.DataFrame(columns=["query_id", "ad_id", "relevance", "split"]))
    terms, labels = term_labels(data, np.array([[0, 0], [1, 2]]))
    assert terms == ["ball", "red"]
    np.testing.assert_array_equal(labels, [[1, 1], [0, 0], [1, 0]])
    z = zscore_rows(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    np.testing.assert_allclose(z[0], [-1.224744871, 0, 1.224744871], atol=1e-8)
    assert not z[1].any()


def test_match_config_forbids_unknown_keys():
    with pytest.raises(ValidationError):
        MatchConfig(learning_rate=1e-3)
    assert MatchConfig().trainable_layers == 2


def test_calibrated_word_channel_is_the_per_query_z_score_fusion():
    """One inner product of the calibrated query and the ad vectors ranks every query's ads
    exactly as z(text) + w * z(channel), z over the ads whose covariances were taken."""
    from components.match.words import WordChannel, covariance

    rng = np.random.default_rng(0)
    text_dim, vocabulary = 8, ["cat", "dog", "tree", "car"]
    ads_text = rng.normal(size=(40, text_dim))
    evidence = rng.normal(size=(40, len(vocabulary))) * np.array([1.0, 3.0, 0.5, 2.0])
    queries = torch.as_tensor(rng.normal(size=(5, text_dim)), dtype=torch.float32)
    channel = WordChannel(vocabulary, text_dim=text_dim)
    terms = channel.query_terms(["cat", "dog tree", "car", "unknown words", "cat car"])
    assert not channel.calibrated
    channel.set_calibration(covariance(ads_text), covariance(evidence), 0.75)
    assert channel.calibrated
    fused = channel.calibrated_query(queries, terms).numpy() @ np.hstack([ads_text, evidence]).T
    expected = zscore_rows(queries.numpy() @ ads_text.T) + 0.75 * zscore_rows(terms.numpy() @ evidence.T)
    shift = lambda s: s - s.mean(1, keepdims=True)  # noqa: E731  per-query constants do not rank
    scale = math.sqrt(40 / 39)  # covariance divides by n - 1, z-scores by n
    np.testing.assert_allclose(shift(fused) * scale, shift(expected), atol=1e-4)
    # the query without a vocabulary word is ranked by its text score alone
    np.testing.assert_allclose(shift(fused)[3] * scale, shift(zscore_rows(queries.numpy() @ ads_text.T))[3], atol=1e-4)
