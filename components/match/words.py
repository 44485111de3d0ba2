"""The matcher's word channel: a query's words against an ad's per-word visual evidence.

The alignment gives every ad a logit for every vocabulary word (how strongly its image
shows the word). The channel scores a (query, ad) pair in language space as

    alpha * sum_w t_q(w) * (logit_a(w) - mean logit(w))

where t_q spreads weight 1 over the vocabulary words that share a stem with the query's
tokens (unknown tokens carry none) and alpha >= 0 is learned with the matcher, so the
matcher decides how much the visual words deserve to be trusted. It is an inner product:
the query tower appends alpha * t_q to its embedding, the ad tower appends the centred
logits, and retrieval stays one faiss inner-product search.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.text.stems import word_stem
from components.text.vocabulary import tokenize

EVIDENCE_CLIP = 8.0  # |centred logit| bound: one runaway word cannot decide a ranking


def query_term_weights(texts: Sequence[str], vocabulary: Sequence[str]) -> np.ndarray:
    """(Q, V) float32: per query, weight 1 spread evenly over its tokens that reach the
    vocabulary, each token's share spread over the vocabulary words with its stem."""
    by_stem: dict[str, list[int]] = {}
    for j, word in enumerate(vocabulary):
        by_stem.setdefault(word_stem(word), []).append(j)
    out = np.zeros((len(texts), len(vocabulary)), np.float32)
    for i, text in enumerate(texts):
        hits = [by_stem[s] for s in dict.fromkeys(word_stem(t) for t in tokenize(text)) if s in by_stem]
        for columns in hits:
            out[i, columns] += 1.0 / (len(hits) * len(columns))
    return out


def centred_evidence(logits: np.ndarray, means: np.ndarray) -> np.ndarray:
    """(N, V) logits minus each word's mean training logit, clipped to +-EVIDENCE_CLIP."""
    return np.clip(np.asarray(logits, np.float32) - np.asarray(means, np.float32)[None, :],
                   -EVIDENCE_CLIP, EVIDENCE_CLIP)


class WordChannel(nn.Module):
    """alpha (learned, softplus of a raw parameter) and the vocabulary it reads."""

    def __init__(self, vocabulary: Sequence[str], init_scale: float = 0.05) -> None:
        super().__init__()
        self.vocabulary = list(vocabulary)
        self.raw_scale = nn.Parameter(torch.tensor(math.log(math.expm1(init_scale))))

    @property
    def dim(self) -> int:
        return len(self.vocabulary)

    def scale(self) -> torch.Tensor:
        return F.softplus(self.raw_scale)

    def query_terms(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, V) term weights of query texts (tokenising a batch is cheap next to the encoder,
        and nothing per query is kept: a service sees unbounded distinct queries)."""
        return torch.from_numpy(query_term_weights(list(texts), self.vocabulary)).to(self.raw_scale.device)

    def query_part(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, V) what the query tower appends: alpha * t_q."""
        return self.scale() * self.query_terms(texts)
