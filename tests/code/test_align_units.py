"""The alignment component's pieces on toy inputs with hand-checked answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.align.concepts import assign, concept_bags, l2_normalize
from components.align.config import AlignConfig
from components.align.cooccurrence import (
    cooccurrence_counts,
    document_matrix,
    marginals,
    ppmi,
    second_order,
    structure,
)
from components.align.evaluation import (
    concept_kinds,
    region_kinds,
    visual_word_precision,
    word_precision_report,
)
from components.align.head import (
    WordHead,
    cross_fit,
    fit_head,
    fit_projection,
    fold_of,
    predict_logits,
)
from components.align.model import near_duplicates, select_words, sigmoid
from components.text.stems import word_stem

# ----------------------------------------------------------------------------- co-occurrence

# Items a=0, b=1, c=2, d=3 in 7 documents: {a,b} x3, {a,c}, {c,d} x3.
TOY_DOCS = [[0, 1]] * 3 + [[0, 2]] + [[2, 3]] * 3


def test_cooccurrence_counts_documents_not_tokens():
    docs = document_matrix([[0, 1, 1], [0, 1], [2]], 3)  # a repeated item counts once per doc
    counts = cooccurrence_counts(docs)
    assert counts.tolist() == [[0, 2, 0], [2, 0, 0], [0, 0, 0]]


def test_ppmi_matches_hand_computed_values():
    counts = cooccurrence_counts(document_matrix(TOY_DOCS, 4))
    # c_ab = 3, c_ac = 1, c_cd = 3; total (both directions) = 14; rows a=4, b=3, c=4, d=3.
    out = ppmi(counts, context_power=1.0)
    assert out[0, 1] == pytest.approx(math.log((3 / 14) / ((4 / 14) * (3 / 14))))  # log(14/4)
    assert out[2, 3] == pytest.approx(math.log((3 / 14) / ((4 / 14) * (3 / 14))))
    # PMI(a, c) = log((1/14) / ((4/14)(4/14))) = log(14/16) < 0 -> clipped to 0.
    assert out[0, 2] == 0.0
    assert out[1, 3] == 0.0 and out[0, 0] == 0.0  # never together; diagonal
    np.testing.assert_allclose(out, out.T)


def test_ppmi_context_smoothing():
    counts = cooccurrence_counts(document_matrix(TOY_DOCS, 4))
    out = ppmi(counts, context_power=0.75)
    ctx = np.array([4.0, 3.0, 4.0, 3.0]) ** 0.75
    expected = math.log((3 / 14) / ((4 / 14) * (ctx[1] / ctx.sum())))
    assert out[0, 1] == pytest.approx(expected)


def test_second_order_is_row_cosine_with_unit_diagonal():
    matrix = np.array([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    sim = second_order(matrix)
    assert sim[0, 1] == pytest.approx(0.5)  # (0,1,1).(1,0,1) / 2
    assert sim[2, 2] == 1.0 and sim[0, 2] == 0.0  # an all-zero row is similar only to itself
    np.testing.assert_allclose(np.diag(sim), 1.0)


def test_marginals_power_and_structure_shapes():
    np.testing.assert_allclose(marginals(np.array([16.0, 1.0]), 0.5), [0.8, 0.2], atol=1e-9)
    sim, pp, mass = structure(TOY_DOCS, 4)
    assert sim.shape == pp.shape == (4, 4) and mass.shape == (4,)
    assert mass.sum() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- concepts


def test_assign_and_bags():
    centroids = l2_normalize(np.eye(3, dtype=np.float32))
    z = np.array([[[0.9, 0.1, 0.0], [0.0, 0.2, 0.9]], [[0.0, 1.0, 0.0], [0.1, 0.9, 0.0]]])
    a = assign(z.astype(np.float32), centroids)
    assert a.tolist() == [[0, 2], [1, 1]]
    bags = concept_bags(a, np.array([[True, False], [True, True]]))
    assert [b.tolist() for b in bags] == [[0], [1]]


# ----------------------------------------------------------------------------- losses


def test_word_stems_and_near_duplicates():
    assert word_stem("boxes") == "box" and word_stem("berries") == "berry"
    assert word_stem("flags") == "flag" and word_stem("glass") == "glass"
    assert near_duplicates("flower", "flowers") and near_duplicates("paint", "painting")
    assert not near_duplicates("star", "start")  # a 4-letter prefix is not enough


# ----------------------------------------------------------------------------- evaluation


def test_region_kinds_by_coverage():
    boxes = np.array([[0, 0, 10, 10], [50, 50, 60, 60], [8, 0, 18, 10]], dtype=np.float32)
    truth = [{"word": "ball", "bbox": [0, 0, 12, 12]}, {"word": "cup", "bbox": [30, 30, 40, 40]}]
    kinds = region_kinds(boxes, np.array([True, True, True]), truth, min_coverage=0.5)
    assert kinds == ["ball", None, None]  # the third region is only 40% inside the ball


def test_concept_kinds_needs_a_majority_and_enough_regions():
    concepts = np.array([[0, 0, 1], [0, 1, 2]])
    kinds = [["ball", "ball", None], ["cup", "cup", "ball"]]
    # concept 0: ball, ball, cup -> ball (2/3); concept 1: None, cup (2 regions) -> too few.
    assert concept_kinds(concepts, kinds, min_regions=3, min_share=0.5) == {0: "ball"}


def test_visual_word_precision():
    words = {"a": ["dogs", "cat", "tree"], "b": ["car"], "c": ["sun"]}
    held = {"a": ["dog park"], "b": ["bike"]}  # "c" has no held-out words: not counted
    out = visual_word_precision(words, held, k=4)
    assert out["num_ads"] == 2
    assert out["precision@4"] == pytest.approx((1 / 4 + 0) / 2)  # "dogs" matches "dog"
    assert out["precision"] == pytest.approx((1 / 3 + 0) / 2)
    assert out["hit_rate"] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- GW


# ----------------------------------------------------------------------------- the word head


def test_projection_standardises_then_projects_on_principal_axes():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * np.array([10.0, 1.0, 1.0, 1.0, 0.1])
    proj = fit_projection(x, 3)
    comps = proj.components.astype(np.float64)
    np.testing.assert_allclose(comps @ comps.T, np.eye(3), atol=1e-5)
    z = proj.apply(x)
    standard = (x - x.mean(0)) / x.std(0)
    np.testing.assert_allclose(z, standard @ comps.T, atol=1e-4)
    assert z.shape == (200, 3)


def _head(pooling: str) -> WordHead:
    head = WordHead(2, np.zeros((2, 3), np.float32), pooling)
    with torch.no_grad():
        head.residual.copy_(torch.eye(2))  # word v scores instance dimension v
        head.bias.zero_()
    return head


def test_poolings_on_hand_values():
    z = torch.tensor([[[0.0, 0.0], [2.0, -1.0], [-3.0, 1.0]]])  # pooled, part 1, part 2
    mask = torch.tensor([[True, True, True]])
    assert _head("pooled")(z, mask).tolist() == [[0.0, 0.0]]
    assert _head("max")(z, mask).tolist() == [[2.0, 1.0]]
    # noisy-OR of p = sigmoid(0), sigmoid(2), sigmoid(-3) for word 0, as a logit
    p = 1 - (1 - sigmoid(np.array([0.0, 2.0, -3.0]))).prod()
    assert _head("noisy_or")(z, mask)[0, 0].item() == pytest.approx(math.log(p / (1 - p)), rel=1e-5)
    masked = torch.tensor([[True, False, True]])
    assert _head("max")(z, masked).tolist() == [[0.0, 1.0]]
    assert _head("pooled").source_instances(z, mask).tolist() == [[1, 2]]


def test_head_learns_a_separable_toy_and_starts_from_the_prior():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 1, 4)).astype(np.float32)
    labels = np.stack([(x[:, 0, 0] > 0), (x[:, 0, 1] > 1.0)], axis=1).astype(np.float32)
    mask = np.ones((300, 1), bool)
    vectors = np.eye(2, 3, dtype=np.float32)
    untrained = fit_head(AlignConfig(max_iter=1, c=1e-6), x, mask, labels, vectors)
    prior = labels.mean(0)
    np.testing.assert_allclose(untrained.bias.detach().numpy(), np.log(prior / (1 - prior)), atol=0.05)
    head = fit_head(AlignConfig(c=1.0), x, mask, labels, vectors)
    accuracy = ((predict_logits(head, x, mask) > 0) == labels.astype(bool)).mean()
    assert accuracy > 0.95


def test_cross_fitting_never_sees_the_row_it_scores():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 1, 3)).astype(np.float32)
    mask = np.ones((60, 1), bool)
    labels = (rng.random((60, 2)) < 0.3).astype(np.float32)
    vectors = np.eye(2, 3, dtype=np.float32)
    cfg = AlignConfig(c=1.0, max_iter=50)
    before = cross_fit(cfg, x, mask, labels, vectors, folds=5, seed=0)
    flipped = labels.copy()
    flipped[7] = 1 - flipped[7]  # change row 7's own labels only
    after = cross_fit(cfg, x, mask, flipped, vectors, folds=5, seed=0)
    np.testing.assert_allclose(after[7], before[7], atol=1e-6)  # its logits never depended on them
    assert not np.allclose(after, before)  # the other folds did see them
    folds = fold_of(60, 5, 0)
    assert np.bincount(folds).tolist() == [12] * 5 and (fold_of(60, 5, 0) == folds).all()


def test_select_words_threshold_limit_and_duplicates():
    words = ["flower", "flowers", "bird", "car"]
    logits = np.array([3.0, 2.9, 1.0, -4.0])
    kept = select_words(logits, np.array([1, 0, 2, 0]), words, limit=5, min_score=0.5)
    assert [w.word for w in kept] == ["flower", "bird"]  # plural dropped, car below 0.5
    assert kept[0].part == 1 and kept[0].score == pytest.approx(float(sigmoid(np.array(3.0))))
    assert len(select_words(logits, np.zeros(4, int), words, limit=1, min_score=0.0)) == 1


def test_word_precision_report_by_hand():
    words = {"a": ["bird", "sky", "red"], "b": ["car"], "c": []}
    held = {"a": ["bird animal"], "b": ["truck"], "c": ["car"]}
    titles = {"a": "a red bird", "b": "", "c": ""}
    report = word_precision_report(words, held, titles, ["car", "bird", "sky"], k=3)
    assert report["precision"] == pytest.approx((1 / 3 + 0 + 0) / 3)
    # not in the title: a -> [sky] (0 hits), b -> [car] (0 hits)
    assert report["precision_not_in_title"] == pytest.approx(0.0)
    # constant list of round(mean words = 4/3) = 1 word: "car" hits only ad c
    assert report["constant_precision"] == pytest.approx(1 / 3)
    assert report["coverage"] == pytest.approx(2 / 3)
    # An oracle with as many vocabulary words: a has 1 reachable word of 3 given, b none
    # ("truck" is not in the vocabulary), c was given nothing.
    assert report["ceiling"] == pytest.approx((1 / 3 + 0 + 0) / 3)
    assert report["words_shown"] == 3
    assert report["shown_precision"] == pytest.approx((1 / 3 + 0 + 0) / 3)
    assert report["shown_constant_precision"] == pytest.approx((1 / 3 + 0 + 1 / 3) / 3)  # car, bird, sky
    assert report["shown_ceiling"] == pytest.approx((1 / 3 + 0 + 1 / 3) / 3)
    # The first word alone: a -> bird (hit), b -> car (miss), c -> nothing; constant "car" hits c.
    first = word_precision_report(words, held, titles, ["car", "bird", "sky"], k=3, shown=1)
    assert first["shown_precision"] == pytest.approx(1 / 3)
    assert first["shown_constant_precision"] == pytest.approx(1 / 3)
    assert first["shown_lift"] == pytest.approx(1.0)
    assert first["shown_ceiling"] == pytest.approx(2 / 3)  # a and c have a vocabulary word to find
    assert word_precision_report(words, held, titles, ["car"], k=3, shown=9)["words_shown"] == 3  # capped at k


def test_pooled_parts_scores_the_pooled_vector_beside_the_max_over_parts():
    head = WordHead(2, np.zeros((2, 3), np.float32), "pooled_parts")
    with torch.no_grad():  # word 0 reads the pooled half's dim 0, word 1 the parts half's dim 1
        head.residual.zero_()
        head.residual[0, 0] = 1.0
        head.residual[1, 3] = 1.0
        head.bias.zero_()
    z = torch.tensor([[[5.0, 0.0], [2.0, -1.0], [-3.0, 4.0]]])  # pooled, part 1, part 2
    assert head(z, torch.tensor([[True, True, True]])).tolist() == [[5.0, 4.0]]
    assert head(z, torch.tensor([[True, True, False]])).tolist() == [[5.0, -1.0]]
    # no valid part: the pooled vector stands in for the parts half
    assert head(z, torch.tensor([[True, False, False]])).tolist() == [[5.0, 0.0]]
    # word 0 comes from the whole image, word 1 from the part holding the max (part 2)
    assert head.source_instances(z, torch.tensor([[True, True, True]])).tolist() == [[0, 2]]


def test_ad_level_texts_without_title_words_are_the_click_queries(tmp_path):
    from components.align.stage import ad_level_texts
    from components.data.config import DataConfig, SyntheticConfig
    from components.data.synthetic import build_synthetic

    dataset, _ = build_synthetic(DataConfig(source="synthetic", synthetic=SyntheticConfig(num_ads=60)), tmp_path)
    titles = dataset.split("train").ads["title"].astype(str).tolist()
    with_titles = ad_level_texts(dataset, click_text=True, title_words=True)
    clicks_only = ad_level_texts(dataset, click_text=True, title_words=False)
    assert all(text.startswith(title) for text, title in zip(with_titles, titles, strict=True))
    assert [w.removeprefix(t).strip() for w, t in zip(with_titles, titles, strict=True)] == clicks_only
    assert ad_level_texts(dataset, click_text=False, title_words=False) == titles  # label-free variant


def test_neighbour_votes_weight_the_nearest_images_labels_and_skip_excluded_rows():
    from components.align.neighbours import NeighbourMemory, blend_logits, out_of_fold_votes

    # two tight clusters of memory images; cluster 0 shows word 0, cluster 1 word 1
    vectors = np.array([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]], np.float32)
    labels = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
    memory = NeighbourMemory.of(vectors, labels)
    votes = memory.votes(np.array([[1.0, 0.05]], np.float32), k=2, temperature=0.05)
    np.testing.assert_allclose(votes, [[1.0, 0.0]], atol=1e-6)
    # with k = all and a flat temperature the vote is the plain label mean
    np.testing.assert_allclose(memory.votes(np.array([[1.0, 0.0]], np.float32), k=4, temperature=1e6),
                               [[0.5, 0.5]], atol=1e-4)
    # out of fold: rows 0 and 1 share a fold, so row 0 cannot hear row 1 and is outvoted
    fold = np.array([0, 0, 1, 1])
    oof = out_of_fold_votes(memory, fold, k=1, temperature=0.05)
    np.testing.assert_allclose(oof[0], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(oof[2], [1.0, 0.0], atol=1e-6)
    # blending: weight 0 is the head, weight 1 the (clipped) vote
    head = np.array([[2.0, -2.0]], np.float32)
    np.testing.assert_allclose(blend_logits(head, votes, 0.0), head, atol=1e-5)
    assert blend_logits(head, np.array([[0.0, 1.0]], np.float32), 1.0)[0, 1] > 9.0


def test_the_alignment_fit_is_the_same_whatever_the_machines_thread_count():
    """`fixed_threads` (train_alignment runs inside it) pins torch, faiss and BLAS: a head fitted
    in a process that had 2 threads equals one fitted in a process that had 1. Unpinned, the
    L-BFGS gradients' parallel sums differ (on openclipart the word logits moved by up to 0.49)."""
    import faiss

    from components.align.train import fixed_threads

    rng = np.random.default_rng(0)
    z = rng.standard_normal((1200, 9, 256)).astype(np.float32)
    mask = np.ones((1200, 9), bool)
    labels = (rng.random((1200, 200)) < 0.02).astype(np.float32)
    word_vectors = rng.standard_normal((200, 384)).astype(np.float32)
    cfg = AlignConfig(max_iter=30)
    before = torch.get_num_threads(), faiss.omp_get_max_threads()

    def fit(ambient: int, pinned: int) -> torch.Tensor:
        torch.set_num_threads(ambient)
        try:
            with fixed_threads(pinned):
                if pinned:
                    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (pinned, pinned)
                return fit_head(cfg, z, mask, labels, word_vectors).residual.detach().clone()
        finally:
            torch.set_num_threads(before[0])

    assert not torch.equal(fit(2, 0), fit(1, 0)), "the problem is too small to show thread-order sums"
    assert torch.equal(fit(2, 1), fit(1, 1))
    assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == before  # the pools are given back
