"""InfoNCE with in-batch negatives, the one loss of every trained matcher.

Row i of the batch is a positive (query_i, ad_i) pair; every other ad of the batch is a
negative for query_i unless it is also relevant to it (a false negative: masked out).
What clicks say can join (docs/traffic.md#from-events-to-a-dataset): per-row weights (a
clicked pair's inverse-propensity weight) and extra negative ads (shown, skipped), which
every query of the batch sees as further columns, masked where they are relevant to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InfoNCELoss(nn.Module):
    """Cross-entropy of each query over the batch's ads (and, symmetric, of each ad over the
    batch's queries), scores / temperature, in-batch false negatives masked.

    Returns {"loss", "query_to_ad", "ad_to_query"} (the last is 0 when not symmetric).
    """

    def __init__(self, temperature: float = 0.05, symmetric: bool = True) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.symmetric = symmetric

    @staticmethod
    def _masked_ce(logits: torch.Tensor, false_negative: torch.Tensor | None,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
        """logits (B,C), C >= B, with row i's positive in column i; masked cells (false_negative
        (B,C) bool, the diagonal never) leave the softmax. `weights` (B,): the weighted mean of
        the rows' cross-entropies, weights normalised to mean 1 (None: the plain mean)."""
        if false_negative is not None:
            eye = torch.eye(*logits.shape, dtype=torch.bool, device=logits.device)
            logits = logits.masked_fill(false_negative.bool() & ~eye, float("-inf"))
        target = torch.arange(logits.shape[0], device=logits.device)
        if weights is None:
            return F.cross_entropy(logits, target)
        per_row = F.cross_entropy(logits, target, reduction="none")  # (B,)
        weights = weights.to(per_row.dtype)
        return (per_row * weights).sum() / weights.sum()

    def forward(self, query: torch.Tensor, ad: torch.Tensor, false_negative: torch.Tensor | None = None,
                weights: torch.Tensor | None = None, extra_ad: torch.Tensor | None = None,
                extra_false_negative: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """query, ad (B,D) normalised; false_negative (B,B) bool: ad j relevant to query i.
        weights (B,) > 0: row i's weight (None: every row counts 1). extra_ad (E,D): further
        negative ads for every query (query -> ad direction only: they have no query of their
        own); extra_false_negative (B,E) bool: extra ad e relevant to query i (masked)."""
        logits = query @ ad.T / self.temperature  # (B,B)
        if weights is not None:
            if weights.shape != (query.shape[0],) or not bool((weights > 0).all()):
                raise ValueError(f"weights must be ({query.shape[0]},) and > 0")
        q2a_logits, q2a_mask = logits, false_negative
        if extra_ad is not None and extra_ad.shape[0] > 0:
            q2a_logits = torch.cat([logits, query @ extra_ad.T / self.temperature], dim=1)  # (B,B+E)
            in_batch = (false_negative.bool() if false_negative is not None
                        else torch.zeros_like(logits, dtype=torch.bool))
            extra = (extra_false_negative.bool() if extra_false_negative is not None
                     else torch.zeros(logits.shape[0], extra_ad.shape[0], dtype=torch.bool, device=logits.device))
            q2a_mask = torch.cat([in_batch, extra], dim=1)  # (B,B+E)
        q2a = self._masked_ce(q2a_logits, q2a_mask, weights)
        if self.symmetric:
            a2q = self._masked_ce(logits.T, None if false_negative is None else false_negative.T, weights)
            loss = (q2a + a2q) / 2
        else:
            a2q = torch.zeros((), device=logits.device)
            loss = q2a
        return {"loss": loss, "query_to_ad": q2a, "ad_to_query": a2q}
