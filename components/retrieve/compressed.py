"""The `pq` index kind: compressed codes in memory pick candidates, the ad vectors re-rank them.

Why this shape (measured with `alignsearch bench-index`, README "The index at scale"): the
query-ad scores of a model with a word channel are nearly tied at the top (on openclipart the
10th and 11th best ads of a query differ by a median 0.9% of the best score), so any
compression that decides the final order loses recall@10; and per-dimension quantisation of
the raw vectors spends its bits where queries do not look (the ad vector's energy is 99.7%
word evidence, the query's 99.9% text). So:

1. **Query-whitened projection.** With C = E[q q^T] over real query vectors (`second_moments`),
   an ad maps to a' = C^(1/2) a and a query to q' = C^(-1/2) q: q' . a' = q . a, and squared
   error on a' is the error of the score, averaged over queries. The top `dim` directions of
   the whitened ads (uncentred, so inner products survive) keep the most of it.
2. **4-bit product codes, fast-scan** (faiss `PQ{m}x4fs`, m/2 bytes an ad) over those `dim`
   numbers score every ad (or the `nprobe` nearest IVF lists) and keep `rerank` candidates.
3. **Exact re-ranking** of the candidates with the ad vectors themselves, stored as float16
   next to the index and memory-mapped: they are read for the candidates only, so they take
   disk and page cache, not resident memory per ad.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

CODES_FILE = "codes.faiss"
PROJECTION_FILE = "projection.npz"
VECTORS_FILE = "vectors.f16.npy"

_RIDGE = 1e-3  # C + 1e-3 * its largest eigenvalue: directions no sampled query used still count a little
_FIT_SAMPLE = 100_000  # ads used to fit the projection and the codebooks


def second_moments(query_vectors: np.ndarray) -> np.ndarray:
    """(dim, dim) float64 E[q q^T] of real query vectors (what the projection whitens by)."""
    q = np.asarray(query_vectors, np.float64)
    if q.ndim != 2 or len(q) == 0:
        raise ValueError(f"query vectors: expected a non-empty 2-d array, got shape {q.shape}")
    return q.T @ q / len(q)


def _projections(moments: np.ndarray, ads: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ad projection, query projection), each (D, dim) float32, with q @ Pq . a @ Pa ~ q . a."""
    eigenvalues, axes = np.linalg.eigh(np.asarray(moments, np.float64))
    eigenvalues = np.maximum(eigenvalues, 0.0) + _RIDGE * max(float(eigenvalues.max()), 1e-12)
    ad_whiten = axes * np.sqrt(eigenvalues)  # a' = a @ ad_whiten
    query_whiten = axes / np.sqrt(eigenvalues)  # q' = q @ query_whiten
    whitened = ads.astype(np.float64) @ ad_whiten
    _, principal = np.linalg.eigh(whitened.T @ whitened)  # uncentred: inner products survive
    keep = principal[:, ::-1][:, :dim]
    return (ad_whiten @ keep).astype(np.float32), (query_whiten @ keep).astype(np.float32)


class CompressedIndex:
    """Product codes of projected ads (candidates) + the ads' float16 vectors (re-ranking)."""

    def __init__(self, codes: faiss.Index, ad_projection: np.ndarray, query_projection: np.ndarray,
                 vectors: np.ndarray, rerank: int, nprobe: int) -> None:
        self.codes = codes
        self.ad_projection = ad_projection
        self.query_projection = query_projection
        self.vectors = vectors  # (N, D) float16, memory-mapped once saved
        self.rerank = rerank
        self.nprobe = nprobe
        self._ivf = faiss.try_extract_index_ivf(codes) is not None  # once, not per query

    @property
    def ntotal(self) -> int:
        return int(self.codes.ntotal)

    @classmethod
    def fit(cls, x: np.ndarray, moments: np.ndarray, *, dim: int, subquantizers: int, nlist: int, rerank: int,
            nprobe: int, seed: int = 0) -> CompressedIndex:
        """Fit the projection and codebooks on (a sample of) `x` (N, D), then add all of `x`."""
        dim = min(dim, x.shape[1])
        if dim % subquantizers:
            raise ValueError(f"retrieve.pq_dim {dim} must be a multiple of retrieve.pq_subquantizers {subquantizers}")
        rng = np.random.default_rng(seed)
        sample = x if len(x) <= _FIT_SAMPLE else x[np.sort(rng.choice(len(x), _FIT_SAMPLE, replace=False))]
        ad_projection, query_projection = _projections(moments, sample, dim)
        spec = f"IVF{nlist},PQ{subquantizers}x4fs" if nlist > 1 else f"PQ{subquantizers}x4fs"
        codes = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        codes.train(np.ascontiguousarray(sample @ ad_projection))
        index = cls(codes, ad_projection, query_projection, np.zeros((0, x.shape[1]), np.float16), rerank, nprobe)
        return index.refilled(x)

    def refilled(self, x: np.ndarray) -> CompressedIndex:
        """The same projection and codebooks over new vectors `x` (a catalogue change: nothing is
        trained again, the codes are recomputed)."""
        codes = faiss.clone_index(self.codes)
        codes.reset()
        for start in range(0, len(x), _FIT_SAMPLE):
            codes.add(np.ascontiguousarray(x[start:start + _FIT_SAMPLE] @ self.ad_projection))
        return CompressedIndex(codes, self.ad_projection, self.query_projection, x.astype(np.float16),
                               self.rerank, self.nprobe)

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (Q, k): the exact inner products of the best re-ranked candidates
        (rows -1 and scores -inf where there are fewer)."""
        wanted = min(max(self.rerank, k), self.ntotal)
        params = faiss.SearchParametersIVF(nprobe=self.nprobe) if self._ivf else None
        _, candidates = self.codes.search(np.ascontiguousarray(q @ self.query_projection), wanted, params=params)
        scores = np.full((len(q), k), -np.inf, np.float32)
        rows = np.full((len(q), k), -1, np.int64)
        for i, row in enumerate(candidates):
            row = np.sort(row[row >= 0])  # ascending rows: sequential reads of the memory map
            exact = self.vectors[row].astype(np.float32) @ q[i]
            best = np.argsort(-exact, kind="stable")[:k]
            scores[i, :len(best)], rows[i, :len(best)] = exact[best], row[best]
        return scores, rows

    def bytes_in_memory(self) -> int:
        """The codes and the projection: what stays resident (the vectors are memory-mapped)."""
        return int(faiss.serialize_index(self.codes).nbytes + self.ad_projection.nbytes + self.query_projection.nbytes)

    def save(self, out_dir: Path) -> None:
        faiss.write_index(self.codes, str(out_dir / CODES_FILE))
        np.savez(out_dir / PROJECTION_FILE, ad=self.ad_projection, query=self.query_projection)
        np.save(out_dir / VECTORS_FILE, np.ascontiguousarray(self.vectors, dtype=np.float16))

    @classmethod
    def load(cls, index_dir: Path, rerank: int, nprobe: int) -> CompressedIndex:
        for name in (CODES_FILE, PROJECTION_FILE, VECTORS_FILE):
            if not (index_dir / name).is_file():
                raise FileNotFoundError(f"{index_dir / name}: not found (a pq ad index keeps its codes, "
                                        "projection and re-ranking vectors there)")
        with np.load(index_dir / PROJECTION_FILE) as projection:
            ad_projection, query_projection = projection["ad"], projection["query"]
        return cls(faiss.read_index(str(index_dir / CODES_FILE)), ad_projection, query_projection,
                   np.load(index_dir / VECTORS_FILE, mmap_mode="r"), rerank, nprobe)
