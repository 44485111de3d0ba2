"""The alignment component's pieces on toy inputs with hand-checked answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from components.align.concepts import assign, concept_bags, fit_whitening, l2_normalize
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
)
from components.align.losses import MILAdLoss, StructureLoss
from components.align.model import csls_scores, dedupe, near_duplicates, top_k_mean, word_stem
from components.align.network import AlignmentNetwork
from components.align.train import gw_cost, random_coupling

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


def test_whitening_projects_on_principal_axes_and_normalises():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 3)) * np.array([10.0, 1.0, 0.1])
    white = fit_whitening(x, 2, power=-0.5)
    z = (x - white.mean) @ white.matrix.T
    np.testing.assert_allclose(z.std(axis=0), 1.0, rtol=0.02)  # unit variance per axis
    assert abs(white.matrix[0, 0]) > 0.99 * np.linalg.norm(white.matrix[0])  # first axis = x0
    np.testing.assert_allclose(np.linalg.norm(white.apply(x), axis=1), 1.0, rtol=1e-5)
    plain = fit_whitening(x, 2, power=0.0)  # plain PCA keeps the variance ratio
    zp = (x - plain.mean) @ plain.matrix.T
    assert zp[:, 0].std() / zp[:, 1].std() == pytest.approx(10.0, rel=0.1)


def test_assign_and_bags():
    centroids = l2_normalize(np.eye(3, dtype=np.float32))
    z = np.array([[[0.9, 0.1, 0.0], [0.0, 0.2, 0.9]], [[0.0, 1.0, 0.0], [0.1, 0.9, 0.0]]])
    a = assign(z.astype(np.float32), centroids)
    assert a.tolist() == [[0, 2], [1, 1]]
    bags = concept_bags(a, np.array([[True, False], [True, True]]))
    assert [b.tolist() for b in bags] == [[0], [1]]


# ----------------------------------------------------------------------------- losses


def _identical_pair() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    words = torch.eye(2)  # e0, e1
    z = torch.eye(2)[:, None, :]  # ad 0 has one part equal to e0, ad 1 one equal to e1
    mask = torch.ones(2, 1, dtype=torch.bool)
    return z, mask, words


def test_mil_loss_on_identical_embeddings_matches_hand_value():
    z, mask, words = _identical_pair()
    titles = torch.tensor([[0], [1]])
    tau = 0.5
    terms = MILAdLoss(temperature=tau, ad_weight=1.0, word_weight=1.0)(z, mask, words, titles)
    # Each positive logit is 1/tau against one negative at 0: CE = log(1 + exp(-1/tau)).
    expected = math.log(1 + math.exp(-1 / tau))
    assert terms["mil_ad"].item() == pytest.approx(expected, rel=1e-6)
    assert terms["mil_word"].item() == pytest.approx(expected, rel=1e-6)
    assert terms["mil"].item() == pytest.approx(2 * expected, rel=1e-6)


def test_mil_loss_word_prior_and_shared_words():
    z, mask, words = _identical_pair()
    tau = 0.5
    prior = torch.log(torch.tensor([0.2, 0.8]))
    terms = MILAdLoss(tau)(z, mask, words, torch.tensor([[0], [1]]), word_log_prior=prior)
    # Word side for (ad 0, w0): logits [2 + log .2, 0 + log .8].
    e0 = -math.log(math.exp(2 + math.log(0.2)) / (math.exp(2 + math.log(0.2)) + 0.8))
    e1 = -math.log(math.exp(2 + math.log(0.8)) / (math.exp(2 + math.log(0.8)) + 0.2))
    assert terms["mil_word"].item() == pytest.approx((e0 + e1) / 2, rel=1e-6)
    # Both titles hold w0: neither ad is a negative of the other, the ad side is exactly 0.
    both = MILAdLoss(tau)(z, mask, words, torch.tensor([[0, -1], [0, -1]]))
    assert both["mil_ad"].item() == pytest.approx(0.0, abs=1e-7)


def test_mil_loss_pools_by_max_over_unmasked_parts():
    words = torch.eye(2)
    z = torch.stack([torch.stack([torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])]),
                     torch.stack([torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])])])
    mask = torch.tensor([[True, True], [True, False]])  # ad 1's e0-like part is masked
    terms = MILAdLoss(0.5, word_weight=0.0)(z, mask, words, torch.tensor([[0], [-1]]))
    # (ad 0, w0): ad 0 scores 1 (its second part), ad 1 scores 0 (only e1 visible).
    assert terms["mil_ad"].item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)


def test_structure_loss_consistency_is_zero_when_structures_agree():
    # Two concepts mapped exactly onto two words with identical structures.
    words = torch.eye(2)
    mapped = torch.eye(2)
    structure_matrix = torch.tensor([[1.0, 0.3], [0.3, 1.0]])
    loss = StructureLoss(temperature=0.001, gw_target_weight=0.0, marginal_kl_weight=1.0)
    terms = loss(mapped, words, concept_structure=structure_matrix, word_structure=structure_matrix,
                 concept_mass=torch.tensor([0.5, 0.5]), word_frequency=torch.tensor([0.5, 0.5]))
    assert terms["consistency"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["marginal_kl"].item() == pytest.approx(0.0, abs=1e-6)
    targets = torch.eye(2)
    with_targets = StructureLoss(0.001, consistency_weight=0.0, marginal_kl_weight=0.0)(
        mapped, words, concept_structure=structure_matrix, word_structure=structure_matrix,
        concept_mass=torch.tensor([0.5, 0.5]), word_frequency=torch.tensor([0.5, 0.5]),
        targets=targets)
    assert with_targets["gw_target"].item() == pytest.approx(0.0, abs=1e-6)


def test_network_output_is_unit_norm_and_linear_when_hidden_is_zero():
    torch.manual_seed(0)
    net = AlignmentNetwork(8, 4, hidden_dim=0)
    x = torch.randn(5, 8)
    y = net(x)
    torch.testing.assert_close(y.norm(dim=-1), torch.ones(5))
    expected = torch.nn.functional.normalize(x @ net.linear.weight.T + net.linear.bias, dim=-1)
    torch.testing.assert_close(y, expected)  # just the normalised affine map
    assert net.mlp is None


# ----------------------------------------------------------------------------- CSLS, words


def test_top_k_mean():
    sims = np.array([[0.1, 0.9, 0.5], [0.3, 0.2, 0.4]])
    np.testing.assert_allclose(top_k_mean(sims, 2), [0.7, 0.35])


def test_csls_on_a_toy_example():
    queries = np.array([[1.0, 0.0], [0.6, 0.8]])
    words = np.array([[1.0, 0.0], [0.0, 1.0]])
    hubness = np.array([0.9, 0.1])  # word 0 is a hub: close to many mapped vectors
    out = csls_scores(queries, words, hubness, k=1)
    # cos = [[1, 0], [.6, .8]]; r_x (k=1) = [1, .8]; CSLS = 2 cos - r_x - r_w.
    np.testing.assert_allclose(out, [[2 - 1 - 0.9, 0 - 1 - 0.1], [1.2 - 0.8 - 0.9, 1.6 - 0.8 - 0.1]])
    # Without the hub penalty query 1 is closer to... word 1 either way; the hub loses rank:
    assert out[1].argmax() == 1 and (2 * queries @ words.T)[0].argmax() == 0


def test_word_stems_and_near_duplicates():
    assert word_stem("boxes") == "box" and word_stem("berries") == "berry"
    assert word_stem("flags") == "flag" and word_stem("glass") == "glass"
    assert near_duplicates("flower", "flowers") and near_duplicates("paint", "painting")
    assert not near_duplicates("star", "start")  # a 4-letter prefix is not enough
    kept = dedupe([("flag", 0.9), ("flags", 0.8), ("map", 0.7), ("maps", 0.6), ("tree", 0.5)], 2)
    assert kept == [("flag", 0.9), ("map", 0.7)]


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


def test_gw_cost_is_zero_for_the_identity_on_identical_structures():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(6, 3))
    c = points @ points.T
    p = np.full(6, 1 / 6)
    assert gw_cost(c, c, p, p, np.eye(6) / 6) == pytest.approx(0.0, abs=1e-9)
    shuffled = random_coupling(p, p, rng)
    np.testing.assert_allclose(shuffled.sum(1), p, rtol=1e-6)
    np.testing.assert_allclose(shuffled.sum(0), p, rtol=1e-6)
    assert gw_cost(c, c, p, p, shuffled) > 0.1
