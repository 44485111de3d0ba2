"""Visual neighbours' text voting: a second, non-parametric source of word evidence.

An image's vote for word w is the similarity-weighted share of its k most similar
training images (cosine of the projected pooled vectors) whose ad-level text holds w.
The head (head.py) learns one linear direction per word; the vote instead follows the
local shape of the visual space (near-duplicate drawings, styles a linear head averages
away), which is why image-annotation methods combine the two (JEC, TagProp).

The evidence the alignment serves blends both probabilities,
p = (1 - weight) * sigmoid(head logit) + weight * vote, as a logit. Training ads vote
only through training ads of other folds, the same cross-fitting as the head's logits,
so no ad ever sees its own text through its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit, logit

from components.align.concepts import l2_normalize

PROBABILITY_FLOOR = 1e-4  # blended probabilities are clipped to [floor, 1 - floor] before the logit


@dataclass
class NeighbourMemory:
    """The training images' unit pooled vectors (N, d) and word labels (N, V) in {0, 1}."""

    vectors: np.ndarray
    labels: np.ndarray

    @classmethod
    def of(cls, pooled: np.ndarray, labels: np.ndarray) -> NeighbourMemory:
        return cls(l2_normalize(np.asarray(pooled, np.float32)), np.asarray(labels, np.uint8))

    def votes(self, pooled: np.ndarray, k: int, temperature: float, exclude: np.ndarray | None = None,
              batch_size: int = 1024) -> np.ndarray:
        """(M, V) vote of each query image `pooled` (M, d): softmax(cosine / temperature) over its
        k nearest memory rows, times their labels. `exclude` (M, N) bool masks memory rows a
        query may not see (its own fold)."""
        queries = l2_normalize(np.asarray(pooled, np.float32))
        k = int(min(k, len(self.vectors)))
        labels = self.labels.astype(np.float32)
        out = np.zeros((len(queries), labels.shape[1]), np.float32)
        for start in range(0, len(queries), batch_size):
            sl = slice(start, start + batch_size)
            similarity = queries[sl] @ self.vectors.T  # (B,N)
            if exclude is not None:
                similarity = np.where(exclude[sl], -np.inf, similarity)
            top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]  # (B,k), unordered
            top_similarity = np.take_along_axis(similarity, top, axis=1)
            weights = np.exp((top_similarity - top_similarity.max(1, keepdims=True)) / temperature)
            weights = np.where(np.isfinite(top_similarity), weights, 0.0)
            weights /= np.maximum(weights.sum(1, keepdims=True), 1e-12)
            out[sl] = np.einsum("bk,bkv->bv", weights, labels[top])
        return out


def blend_logits(head_logits: np.ndarray, votes: np.ndarray, weight: float) -> np.ndarray:
    """logit((1 - weight) * sigmoid(head_logits) + weight * votes), float32."""
    p = np.clip((1.0 - weight) * expit(head_logits) + weight * votes, PROBABILITY_FLOOR, 1.0 - PROBABILITY_FLOOR)
    return logit(p).astype(np.float32)


def out_of_fold_votes(memory: NeighbourMemory, fold: np.ndarray, k: int, temperature: float) -> np.ndarray:
    """(N, V) votes of the memory's own rows, each from the rows of the other folds only."""
    exclude = fold[:, None] == fold[None, :]
    return memory.votes(memory.vectors, k, temperature, exclude=exclude)
