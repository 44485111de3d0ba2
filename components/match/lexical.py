"""BM25 over ad titles (rank_bm25): the lexical baseline, no training.

Tokens are the project's word tokens (lowercase, alphabetic) plus the pieces of hyphenated
words, so "AZ-lizard" is found by "lizard". IDF comes from the candidate ads being scored.
"""

from __future__ import annotations

import numpy as np

from components.text.vocabulary import tokenize


def bm25_tokens(text: str) -> list[str]:
    out: list[str] = []
    for token in tokenize(text):
        out.append(token)
        if "-" in token:
            out.extend(p for p in token.split("-") if p)
    return out


def bm25_scores(queries: list[str], documents: list[str], k1: float = 1.2, b: float = 0.75) -> np.ndarray:
    """(Q, D) BM25 (Okapi) scores of each query against each document."""
    from rank_bm25 import BM25Okapi

    scores = np.zeros((len(queries), len(documents)), dtype=np.float64)
    corpus = [bm25_tokens(d) for d in documents]
    if not documents or not any(corpus):  # rank_bm25 divides by the mean length
        return scores
    bm25 = BM25Okapi(corpus, k1=k1, b=b)
    for i, query in enumerate(queries):
        tokens = bm25_tokens(query)
        if tokens:
            scores[i] = bm25.get_scores(tokens)
    return scores
