"""The ad index: exact top-k against a brute-force matmul, ANN recall on clustered data,
save/load, k larger than the index, and the errors a user meets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from components.retrieve.config import IndexConfig
from components.retrieve.index import AdIndex


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(num_points: int, num_clusters: int, dim: int, seed: int) -> np.ndarray:
    """Points around random centres: the structure real embeddings have (random vectors
    have none, and ANN recall on them is meaningless; see docs/search.md#the-index-at-scale)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_clusters, dim))
    labels = rng.integers(0, num_clusters, size=num_points)
    return (centres[labels] + 0.25 * rng.normal(size=(num_points, dim))).astype(np.float32)


def _ids(n: int) -> list[str]:
    return [f"ad{i:05d}" for i in range(n)]


def test_flat_top_k_equals_brute_force_matmul():
    rng = np.random.default_rng(0)
    ads = rng.normal(size=(300, 32)).astype(np.float32)
    queries = rng.normal(size=(20, 32)).astype(np.float32)
    index = AdIndex.build(_ids(300), ads, IndexConfig(kind="flat"))

    scores, ids = index.search(queries, k=10)

    brute = queries @ ads.T  # (20, 300) the scores the index must reproduce
    expected_cols = np.argsort(-brute, axis=1)[:, :10]
    assert scores.shape == (20, 10)
    assert ids == [[f"ad{j:05d}" for j in row] for row in expected_cols]
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected_cols, axis=1), atol=1e-5)


def test_auto_is_exact_up_to_exact_max_then_hnsw():
    ads = _clustered(200, 5, 16, seed=1)
    assert AdIndex.build(_ids(200), ads, IndexConfig(kind="auto", exact_max=200)).kind == "flat"
    assert AdIndex.build(_ids(200), ads, IndexConfig(kind="auto", exact_max=199)).kind == "hnsw"


@pytest.mark.parametrize("cfg", [
    IndexConfig(kind="hnsw", hnsw_m=16, hnsw_ef_search=64),
    IndexConfig(kind="ivf", ivf_nlist=64, ivf_nprobe=8),
], ids=["hnsw", "ivf"])
def test_ann_recall_on_clustered_data(cfg):
    ads = _clustered(4000, 40, 64, seed=2)
    queries = ads[::40] + 0.05 * np.random.default_rng(3).normal(size=(100, 64)).astype(np.float32)
    exact = AdIndex.build(_ids(4000), ads, IndexConfig(kind="flat"))
    approx = AdIndex.build(_ids(4000), ads, cfg)

    _, exact_ids = exact.search(queries, k=10)
    _, approx_ids = approx.search(queries, k=10)

    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx_ids, exact_ids, strict=True)])
    assert recall >= 0.9, f"{cfg.kind} recall@10 {recall:.3f}"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_round_trip_gives_identical_results(tmp_path, kind):
    ads = _clustered(500, 10, 24, seed=4)
    queries = _clustered(15, 10, 24, seed=5)
    index = AdIndex.build(_ids(500), ads, IndexConfig(kind=kind, ivf_nlist=8, ivf_nprobe=3, hnsw_ef_search=40))
    before_scores, before_ids = index.search(queries, k=7)

    index.save(tmp_path / "index")
    loaded = AdIndex.load(tmp_path / "index")
    after_scores, after_ids = loaded.search(queries, k=7)

    assert loaded.kind == kind and loaded.cfg == index.cfg and loaded.ad_ids == index.ad_ids
    assert after_ids == before_ids
    np.testing.assert_array_equal(after_scores, before_scores)
    meta = json.loads((tmp_path / "index" / "index.json").read_text())  # plain JSON, no pickle
    assert meta["ad_ids"] == _ids(500) and meta["kind"] == kind


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_k_larger_than_the_index_pads_with_minus_inf(kind):
    ads = np.eye(5, 8, dtype=np.float32) + 0.1
    index = AdIndex.build(_ids(5), ads, IndexConfig(kind=kind, ivf_nlist=1))

    scores, ids = index.search(ads[:2], k=8)

    assert scores.shape == (2, 8)
    assert [len(row) for row in ids] == [5, 5]
    assert ids[0][0] == "ad00000" and ids[1][0] == "ad00001"
    assert np.isfinite(scores[:, :5]).all()
    assert np.isneginf(scores[:, 5:]).all()


def test_scores_are_the_inner_products_of_the_vectors_as_given():
    # Not cosine: an ad vector with the word channel's evidence is not unit-norm, and its norm
    # is part of the model's score.
    ads = np.array([[3.0, 0.0], [0.0, 0.5], [1.0, 1.0]], dtype=np.float32)
    index = AdIndex.build(["x", "y", "xy"], ads, IndexConfig(kind="flat"))

    scores, ids = index.search(np.array([10.0, 0.0]), k=3)  # a single query vector is one row

    assert ids == [["x", "xy", "y"]]
    np.testing.assert_allclose(scores[0], [30.0, 10.0, 0.0], atol=1e-5)
    _, ids = index.search(np.array([[0.0, 1.0]]), k=3)
    assert ids == [["xy", "y", "x"]]  # cosine would put y (1.0) above xy (0.71)


def test_empty_index_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="0 ads"):
        AdIndex.build([], np.zeros((0, 16), dtype=np.float32), IndexConfig())


def test_user_errors_are_named():
    ads = np.ones((3, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="unique"):
        AdIndex.build(["a", "b", "a"], ads)
    with pytest.raises(ValueError, match="3 embedding rows"):
        AdIndex.build(["a", "b"], ads)
    with pytest.raises(ValueError, match="NaN"):
        AdIndex.build(["a", "b", "c"], np.full((3, 4), np.nan))
    index = AdIndex.build(["a", "b", "c"], ads)
    with pytest.raises(ValueError, match="dim 5"):
        index.search(np.ones((1, 5)), k=1)
    with pytest.raises(ValueError, match="k must be"):
        index.search(np.ones((1, 4)), k=0)


def test_load_from_a_missing_directory_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.faiss"):
        AdIndex.load(tmp_path / "nowhere")


def test_generated_embeddings_follow_the_fitted_distribution():
    """bench-index's corpus past the real base set: PCA + mixture + the remaining spectrum."""
    from components.retrieve.bench import EmbeddingModel, corpus

    base = _clustered(1500, 6, 32, seed=3) * np.linspace(0.2, 3.0, 32, dtype=np.float32)  # not unit-norm
    model = EmbeddingModel.fit(base, pca_dim=8, components=6, seed=0)
    x = corpus(base, model, 6000, seed=1)
    assert x.shape == (6000, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x[:1500], base, atol=1e-6)  # the real set is included as it is
    drawn = x[1500:]
    np.testing.assert_allclose(drawn.mean(axis=0), base.mean(axis=0), atol=0.15)
    # The whole covariance, beyond the mixture's 8 dimensions, and so the norms, are the real ones.
    real_cov, drawn_cov = np.cov(base.T), np.cov(drawn.T)
    assert np.abs(drawn_cov - real_cov).max() < 0.1 * np.abs(real_cov).max()
    assert np.linalg.norm(drawn, axis=1).mean() == pytest.approx(np.linalg.norm(base, axis=1).mean(), rel=0.05)
    # Structure kept: a drawn point's nearest real point is about as close as real points are to each other.
    def nearest(a, b, self_match):
        d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.sort(d, axis=1)[:, 1 if self_match else 0].mean()
    assert nearest(drawn[:300], base, False) < 1.5 * nearest(base[:300], base, True)


def _model_like(num_ads: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ads, queries, training queries) shaped like a model with a word channel: ads carry a
    unit text part and a larger evidence part; queries are mostly text plus one or two words."""
    rng = np.random.default_rng(seed)
    text = _normalised(_clustered(num_ads, 30, 32, seed=seed))
    evidence = 4.0 * np.tanh(_clustered(num_ads, 12, 24, seed=seed + 1))
    ads = np.concatenate([text, evidence], axis=1).astype(np.float32)

    def queries(n):
        picked = rng.integers(0, num_ads, n)
        q_text = _normalised(text[picked] + 0.3 * rng.normal(size=(n, 32)))
        q_words = np.zeros((n, 24))
        q_words[np.arange(n), rng.integers(0, 24, n)] = 0.15
        return np.concatenate([q_text, q_words], axis=1).astype(np.float32)

    return ads, queries(120), queries(400)


def _recall(found: list[list[str]], truth: list[list[str]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


PQ_SMALL = IndexConfig(kind="pq", pq_dim=32, pq_subquantizers=16, pq_rerank=300)


def test_pq_candidates_reranked_exactly_find_the_exact_top_k():
    from components.retrieve.compressed import second_moments

    ads, queries, training = _model_like(6000, seed=7)
    exact = AdIndex.build(_ids(6000), ads, IndexConfig(kind="flat"))
    pq = AdIndex.build(_ids(6000), ads, PQ_SMALL, query_moments=second_moments(training))
    exact_scores, exact_ids = exact.search(queries, k=10)
    scores, ids = pq.search(queries, k=10)

    assert _recall(ids, exact_ids) >= 0.95
    # The scores are the model's inner products (re-ranked on float16 copies of the vectors).
    by_id = {a: i for i, a in enumerate(_ids(6000))}
    np.testing.assert_allclose(scores[0], [queries[0] @ ads[by_id[a]] for a in ids[0]], rtol=2e-3, atol=2e-3)
    assert pq.index.bytes_in_memory() / 6000 < 0.25 * ads.shape[1] * 4  # codes, not vectors, stay resident
    # Without the whitening (identity moments) the same codes find far less: it is what makes pq work.
    coarse = PQ_SMALL.model_copy(update={"pq_dim": 16, "pq_subquantizers": 8, "pq_rerank": 100})
    plain = AdIndex.build(_ids(6000), ads, coarse, query_moments=np.eye(ads.shape[1]))
    whitened = AdIndex.build(_ids(6000), ads, coarse, query_moments=second_moments(training))
    assert _recall(whitened.search(queries, 10)[1], exact_ids) > _recall(plain.search(queries, 10)[1], exact_ids) + 0.2


def test_pq_round_trip_memory_maps_the_vectors_and_a_change_keeps_the_trained_state(tmp_path):
    from components.retrieve.compressed import second_moments

    ads, queries, training = _model_like(3000, seed=8)
    index = AdIndex.build(_ids(3000), ads, PQ_SMALL, query_moments=second_moments(training))
    before = index.search(queries, k=7)
    index.save(tmp_path / "index")
    loaded = AdIndex.load(tmp_path / "index")
    assert isinstance(loaded.index.vectors, np.memmap)
    after = loaded.search(queries, k=7)
    assert after[1] == before[1]
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_allclose(loaded.query_moments, index.query_moments)

    # A catalogue change: ads 0-99 out, a new ad in; nothing is trained again.
    kept_ids = _ids(3000)[100:] + ["new"]
    new_ad = (queries[0] / np.linalg.norm(queries[0]) * 40).astype(np.float32)  # the best answer to query 0
    changed = AdIndex.build(kept_ids, np.concatenate([ads[100:], new_ad[None]]), PQ_SMALL, like=loaded)
    np.testing.assert_array_equal(changed.index.ad_projection, loaded.index.ad_projection)
    assert faiss_codebook(changed) == faiss_codebook(loaded)
    _, ids = changed.search(queries, k=10)
    assert ids[0][0] == "new"
    assert not {a for row in ids for a in row} & set(_ids(100))


def faiss_codebook(index: AdIndex) -> bytes:
    import faiss

    return faiss.vector_to_array(faiss.downcast_index(index.index.codes).pq.centroids).tobytes()


def test_pq_needs_query_moments_and_auto_picks_it_past_exact_max_when_it_has_them():
    from components.retrieve.compressed import second_moments

    ads, _, training = _model_like(400, seed=9)
    with pytest.raises(ValueError, match="query_moments"):
        AdIndex.build(_ids(400), ads, PQ_SMALL)
    auto = IndexConfig(kind="auto", exact_max=100, pq_dim=16, pq_subquantizers=8, pq_rerank=50)
    assert AdIndex.build(_ids(400), ads, auto, query_moments=second_moments(training)).kind == "pq"
    assert AdIndex.build(_ids(400), ads, auto).kind == "hnsw"
    flat = AdIndex.build(_ids(400), ads, IndexConfig(kind="flat"), query_moments=second_moments(training))
    grown = AdIndex.build(_ids(400), ads, auto, like=flat)  # a catalogue outgrowing exact search
    assert grown.kind == "pq" and grown.query_moments is flat.query_moments


def test_bench_rows_and_the_auto_choice():
    import faiss

    from components.retrieve.bench import choose, measure_size
    from components.retrieve.compressed import second_moments

    x = _normalised(_clustered(2000, 20, 32, seed=4))
    queries = _normalised(_clustered(64, 20, 32, seed=5))
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # as bench-index measures; tiny searches on a busy box stall in OpenMP barriers
    try:
        rows = measure_size(x, queries, repeats_b1=20, repeats_b32=4,  # small PQ: its training is the slow part
                            configs=[("hnsw32", "HNSW32,Flat", {"efSearch": [64, 512]}),
                                     ("ivfpq", "IVF{nlist},PQ8x4", {"nprobe": [16, 64]})],
                            pq_configs=[("pq", {"pq_dim": 16, "pq_subquantizers": 8}, [50, 400])],
                            query_moments=second_moments(_normalised(_clustered(200, 20, 32, seed=6))))
    finally:
        faiss.omp_set_num_threads(threads)
    by = {(r.index, r.params): r for r in rows}
    assert by[("flat", "-")].recall_at_10 == 1.0 and by[("flat", "-")].bytes_per_ad == 32 * 4
    assert by[("hnsw32", "efSearch=512")].recall_at_10 >= 0.95
    assert all(0 <= r.recall_at_10 <= 1 and r.p50_ms_b1 <= r.p99_ms_b1 for r in rows)
    assert by[("ivfpq", "nprobe=16")].bytes_per_ad < by[("flat", "-")].bytes_per_ad
    pq = by[("pq", "rerank=400")]  # through AdIndex, re-ranked from the memory-mapped float16 vectors
    assert pq.recall_at_10 >= 0.95 and pq.recall_at_10 >= by[("pq", "rerank=50")].recall_at_10
    assert pq.disk_bytes_per_ad >= 32 * 2 and pq.bytes_per_ad < by[("flat", "-")].bytes_per_ad
    assert choose(rows)["2000"]["kind"] == "flat"  # exact is within the latency target at this size
    slow = [r for r in rows if r.index != "flat"] + [by[("flat", "-")].__class__(**{**by[("flat", "-")].__dict__,
                                                                                   "p99_ms_b1": 50.0})]
    chosen = choose(slow)["2000"]
    meeting = [r for r in slow if r.recall_at_10 >= 0.95 and r.p99_ms_b1 < 20]
    assert (chosen["kind"], chosen["params"]) == min(((r.bytes_per_ad, r.p99_ms_b1), (r.index, r.params))
                                                     for r in meeting)[1]


def test_a_catalogue_change_keeps_the_pq_index_trained_state():
    """`ads remove` / `ads add` on a pq catalogue: no query moments needed again, no retraining."""
    import pandas as pd

    from components.retrieve.compressed import second_moments
    from components.search.catalogue import Catalogue

    ads, queries, training = _model_like(2000, seed=10)
    ids = _ids(2000)
    table = pd.DataFrame({"ad_id": ids, "title": ids, "words": [[]] * 2000, "scores": [[]] * 2000,
                          "image_ref": [""] * 2000})
    catalogue = Catalogue(table, ads, {}, PQ_SMALL)
    catalogue._index = AdIndex.build(ids, ads, PQ_SMALL, query_moments=second_moments(training))

    smaller = catalogue.changed(removed=ids[:10])

    assert smaller.index.kind == "pq" and len(smaller.index) == 1990
    np.testing.assert_array_equal(smaller.index.index.query_projection, catalogue.index.index.query_projection)
    assert smaller.index.query_moments is catalogue.index.query_moments
    assert not {a for row in smaller.index.search(queries, 10)[1] for a in row} & set(ids[:10])
