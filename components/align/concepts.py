"""Visual concepts: PCA-whitened, L2-normalised part vectors clustered by seeded k-means.

An image is then a bag of concepts (METHOD.md section 2). Whitening is stored as plain
arrays (mean, matrix), so applying it needs numpy only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import faiss
import numpy as np

from components.vision.parts import PartsFeatures

log = logging.getLogger(__name__)


@dataclass
class Whitening:
    """z = normalise((x - mean) @ matrix.T): matrix (d, D), principal axes / sqrt(eigenvalue)."""

    mean: np.ndarray  # (D,)
    matrix: np.ndarray  # (d, D)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(..., D) -> (..., d) float32, unit norm (zero rows stay zero)."""
        shape = x.shape[:-1]
        flat = x.reshape(-1, x.shape[-1]).astype(np.float32)
        z = (flat - self.mean) @ self.matrix.T
        return l2_normalize(z).reshape(*shape, self.dim).astype(np.float32)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, eps)


def fit_whitening(x: np.ndarray, dim: int, power: float = -0.5, eps: float = 1e-6) -> Whitening:
    """PCA fitted on rows of `x` (N, D), axes scaled by eigenvalue^power (-0.5 = whitening,
    0 = plain PCA); `dim` is clamped to N-1 and D.

    numpy's symmetric eigensolver on the covariance: for 1280-d part vectors it takes well
    under a second, where faiss' PCAMatrix took about 10 s on two cores.
    """
    x = np.asarray(x, dtype=np.float32)
    dim = int(max(2, min(dim, x.shape[1], x.shape[0] - 1)))
    mean = x.mean(axis=0, dtype=np.float64)
    centered = x - mean.astype(np.float32)
    cov = (centered.T @ centered).astype(np.float64) / max(1, len(x) - 1)
    values, vectors = np.linalg.eigh(cov)  # ascending
    order = np.argsort(values)[::-1][:dim]
    values, vectors = np.maximum(values[order], 0.0), vectors[:, order]
    # Deterministic sign: the largest-magnitude loading of each component is positive.
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(dim)])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    matrix = (vectors * (values + eps * max(values.max(), 1e-12)) ** power).T
    return Whitening(mean=mean.astype(np.float32), matrix=matrix.astype(np.float32))


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
