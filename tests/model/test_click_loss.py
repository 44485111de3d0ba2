"""What the clicks say, in the matcher: per-pair weights and explicit negatives in InfoNCE, the
batches that carry them, and that data without either trains exactly as before."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from components.match.data import AdSide, MatchData, QuerySide
from components.match.losses import InfoNCELoss
from components.match.module import MatchBatches


def _unit(rows: list[list[float]]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


QUERY = _unit([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
AD = _unit([[1.0, 0.2], [0.3, 1.0], [0.5, 1.0]])


def _row_ce(logits: torch.Tensor) -> list[float]:
    """Per-row cross-entropy with the positive on the diagonal, by hand."""
    return [math.log(sum(math.exp(v) for v in row if v != -math.inf)) - float(row[i])
            for i, row in enumerate(logits.tolist())]


# --------------------------------------------------------------------------- the loss


def test_weights_give_the_weighted_mean_of_the_rows_normalised_to_mean_one():
    loss = InfoNCELoss(temperature=0.5, symmetric=False)
    ce = _row_ce(QUERY @ AD.T / 0.5)
    plain = loss(QUERY, AD)["loss"]
    assert float(plain) == pytest.approx(sum(ce) / 3)
    weights = torch.tensor([1.0, 2.0, 5.0])
    weighted = loss(QUERY, AD, weights=weights)["loss"]
    assert float(weighted) == pytest.approx((ce[0] + 2 * ce[1] + 5 * ce[2]) / 8)
    # Only the weights' proportions count; equal weights are the plain mean.
    assert float(loss(QUERY, AD, weights=weights * 7.0)["loss"]) == pytest.approx(float(weighted))
    assert float(loss(QUERY, AD, weights=torch.full((3,), 3.0))["loss"]) == pytest.approx(float(plain))
    with pytest.raises(ValueError, match="weights"):
        loss(QUERY, AD, weights=torch.tensor([1.0, 0.0, 1.0]))


def test_symmetric_loss_weights_both_directions():
    loss = InfoNCELoss(temperature=0.5, symmetric=True)
    logits = QUERY @ AD.T / 0.5
    weights = [1.0, 3.0, 0.5]
    q2a, a2q = _row_ce(logits), _row_ce(logits.T)
    out = loss(QUERY, AD, weights=torch.tensor(weights))
    assert float(out["query_to_ad"]) == pytest.approx(sum(w * c for w, c in zip(weights, q2a, strict=True)) / 4.5)
    assert float(out["ad_to_query"]) == pytest.approx(sum(w * c for w, c in zip(weights, a2q, strict=True)) / 4.5)


def test_extra_negatives_are_columns_every_query_sees_masked_where_relevant():
    loss = InfoNCELoss(temperature=0.5, symmetric=True)
    extra = _unit([[1.0, 0.1], [0.0, 1.0]])  # close to query 0, and equal to query 1
    fn = torch.zeros(3, 3, dtype=torch.bool)
    out = loss(QUERY, AD, fn, extra_ad=extra)
    logits = torch.cat([QUERY @ AD.T, QUERY @ extra.T], dim=1) / 0.5
    assert float(out["query_to_ad"]) == pytest.approx(sum(_row_ce(logits)) / 3)
    # Hard negatives make the query -> ad direction harder; the ad -> query direction is as before.
    before = loss(QUERY, AD, fn)
    assert float(out["query_to_ad"]) > float(before["query_to_ad"])
    assert float(out["ad_to_query"]) == float(before["ad_to_query"])
    # Masked for every query, they leave the loss as it was; masked for one, only its row changes.
    all_masked = loss(QUERY, AD, fn, extra_ad=extra, extra_false_negative=torch.ones(3, 2, dtype=torch.bool))
    assert float(all_masked["loss"]) == pytest.approx(float(before["loss"]))
    masked = torch.tensor([[False, False], [False, True], [False, False]])
    one = loss(QUERY, AD, fn, extra_ad=extra, extra_false_negative=masked)
    expected = _row_ce(logits.masked_fill(torch.cat([torch.zeros(3, 3, dtype=torch.bool), masked], 1), -math.inf))
    assert float(one["query_to_ad"]) == pytest.approx(sum(expected) / 3)


def test_without_weights_and_extra_negatives_the_loss_is_the_one_of_before():
    """The plain path is F.cross_entropy's mean over the masked in-batch logits, bit for bit."""
    torch.manual_seed(0)
    query, ad = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    fn = torch.rand(8, 8) < 0.2
    logits = query @ ad.T / 0.05
    masked = logits.masked_fill(fn & ~torch.eye(8, dtype=torch.bool), float("-inf"))
    q2a = F.cross_entropy(masked, torch.arange(8))
    a2q = F.cross_entropy(masked.T, torch.arange(8))
    out = InfoNCELoss(0.05, True)(query, ad, fn)
    assert torch.equal(out["query_to_ad"], q2a) and torch.equal(out["ad_to_query"], a2q)
    assert torch.equal(out["loss"], (q2a + a2q) / 2)
    empty = InfoNCELoss(0.05, True)(query, ad, fn, extra_ad=torch.zeros(0, 16))
    assert torch.equal(empty["loss"], out["loss"])


# --------------------------------------------------------------------------- the data


def _data(qrels: pd.DataFrame, num_queries: int = 4, num_ads: int = 8) -> MatchData:
    return MatchData(queries=QuerySide([f"q{i}" for i in range(num_queries)], [f"query {i}" for i in range(num_queries)]),
                     ads=AdSide([f"a{i}" for i in range(num_ads)], [f"title {i}" for i in range(num_ads)]),
                     qrels=qrels)


def _qrels(rows: list[tuple], weights: bool) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["query_id", "ad_id", "relevance", "weight"])
    frame["split"] = "train"
    return frame if weights else frame.drop(columns="weight")


ROWS = [("q0", "a0", 1, 2.0), ("q0", "a1", 1, 1.0), ("q1", "a2", 1, 4.0), ("q1", "a2", 1, 0.5),  # a repeated pair
        ("q2", "a3", 1, 1.0), ("q3", "a4", 1, 3.0),
        ("q0", "a5", 0, 1.0), ("q0", "a6", 0, 1.0), ("q1", "a0", 0, 1.0), ("q2", "a3", 0, 1.0)]  # q2-a3 is also positive


def test_pair_weights_and_explicit_negatives_of_match_data():
    data = _data(_qrels(ROWS, weights=True))
    pairs = data.positives()
    assert pairs.tolist() == [[0, 0], [0, 1], [1, 2], [2, 3], [3, 4]]
    np.testing.assert_allclose(data.pair_weights(pairs), [2.0, 1.0, 4.5, 1.0, 3.0])  # repeated qrels add up
    negatives = data.explicit_negatives()
    assert {q: ads.tolist() for q, ads in negatives.items()} == {0: [5, 6], 1: [0]}  # never an ad relevant to it
    plain = _data(_qrels(ROWS[:6], weights=False))
    assert not plain.has_weights and plain.explicit_negatives() == {}
    np.testing.assert_array_equal(plain.pair_weights(plain.positives()), np.ones(5))


def _batches(data: MatchData, **kwargs) -> MatchBatches:
    texts = list(data.ads.titles)
    return MatchBatches(data, data.positives(), texts, data, texts, batch_size=5, seed=3, **kwargs)


def test_batches_carry_weights_and_one_drawn_negative_per_row_whose_query_has_any():
    data = _data(_qrels(ROWS, weights=True))
    batches = _batches(data)
    rows = [0, 1, 2, 3, 4]  # pairs (q0,a0) (q0,a1) (q1,a2) (q2,a3) (q3,a4)
    batch = batches._collate(rows)
    assert batch["weights"].tolist() == [2.0, 1.0, 4.5, 1.0, 3.0]
    extra = batch["ad_texts"][5:]
    assert batch["num_extra"] == len(extra) >= 1
    drawn = {int(t.split()[-1]) for t in extra}
    assert drawn <= {5, 6, 0}
    # Column e of the extra mask: extra ad e relevant to the row's query (a0 is q0's positive).
    for e, ad in enumerate(sorted(drawn)):
        assert batch["extra_false_negative"][:, e].tolist() == [ad in (0, 1), ad in (0, 1), False, False, False]
    # Seeded: the same batches again.
    again = _batches(data)._collate(rows)
    assert again["ad_texts"] == batch["ad_texts"]
    # Over many batches each row with negatives draws each of its query's negatives.
    seen = set()
    for _ in range(30):
        seen |= {t for t in batches._collate(rows)["ad_texts"][5:]}
    assert seen == {"title 0", "title 5", "title 6"}


def test_the_switches_and_data_without_clicks_give_the_batches_of_before():
    data = _data(_qrels(ROWS, weights=True))
    off = _batches(data, click_weights=False, explicit_negatives=False)._collate([0, 1, 2, 3, 4])
    assert set(off) == {"query_texts", "ad_texts", "false_negative"} and len(off["ad_texts"]) == 5
    plain = _data(_qrels(ROWS[:6], weights=False))
    on = _batches(plain)._collate([0, 1, 2, 3, 4])
    assert set(on) == {"query_texts", "ad_texts", "false_negative"}
    assert on["ad_texts"] == off["ad_texts"] and torch.equal(on["false_negative"], off["false_negative"])
    assert _batches(plain).texts_to_cache() == _batches(plain, click_weights=False,
                                                        explicit_negatives=False).texts_to_cache()


@pytest.mark.slow
def test_a_matcher_trains_with_weights_and_negatives_and_without_them_as_before(tmp_path):
    """Two steps of the real matcher: on data with neither the switches change nothing (the
    same validation numbers); with both, training runs and differs."""
    from components.match.module import MatcherModule, fit_matcher

    rng = np.random.default_rng(0)
    rows = [(f"q{q}", f"a{(q * 3 + k) % 24}", 1, float(rng.uniform(1, 5))) for q in range(12) for k in range(2)]
    negatives = [(f"q{q}", f"a{(q * 3 + 7) % 24}", 0, 1.0) for q in range(12)]
    texts = [f"title {w}" for w in ("red car", "blue boat", "green tree", "yellow sun", "black cat", "white dog")] * 4

    def data(qrels: pd.DataFrame) -> MatchData:
        return MatchData(QuerySide([f"q{i}" for i in range(12)], [texts[(i * 3) % 24][6:] for i in range(12)]),
                         AdSide([f"a{i}" for i in range(24)], texts), qrels)

    runs = iter(range(10))

    def fit(train: MatchData, **switches) -> list:
        module = MatcherModule(lr=1e-3, max_steps=2, trainable_layers=1)
        batches = MatchBatches(train, train.positives(), train.ads.titles, train, train.ads.titles, batch_size=8,
                               seed=0, **switches)
        return fit_matcher(module, batches, max_steps=2, eval_every=1, seed=0, out_dir=tmp_path / f"run{next(runs)}",
                           device="cpu", accelerator="cpu").history

    plain = data(_qrels(rows, weights=False))
    assert fit(plain) == fit(plain, click_weights=False, explicit_negatives=False)
    clicked = data(_qrels(rows + negatives, weights=True))
    assert fit(clicked) != fit(plain)
