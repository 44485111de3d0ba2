"""The matcher's word channel: a query's words against an ad's per-word visual evidence.

The alignment gives every ad a logit for every vocabulary word (how strongly its image
shows the word). The channel scores a (query, ad) pair in language space as

    alpha * sum_w t_q(w) * (logit_a(w) - mean logit(w))

where t_q spreads weight 1 over the vocabulary words that share a stem with the query's
tokens (unknown tokens carry none) and alpha >= 0 is learned with the matcher, so the
matcher decides how much the visual words deserve to be trusted. It is an inner product:
the query tower appends alpha * t_q to its embedding, the ad tower appends the centred
logits, and retrieval stays one faiss inner-product search.

After training, the channel is calibrated (`calibrate`): the text score and the channel
score of a query are each divided by their standard deviation over the training ads, and
the channel gets a weight picked on the valid split, i.e. the per-query z-score fusion of
two scores (what `late_fusion` does at score level). The standard deviation of q . a over
ads is sqrt(q^T Cov(a) q), a function of the query alone given the ads' covariance, and the
per-query means only shift a query's scores, so the calibrated score is still one inner
product: the query tower scales its two halves, the ad vectors do not change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.match.terms import calibrated_query as calibrated_query_array
from components.match.terms import query_term_weights

EVIDENCE_CLIP = 8.0  # |centred logit| bound: one runaway word cannot decide a ranking


def centred_evidence(logits: np.ndarray, means: np.ndarray) -> np.ndarray:
    """(N, V) logits minus each word's mean training logit, clipped to +-EVIDENCE_CLIP."""
    return np.clip(np.asarray(logits, np.float32) - np.asarray(means, np.float32)[None, :],
                   -EVIDENCE_CLIP, EVIDENCE_CLIP)


class WordChannel(nn.Module):
    """alpha (learned, softplus of a raw parameter), the vocabulary it reads and, once
    calibrated, the ads' covariances and the channel weight of the z-score fusion."""

    def __init__(self, vocabulary: Sequence[str], init_scale: float = 0.05, text_dim: int = 384) -> None:
        super().__init__()
        self.vocabulary = list(vocabulary)
        self.raw_scale = nn.Parameter(torch.tensor(math.log(math.expm1(init_scale))))
        # Calibration (buffers, saved with the weights); a zero covariance = not calibrated.
        self.register_buffer("text_covariance", torch.zeros(text_dim, text_dim))
        self.register_buffer("evidence_covariance", torch.zeros(len(self.vocabulary), len(self.vocabulary)))
        self.register_buffer("calibrated_weight", torch.zeros(()))

    CALIBRATION_BUFFERS = ("text_covariance", "evidence_covariance", "calibrated_weight")

    @property
    def calibrated(self) -> bool:
        return bool(self.text_covariance.diagonal().sum() > 0)

    @torch.no_grad()
    def set_calibration(self, text_covariance: np.ndarray, evidence_covariance: np.ndarray, weight: float) -> None:
        self.text_covariance.copy_(torch.as_tensor(text_covariance, dtype=torch.float32))
        self.evidence_covariance.copy_(torch.as_tensor(evidence_covariance, dtype=torch.float32))
        self.calibrated_weight.fill_(float(weight))

    def calibrated_query(self, text: torch.Tensor, terms: torch.Tensor, weight: float | None = None) -> torch.Tensor:
        """(B, 384 + V): [text / sd_text(q), weight * terms / sd_channel(q)], the sds over the
        training ads (`components.match.terms.calibrated_query`, which a torch-free query tower
        shares); a query with no vocabulary word gets no channel part. Evaluation only (no grad)."""
        weight = float(self.calibrated_weight) if weight is None else weight
        fused = calibrated_query_array(text.detach().cpu().numpy(), terms.detach().cpu().numpy(),
                                       self.text_covariance.cpu().numpy(), self.evidence_covariance.cpu().numpy(),
                                       weight)
        return torch.from_numpy(fused).to(text.device)

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
        """(B, V) what the query tower appends while training: alpha * t_q."""
        return self.scale() * self.query_terms(texts)


def covariance(x: np.ndarray) -> np.ndarray:
    """(D, D) covariance of the rows of `x` (N, D), in float64."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean(0, keepdims=True)
    return centred.T @ centred / max(1, len(x) - 1)
