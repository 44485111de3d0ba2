"""The two co-occurrence structures (docs/method.md#two-co-occurrence-structures): visual concepts within an image,
words within a text. Each side: PPMI of item pairs within a document, then the
second-order structure (cosine between PPMI rows), and marginals ∝ frequency^0.75.

Nothing here pairs an image with a text: the two sides are computed independently.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse


def document_matrix(bags: Sequence[Sequence[int]], num_items: int) -> sparse.csr_matrix:
    """Binary (documents, items) matrix: an item counts once per document."""
    rows, cols = [], []
    for d, bag in enumerate(bags):
        items = np.unique(np.asarray(bag, dtype=np.int64))
        rows.append(np.full(len(items), d))
        cols.append(items)
    row = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    col = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    data = np.ones(len(row), np.float64)
    return sparse.csr_matrix((data, (row, col)), shape=(len(bags), num_items))


def cooccurrence_counts(docs: sparse.csr_matrix) -> np.ndarray:
    """(n, n) number of documents holding both items, diagonal zero (distinct pairs only)."""
    counts = np.asarray((docs.T @ docs).todense(), dtype=np.float64)
    np.fill_diagonal(counts, 0.0)
    return counts


def ppmi(counts: np.ndarray, context_power: float = 0.75) -> np.ndarray:
    """Positive PMI of a symmetric co-occurrence count matrix.

    PMI(i, j) = log( P(i, j) / (P(i) P_a(j)) ), with P(i, j) = c_ij / sum c,
    P(i) = sum_j c_ij / sum c and the smoothed context P_a(j) = c_j^a / sum_k c_k^a
    (Levy et al. 2015; a = 1 is plain PMI). Zero counts give 0.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return np.zeros_like(counts)
    item = counts.sum(axis=1)
    p_row = item / total
    context = item ** context_power
    p_col = context / max(context.sum(), 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log((counts / total) / np.outer(p_row, p_col))
    out = np.where(counts > 0, np.maximum(pmi, 0.0), 0.0)
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def second_order(matrix: np.ndarray) -> np.ndarray:
    """Cosine similarity between rows; an all-zero row is similar only to itself (1 on the
    diagonal), so isolated items stay comparable in Gromov-Wasserstein."""
    matrix = np.asarray(matrix, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=1)
    unit = matrix / np.maximum(norms, 1e-12)[:, None]
    sim = unit @ unit.T
    np.fill_diagonal(sim, 1.0)
    return np.clip(sim, -1.0, 1.0)


def marginals(frequencies: np.ndarray, power: float = 0.75) -> np.ndarray:
    """A distribution ∝ frequency^power (every item keeps a little mass)."""
    freq = np.maximum(np.asarray(frequencies, dtype=np.float64), 0.0) ** power
    freq = freq + 1e-12
    return freq / freq.sum()


def structure(bags: Sequence[Sequence[int]], num_items: int, context_power: float = 0.75,
              marginal_power: float = 0.75) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(second-order structure (n,n), PPMI (n,n), marginals (n,)) of items within documents."""
    docs = document_matrix(bags, num_items)
    frequency = np.asarray(docs.sum(axis=0)).ravel()
    pp = ppmi(cooccurrence_counts(docs), context_power)
    return second_order(pp), pp, marginals(frequency, marginal_power)
