"""Evaluation metrics against hand-computed values, labelled pairs, subsets, and plots."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from components import metrics as metrics_module
from components.align.gallery import GalleryItem, GalleryWord, plot_alignment_gallery
from components.data.format import Dataset
from components.evaluate.plots import plot_data_efficiency, plot_subset_bars
from components.evaluate.subsets import (
    evaluate_scores,
    pair_subsets,
    query_subsets,
)
from components.metrics import (
    ScoreMatrix,
    auc_over_pairs,
    labelled_pairs,
    per_query_metrics,
    ranking_metrics,
)


def _dcg(ranks: list[int]) -> float:
    return sum(1 / math.log2(r + 1) for r in ranks)


# -- ranking metrics ------------------------------------------------------------------------

# q1: relevant a, c retrieved at ranks 1 and 3.
# q2: 12 relevant r00..r11; the top 10 alternates non-relevant / relevant, so relevant ads
#     sit at ranks 2, 4, 6, 8, 10 (and more further down).
# q3: the one relevant ad is retrieved at rank 11: outside every cut-off.
# q4: relevant ads but no run at all.  q5: only in the run.  q6: judged negatives only.
QRELS = {
    "q1": {"a": 1, "c": 1, "z": 0},
    "q2": {f"r{i:02d}": 1 for i in range(12)},
    "q3": {"x": 1},
    "q4": {"a": 1},
    "q6": {"a": 0},
}
_q2_ranking = [doc for i in range(6) for doc in (f"n{i}", f"r{i:02d}")] + [f"r{i:02d}" for i in range(6, 12)]
RUN = {
    "q1": {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6},
    "q2": {doc: 100.0 - rank for rank, doc in enumerate(_q2_ranking)},
    "q3": {**{f"n{i}": 1.0 - i / 100 for i in range(10)}, "x": 0.5},
    "q5": {"a": 1.0},
    "q6": {"a": 1.0},
}
# q1: nDCG@10 = (1/log2(2) + 1/log2(4)) / (1/log2(2) + 1/log2(3)) = 1.5 / 1.6309 = 0.91972
#     recall@10 = 2/2 = 1, MRR@10 = 1/1.
# q2: nDCG@10 = sum_{r in 2,4,6,8,10} 1/log2(r+1) / sum_{r=1..10} 1/log2(r+1) (the ideal
#     ranking fills all 10 ranks with relevant ads); recall@10 = 5/12; MRR@10 = 1/2.
# q3, q4: 0 on every metric. q5 (no qrels) and q6 (no relevant ad) are not evaluated.
EXPECTED_PER_QUERY = {
    "q1": {"ndcg@10": (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)), "recall@10": 1.0, "mrr@10": 1.0},
    "q2": {"ndcg@10": _dcg([2, 4, 6, 8, 10]) / _dcg(list(range(1, 11))), "recall@10": 5 / 12, "mrr@10": 0.5},
    "q3": {"ndcg@10": 0.0, "recall@10": 0.0, "mrr@10": 0.0},
    "q4": {"ndcg@10": 0.0, "recall@10": 0.0, "mrr@10": 0.0},
}


def test_per_query_metrics_match_hand_computed_values():
    table = per_query_metrics(QRELS, RUN)

    assert list(table.index) == ["q1", "q2", "q3", "q4"]
    assert table.loc["q1", "ndcg@10"] == pytest.approx(0.919721, abs=1e-6)
    for query_id, expected in EXPECTED_PER_QUERY.items():
        for metric, value in expected.items():
            assert table.loc[query_id, metric] == pytest.approx(value, abs=1e-9), (query_id, metric)


def test_ranking_metrics_average_over_queries_including_the_zeros():
    means = ranking_metrics(QRELS, RUN)

    for metric in ("ndcg@10", "recall@10", "mrr@10"):
        expected = sum(EXPECTED_PER_QUERY[q][metric] for q in EXPECTED_PER_QUERY) / 4
        assert means[metric] == pytest.approx(expected, abs=1e-9)
    # MRR@10 = (1 + 1/2 + 0 + 0) / 4
    assert means["mrr@10"] == pytest.approx(0.375)


def test_queries_with_only_empty_runs_score_zero_not_nan():
    assert ranking_metrics({"q": {"a": 1}}, {"q": {}}) == {"ndcg@10": 0.0, "recall@10": 0.0, "mrr@10": 0.0}
    assert all(math.isnan(v) for v in ranking_metrics({}, {"q": {"a": 1.0}}).values())


def test_tied_scores_are_ranked_by_ad_id_whatever_the_dict_order():
    qrels = {"q": {"b": 1}}
    # "a" and "b" tie: "a" goes first, so the relevant "b" is at rank 2 in both orders.
    for run in ({"q": {"a": 1.0, "b": 1.0}}, {"q": {"b": 1.0, "a": 1.0}}):
        assert ranking_metrics(qrels, run, ["mrr@10"]) == {"mrr@10": 0.5}


# -- AUC ------------------------------------------------------------------------------------

def test_auc_perfect_reversed_and_partial():
    labels = [1, 1, 0, 0]
    assert auc_over_pairs(labels, [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert auc_over_pairs(labels, [0.1, 0.2, 0.8, 0.9]) == 0.0
    # (positive, negative) pairs ordered right: (.9,.5) (.9,.1) (.3,.1); wrong: (.3,.5) → 3/4
    assert auc_over_pairs(labels, [0.9, 0.3, 0.5, 0.1]) == pytest.approx(0.75)
    # a tie counts one half; infinite scores are fine (only the order matters)
    assert auc_over_pairs([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert auc_over_pairs(labels, [np.inf, 0.3, 0.5, -np.inf]) == pytest.approx(0.75)


def test_auc_needs_both_classes():
    with pytest.raises(ValueError, match="positive and negative"):
        auc_over_pairs([1, 1], [0.1, 0.2])


# -- labelled pairs -------------------------------------------------------------------------

def _grid_dataset(num_queries: int = 10, num_ads: int = 30, split: str = "test") -> Dataset:
    ads = pd.DataFrame({"ad_id": [f"a{i:02d}" for i in range(num_ads)], "title": "t", "image_path": "x.png",
                        "split": split})
    queries = pd.DataFrame({"query_id": [f"q{i:02d}" for i in range(num_queries)], "text": "w", "split": split})
    qrels = pd.DataFrame({"query_id": [f"q{i % num_queries:02d}" for i in range(15)],
                          "ad_id": [f"a{(7 * i) % num_ads:02d}" for i in range(15)], "relevance": 1,
                          "split": split})
    return Dataset(ads=ads, queries=queries, qrels=qrels)


def _positive_keys(dataset: Dataset) -> set[tuple[str, str]]:
    positives = dataset.qrels[dataset.qrels["relevance"] > 0]
    return set(zip(positives["query_id"], positives["ad_id"], strict=True))


def test_labelled_pairs_balance_determinism_and_no_positive_negatives():
    dataset = _grid_dataset()
    pairs = labelled_pairs(dataset, seed=0)

    assert list(pairs.columns) == ["query_id", "ad_id", "label"]
    assert (pairs["label"] == 1).sum() == (pairs["label"] == 0).sum() == 15
    negatives = pairs[pairs["label"] == 0]
    assert not set(zip(negatives["query_id"], negatives["ad_id"], strict=True)) & _positive_keys(dataset)
    assert not negatives.duplicated().any()
    pd.testing.assert_frame_equal(pairs, labelled_pairs(dataset, seed=0))
    assert any(not labelled_pairs(dataset, seed=s).equals(pairs) for s in range(1, 4))


def test_labelled_pairs_rejection_sampling_path(monkeypatch):
    monkeypatch.setattr(metrics_module, "_ENUMERATE_MAX_CELLS", 0)  # force the large-space path
    dataset = _grid_dataset()
    pairs = labelled_pairs(dataset, seed=3)
    negatives = pairs[pairs["label"] == 0]
    assert len(negatives) == 15 and not negatives.duplicated().any()
    assert not set(zip(negatives["query_id"], negatives["ad_id"], strict=True)) & _positive_keys(dataset)
    pd.testing.assert_frame_equal(pairs, labelled_pairs(dataset, seed=3))


def test_labelled_pairs_use_explicit_negatives_when_present():
    dataset = _grid_dataset()
    explicit = pd.DataFrame({"query_id": ["q00", "q01"], "ad_id": ["a01", "a02"], "relevance": 0, "split": "test"})
    dataset.qrels = pd.concat([dataset.qrels, explicit], ignore_index=True)

    negatives = labelled_pairs(dataset, seed=0).query("label == 0")

    assert set(zip(negatives["query_id"], negatives["ad_id"], strict=True)) == {("q00", "a01"), ("q01", "a02")}


def test_labelled_pairs_take_every_negative_when_fewer_exist_than_positives():
    # 2 queries x 2 ads, 3 positives: only 1 non-positive pair exists.
    ads = pd.DataFrame({"ad_id": ["a", "b"], "title": "", "image_path": "x", "split": "test"})
    queries = pd.DataFrame({"query_id": ["p", "q"], "text": "w", "split": "test"})
    qrels = pd.DataFrame({"query_id": ["p", "p", "q"], "ad_id": ["a", "b", "a"], "relevance": 1, "split": "test"})
    negatives = labelled_pairs(Dataset(ads=ads, queries=queries, qrels=qrels), seed=0).query("label == 0")
    assert list(zip(negatives["query_id"], negatives["ad_id"], strict=True)) == [("q", "b")]


# -- subsets and the whole evaluation -------------------------------------------------------

def _toy_dataset() -> Dataset:
    ads = pd.DataFrame({
        "ad_id": ["a1", "a2", "a3", "a4", "a5", "a6"],
        "title": ["Red ball", "blue ball", "green tree", "night sky", "nothing", ""],
        "image_path": [f"images/a{i}.png" for i in range(1, 7)],
        "split": "test",
    })
    queries = pd.DataFrame({"query_id": ["q_ball", "q_star", "q_sky"], "text": ["ball", "star", "Sky"],
                            "split": "test"})
    qrels = pd.DataFrame({
        "query_id": ["q_ball", "q_ball", "q_star", "q_star", "q_sky", "q_sky", "q_ball", "q_star", "q_sky"],
        "ad_id": ["a1", "a2", "a4", "a6", "a4", "a3", "a3", "a1", "a5"],
        "relevance": [1, 1, 1, 1, 1, 1, 0, 0, 0],  # the last three are explicit negatives
        "split": "test",
    })
    return Dataset(ads=ads, queries=queries, qrels=qrels)


def test_pair_subsets_by_word_overlap_with_the_title():
    dataset = _toy_dataset()
    pairs = pd.DataFrame({"query_id": ["q_ball", "q_star", "q_sky", "q_sky"], "ad_id": ["a1", "a1", "a4", "a6"]})

    subsets = pair_subsets(pairs, dataset.queries, dataset.ads)

    # "ball" is in "Red ball"; "star" is not; "Sky" matches "night sky" ignoring case;
    # an empty title overlaps nothing.
    assert list(subsets) == ["title_overlap", "image_only", "title_overlap", "image_only"]


def test_a_query_is_image_only_when_all_its_relevant_ads_are():
    dataset = _toy_dataset()
    # q_star: a4 "night sky", a6 "" → image-only; q_sky: a4 overlaps, a3 does not → title_overlap
    assert query_subsets(dataset.qrels, dataset.queries, dataset.ads).to_dict() == {
        "q_ball": "title_overlap", "q_sky": "title_overlap", "q_star": "image_only"}


def _toy_scores() -> ScoreMatrix:
    ad_ids = ["a1", "a2", "a3", "a4", "a5", "a6"]
    scores = {
        "q_ball": {"a1": 0.9, "a2": 0.9, "a3": 0.5},
        "q_star": {"a4": 0.2, "a6": 0.2, "a1": 0.1, "a2": 0.5, "a3": 0.4},
        "q_sky": {"a4": 0.9, "a3": 0.2, "a5": 0.3},
    }
    query_ids = list(scores)
    matrix = np.array([[scores[q].get(a, 0.0) for a in ad_ids] for q in query_ids])
    return ScoreMatrix(query_ids, ad_ids, matrix)


def test_evaluate_scores_on_a_toy_split_matches_hand_computed_values():
    dataset = _toy_dataset()
    records = evaluate_scores(dataset, _toy_scores(), seed=0)
    value = {(r["subset"], r["metric"]): r["value"] for r in records}

    # Rankings: q_ball a1 .9, a2 .9 → relevant at 1, 2: nDCG 1, MRR 1.
    #           q_star a2 .5, a3 .4, a4 .2, a6 .2 → relevant at 3, 4.
    #           q_sky a4 .9, a5 .3, a3 .2 → relevant at 1, 3.
    ndcg = {"q_ball": 1.0,
            "q_star": (1 / math.log2(4) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)),
            "q_sky": (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))}
    assert value[("all", "ndcg@10")] == pytest.approx(sum(ndcg.values()) / 3)
    assert value[("all", "mrr@10")] == pytest.approx((1 + 1 / 3 + 1) / 3)
    assert value[("all", "recall@10")] == pytest.approx(1.0)
    assert value[("image_only", "ndcg@10")] == pytest.approx(ndcg["q_star"])
    assert value[("title_overlap", "ndcg@10")] == pytest.approx((ndcg["q_ball"] + ndcg["q_sky"]) / 2)
    # AUC: negatives are the explicit ones, scored .5 (q_ball,a3) .1 (q_star,a1) .3 (q_sky,a5).
    # Title-overlap positives score .9 (beat all 3), image-only positives .2 (beat only .1).
    assert value[("all", "auc")] == pytest.approx((3 * 3 + 3 * 1) / 18)
    assert value[("title_overlap", "auc")] == pytest.approx(1.0)
    assert value[("image_only", "auc")] == pytest.approx(1 / 3)
    counts = {(r["subset"], r["metric"]): r["count"] for r in records}
    assert counts[("all", "ndcg@10")] == 3 and counts[("image_only", "auc")] == 6


def test_evaluate_scores_accepts_a_score_function():
    dataset = _toy_dataset()
    matrix = _toy_scores()

    def score_fn(queries: pd.DataFrame, ads: pd.DataFrame) -> np.ndarray:
        rows = [matrix.query_ids.index(q) for q in queries["query_id"]]
        cols = [matrix.ad_ids.index(a) for a in ads["ad_id"]]
        return matrix.scores[np.ix_(rows, cols)]

    assert evaluate_scores(dataset, score_fn, seed=0) == evaluate_scores(dataset, matrix, seed=0)


def test_evaluate_scores_refuses_matrices_missing_ads_and_mixed_splits():
    dataset = _toy_dataset()
    matrix = _toy_scores()
    with pytest.raises(ValueError, match="every ad is a candidate"):
        evaluate_scores(dataset, ScoreMatrix(matrix.query_ids, matrix.ad_ids[:-1], matrix.scores[:, :-1]), seed=0)
    mixed = _toy_dataset()
    mixed.ads.loc[0, "split"] = "train"
    with pytest.raises(ValueError, match="one split at a time"):
        evaluate_scores(mixed, matrix, seed=0)


def test_score_matrix_top_k_orders_best_first():
    matrix = ScoreMatrix(["q"], ["a", "b", "c", "d"], np.array([[0.1, 0.7, 0.7, 0.3]]))
    assert list(matrix.top_k_run(k=3)["q"]) == ["b", "c", "d"]
    with pytest.raises(ValueError, match="shape"):
        ScoreMatrix(["q"], ["a"], np.zeros((2, 1)))


# -- plots ----------------------------------------------------------------------------------

def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _rows() -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"system": system, "fraction": fraction, "seed": seed, "subset": subset, "metric": metric,
             "value": base * (0.5 + 0.5 * fraction) + rng.normal(0, 0.02)}
            for system, base in (("lexical", 0.3), ("title matcher", 0.45), ("align before search", 0.55))
            for fraction in (0.1, 0.5, 1.0) for seed in range(3)
            for subset in ("all", "image_only", "title_overlap") for metric in ("ndcg@10", "auc")]


def test_data_efficiency_and_subset_plots_write_readable_pngs(tmp_path):
    efficiency = plot_data_efficiency(_rows(), tmp_path / "efficiency.png")
    bars = plot_subset_bars(_rows(), tmp_path / "bars.png", metric="auc")

    for path in (efficiency, bars):
        assert path.stat().st_size > 20_000
        width, height = _png_size(path)
        assert width >= 700 and height >= 500


def test_alignment_gallery_writes_a_readable_png(tmp_path):
    items = []
    for i, colour in enumerate(["red", "green", "blue", "orange", "purple"]):
        image_path = tmp_path / f"ad{i}.png"
        Image.new("RGB", (96, 96), colour).save(image_path)
        items.append(GalleryItem(image_path, f"a {colour} thing with a rather long title number {i} for wrapping",
                                 [GalleryWord(colour, 0.9, (10, 10, 40, 40), True), GalleryWord("thing", 0.5),
                                  GalleryWord("shape", 0.25, None, False)]))
    items.append(GalleryItem(tmp_path / "missing.png", "unreadable image", []))

    out = plot_alignment_gallery(items, tmp_path / "gallery.png")

    assert out.stat().st_size > 20_000
    width, height = _png_size(out)
    assert width >= 1200 and height >= 900


def test_choose_system_takes_the_best_valid_value_and_keeps_the_first_on_ties():
    from components.evaluate.stage import choose_system

    assert choose_system({"ours": 0.40, "implicit_fusion_words": 0.45}) == "implicit_fusion_words"
    assert choose_system({"ours": 0.45, "implicit_fusion_words": 0.45}) == "ours"
    # a candidate without a valid number never wins
    assert choose_system({"ours": 0.10, "implicit_fusion_words": None}) == "ours"
    assert choose_system({"ours": None, "implicit_fusion_words": 0.10}) == "implicit_fusion_words"
