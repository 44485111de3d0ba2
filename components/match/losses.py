"""InfoNCE with in-batch negatives, the one loss of every trained matcher.

Row i of the batch is a positive (query_i, ad_i) pair; every other ad of the batch is a
negative for query_i unless it is also relevant to it (a false negative: masked out).
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
    def _masked_ce(logits: torch.Tensor, false_negative: torch.Tensor | None) -> torch.Tensor:
        """logits (B,B) with the positive on the diagonal; masked cells leave the softmax."""
        if false_negative is not None:
            eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
            logits = logits.masked_fill(false_negative.bool() & ~eye, float("-inf"))
        target = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, target)

    def forward(self, query: torch.Tensor, ad: torch.Tensor,
                false_negative: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """query, ad (B,D) normalised; false_negative (B,B) bool: ad j relevant to query i."""
        logits = query @ ad.T / self.temperature  # (B,B)
        q2a = self._masked_ce(logits, false_negative)
        if self.symmetric:
            a2q = self._masked_ce(logits.T, None if false_negative is None else false_negative.T)
            loss = (q2a + a2q) / 2
        else:
            a2q = torch.zeros((), device=logits.device)
            loss = q2a
        return {"loss": loss, "query_to_ad": q2a, "ad_to_query": a2q}
