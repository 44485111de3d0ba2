"""The alignment network: a per-word scoring head over the instances (parts) of an image.

For an instance vector z (the image's pooled vector or one of its parts, projected by
`Projection`) the logit of word w is

    s(z, w) = z . (U_w + A e_w) + b_w

where e_w is the word's MiniLM vector, A (E, d) a shared map from the language space into
the visual space and U_w a per-word residual. The L2 penalty on U is stronger than on A
(`map_weight`), so each word's visual weights are pulled towards what its word vector
implies: rare words borrow strength from similar frequent ones. b_w starts at the word's
log prior odds (class balance). An image's logit of w pools s over its instances
(`pooling`: the pooled vector alone, max, noisy-OR or attention); the training signal is
ad-level only (which words an ad's text holds), never which part shows which word.

Optional label-free structure term: the words that co-occurring visual concepts map to
should co-occur in text, || S_v - P S_t P^T ||^2 with P = softmax over words of the
concept centroids' logits (docs/method.md#the-alignment-network).

Fitting is full-batch L-BFGS on a smooth, mostly convex objective: deterministic, and a
few seconds on a CPU for thousands of ads, which matters because cross-fitting
(`cross_fit`) trains k + 1 heads per alignment.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.align.config import AlignConfig

Pooling = Literal["pooled", "pooled_parts", "max", "noisy_or", "attention"]
POOLINGS: tuple[str, ...] = ("pooled", "pooled_parts", "max", "noisy_or", "attention")


@dataclass
class Projection:
    """z = ((x - mean) / scale) @ components.T: standardise each feature, then PCA (not
    whitened, so the L2 penalty sees the data's own scale)."""

    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    components: np.ndarray  # (d, D)

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """(..., D) -> (..., d) float32."""
        shape = x.shape[:-1]
        flat = (x.reshape(-1, x.shape[-1]).astype(np.float32) - self.mean) / self.scale
        return (flat @ self.components.T).reshape(*shape, self.dim).astype(np.float32)


def fit_projection(x: np.ndarray, dim: int) -> Projection:
    """Standardisation and the top-`dim` principal axes of the rows of `x` (N, D)."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), 1e-3)
    z = (x - mean) / scale
    dim = int(max(1, min(dim, z.shape[1], z.shape[0] - 1)))
    _, vectors = np.linalg.eigh(z.T @ z / max(1, len(z) - 1))  # ascending eigenvalues
    components = vectors[:, ::-1][:, :dim].T  # (d, D)
    # Deterministic sign: the largest loading of each axis is positive.
    signs = np.sign(components[np.arange(dim), np.abs(components).argmax(axis=1)])
    components = components * np.where(signs == 0, 1.0, signs)[:, None]
    return Projection(mean.astype(np.float32), scale.astype(np.float32), components.astype(np.float32))


class WordHead(nn.Module):
    """Per-word logits of instances, pooled into per-image logits (see the module doc)."""

    def __init__(self, in_dim: int, word_vectors: np.ndarray, pooling: str = "pooled",
                 attention_temperature: float = 1.0) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: expected one of {POOLINGS}")
        num_words, word_dim = word_vectors.shape
        self.in_dim, self.pooling, self.attention_temperature = in_dim, pooling, attention_temperature
        # pooled_parts scores [pooled z, max over parts of z] (2d): one weight vector per half
        feature_dim = 2 * in_dim if pooling == "pooled_parts" else in_dim
        self.register_buffer("word_vectors", torch.as_tensor(np.asarray(word_vectors, np.float32)))  # (V,E)
        self.residual = nn.Parameter(torch.zeros(num_words, feature_dim))  # U (V,F)
        self.word_map = nn.Parameter(torch.zeros(word_dim, feature_dim))  # A (E,F)
        self.bias = nn.Parameter(torch.zeros(num_words))  # b (V,)

    @property
    def num_words(self) -> int:
        return int(self.bias.shape[0])

    def weights(self) -> torch.Tensor:
        """(V, F) visual weights of every word: U + E A."""
        return self.residual + self.word_vectors @ self.word_map

    @staticmethod
    def pooled_and_parts(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, I, d), (B, I) -> (B, 2d): the pooled vector beside the element-wise max over the
        valid parts (the pooled vector again for an image without parts)."""
        parts = z[:, 1:].masked_fill(~mask[:, 1:, None], float("-inf")).max(dim=1).values  # (B,d)
        parts = torch.where(torch.isfinite(parts), parts, z[:, 0])
        return torch.cat([z[:, 0], parts], dim=-1)

    def instance_logits(self, z: torch.Tensor) -> torch.Tensor:
        """z (..., d) -> (..., V)."""
        return z @ self.weights().T + self.bias

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-image logits (B, V) of instances z (B, I, d) with mask (B, I); slot 0 is the
        pooled vector."""
        if self.pooling == "pooled":
            return self.instance_logits(z[:, 0])
        if self.pooling == "pooled_parts":
            return self.instance_logits(self.pooled_and_parts(z, mask))
        logits = self.instance_logits(z)  # (B,I,V)
        valid = mask[:, :, None]
        if self.pooling == "max":
            return logits.masked_fill(~valid, -1e4).max(dim=1).values
        if self.pooling == "noisy_or":  # P(w) = 1 - prod_i (1 - p_i(w)), as a logit
            log_none = F.logsigmoid(-logits).masked_fill(~valid, 0.0).sum(dim=1).clamp(max=-1e-6)
            return torch.log(-torch.expm1(log_none)) - log_none
        attention = torch.softmax(logits.masked_fill(~valid, -1e4) / self.attention_temperature, dim=1)
        return (attention * logits).sum(dim=1)

    def source_instances(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, V) index of the instance that responds most to each word: which part a word
        came from (0 = the whole image)."""
        if self.pooling == "pooled_parts":  # the part behind the max that carries the word most
            d = self.in_dim
            part_weights = self.weights()[:, d:]  # (V,d)
            pooled_term = z[:, 0] @ self.weights()[:, :d].T  # (B,V)
            contribution = (z[:, 1:, None, :] * part_weights).sum(-1)  # (B,I-1,V)
            contribution = contribution.masked_fill(~mask[:, 1:, None], -1e4)
            best, where = contribution.max(dim=1)
            return torch.where(best > pooled_term, where + 1, torch.zeros_like(where))
        logits = self.instance_logits(z).masked_fill(~mask[:, :, None], -1e4)
        return logits.argmax(dim=1)


@dataclass
class Structure:
    """What the optional structure term compares: concept centroids (K, d) in the projected
    space, their co-occurrence structure (K, K) and the words' (V, V)."""

    centroids: np.ndarray
    concept_structure: np.ndarray
    word_structure: np.ndarray


def fit_head(cfg: AlignConfig, z: np.ndarray, mask: np.ndarray, labels: np.ndarray,
             word_vectors: np.ndarray, structure: Structure | None = None,
             device: str | torch.device = "cpu") -> WordHead:
    """Fit a `WordHead` on instances z (N, I, d), mask (N, I) and ad-level labels (N, V) in
    {0, 1} (word v occurs in ad i's text). Minimises mean_i sum_v BCE + 0.5 / (C N) (|U|^2 +
    map_weight |A|^2) [+ structure_weight * consistency] with L-BFGS."""
    device = torch.device(device)
    head = WordHead(z.shape[-1], word_vectors, cfg.pooling, cfg.attention_temperature).to(device)
    z_t = torch.as_tensor(z, dtype=torch.float32, device=device)
    mask_t = torch.as_tensor(mask, dtype=torch.bool, device=device)
    y_t = torch.as_tensor(labels, dtype=torch.float32, device=device)
    n = len(z_t)
    with torch.no_grad():  # intercepts start at the log prior odds of each word
        prior = y_t.mean(0).clamp(1e-4, 1 - 1e-4)
        head.bias.copy_(torch.log(prior / (1 - prior)))
    penalty = 0.5 / (cfg.c * n)
    consistency = None
    if structure is not None and cfg.structure_weight > 0:
        centroids = torch.as_tensor(structure.centroids, dtype=torch.float32, device=device)
        s_v = torch.as_tensor(structure.concept_structure, dtype=torch.float32, device=device)
        s_t = torch.as_tensor(structure.word_structure, dtype=torch.float32, device=device)
        off = ~torch.eye(len(s_v), dtype=torch.bool, device=device)

        def consistency() -> torch.Tensor:
            assignment = torch.softmax(head.instance_logits(centroids) / cfg.structure_temperature, dim=-1)
            induced = assignment @ s_t @ assignment.T  # (K,K)
            return ((s_v - induced)[off] ** 2).mean()

    params = [head.residual, head.word_map, head.bias]
    optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=cfg.max_iter, tolerance_grad=1e-6,
                                  tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = head(z_t, mask_t)
        loss = F.binary_cross_entropy_with_logits(logits, y_t, reduction="sum") / n
        loss = loss + penalty * ((head.residual ** 2).sum() + cfg.map_weight * (head.word_map ** 2).sum())
        if consistency is not None:
            loss = loss + cfg.structure_weight * consistency()
        loss.backward()
        return loss

    optimizer.step(closure)
    head.eval()
    return head


@torch.inference_mode()
def predict_logits(head: WordHead, z: np.ndarray, mask: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """(N, V) float32 per-image logits."""
    device = head.bias.device
    out = np.zeros((len(z), head.num_words), np.float32)
    for start in range(0, len(z), batch_size):
        sl = slice(start, start + batch_size)
        out[sl] = head(torch.as_tensor(z[sl], device=device),
                       torch.as_tensor(mask[sl], dtype=torch.bool, device=device)).float().cpu().numpy()
    return out


def fold_of(num_rows: int, folds: int, seed: int) -> np.ndarray:
    """(N,) fold id in [0, folds) of every row: a seeded permutation cut into near-equal parts."""
    order = np.random.default_rng(seed).permutation(num_rows)
    fold = np.empty(num_rows, np.int64)
    fold[order] = np.arange(num_rows) % max(1, folds)
    return fold


def cross_fit(cfg: AlignConfig, z: np.ndarray, mask: np.ndarray, labels: np.ndarray,
              word_vectors: np.ndarray, folds: int, seed: int, structure: Structure | None = None,
              device: str | torch.device = "cpu") -> np.ndarray:
    """Out-of-fold logits (N, V): row i scored by a head that never saw row i (k-fold
    cross-fitting, as in stacking). Each fold's head starts from scratch, so no label of a
    held-out row reaches it through a warm start."""
    fold = fold_of(len(z), folds, seed)
    out = np.zeros((len(z), labels.shape[1]), np.float32)
    for k in range(folds):
        held, kept = fold == k, fold != k
        if not held.any():
            continue
        head = fit_head(cfg, z[kept], mask[kept], labels[kept], word_vectors, structure, device)
        out[held] = predict_logits(head, z[held], mask[held])
    return out
