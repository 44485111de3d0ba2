"""Visual concepts: L2-normalised (projected) part vectors clustered by seeded k-means.

An image is then a bag of concepts (docs/method.md#two-co-occurrence-structures).
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from components.vision.parts import PartsFeatures

log = logging.getLogger(__name__)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, eps)


def instance_vectors(parts: PartsFeatures, pooled_as_part: bool) -> tuple[np.ndarray, np.ndarray]:
    """Instances of each image: (N, I, 1280) vectors and (N, I) mask; slot 0 is the pooled
    vector when `pooled_as_part`, then the P regions."""
    if not pooled_as_part:
        return parts.parts, parts.mask.astype(bool)
    vectors = np.concatenate([parts.pooled[:, None, :], parts.parts], axis=1)
    mask = np.concatenate([np.ones((len(parts), 1), bool), parts.mask.astype(bool)], axis=1)
    return vectors, mask


def fit_concepts(z: np.ndarray, num_concepts: int, seed: int, iters: int = 25) -> np.ndarray:
    """(K, d) unit-norm centroids of spherical k-means over unit rows `z` (N, d)."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    k = int(max(2, min(num_concepts, len(z))))
    kmeans = faiss.Kmeans(z.shape[1], k, niter=iters, seed=int(seed), spherical=True,
                          verbose=False, min_points_per_centroid=1, max_points_per_centroid=100000)
    kmeans.train(z)
    return l2_normalize(kmeans.centroids.astype(np.float32))


def assign(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Nearest centroid (max cosine) of each row of unit vectors `z` (..., d) -> (...,) int64."""
    shape = z.shape[:-1]
    flat = z.reshape(-1, z.shape[-1])
    out = np.empty(len(flat), np.int64)
    for start in range(0, len(flat), 65536):
        out[start:start + 65536] = (flat[start:start + 65536] @ centroids.T).argmax(axis=1)
    return out.reshape(shape)


def concept_bags(assignments: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """Per image, the sorted distinct concepts of its valid regions."""
    return [np.unique(a[m]) for a, m in zip(assignments, mask, strict=True)]
