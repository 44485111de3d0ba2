"""The word channel's query side in plain numpy: no torch, so a one-off search that runs the
query tower in ONNX Runtime (`components.search.onnx_query`) computes it with the same code
the trained channel (`components.match.words.WordChannel`) uses."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from components.text.stems import word_stem
from components.text.vocabulary import tokenize


@functools.lru_cache(maxsize=8)
def _columns_by_stem(vocabulary: tuple[str, ...]) -> dict[str, list[int]]:
    """Stem -> the vocabulary columns with that stem (built once per vocabulary, not per query)."""
    by_stem: dict[str, list[int]] = {}
    for j, word in enumerate(vocabulary):
        by_stem.setdefault(word_stem(word), []).append(j)
    return by_stem


def query_term_weights(texts: Sequence[str], vocabulary: Sequence[str]) -> np.ndarray:
    """(Q, V) float32: per query, weight 1 spread evenly over its tokens that reach the
    vocabulary, each token's share spread over the vocabulary words with its stem."""
    by_stem = _columns_by_stem(tuple(vocabulary))
    out = np.zeros((len(texts), len(vocabulary)), np.float32)
    for i, text in enumerate(texts):
        hits = [by_stem[s] for s in dict.fromkeys(word_stem(t) for t in tokenize(text)) if s in by_stem]
        for columns in hits:
            out[i, columns] += 1.0 / (len(hits) * len(columns))
    return out


def calibrated_query(text: np.ndarray, terms: np.ndarray, text_covariance: np.ndarray,
                     evidence_covariance: np.ndarray, weight: float) -> np.ndarray:
    """(B, D + V) float32: [text / sd_text(q), weight * terms / sd_channel(q)], the standard
    deviations of each half's score over the training ads (sqrt(q^T Cov q)); a query with no
    vocabulary word gets no channel part."""
    text = np.asarray(text, np.float32)
    terms = np.asarray(terms, np.float32)
    text_sd = np.sqrt(np.maximum(np.einsum("bi,ij,bj->b", text, text_covariance, text), 1e-12))
    term_var = np.einsum("bi,ij,bj->b", terms, evidence_covariance, terms)
    term_scale = np.where(term_var > 1e-12, weight / np.sqrt(np.maximum(term_var, 1e-12)), 0.0)
    return np.hstack([text / text_sd[:, None], terms * term_scale[:, None]]).astype(np.float32)
