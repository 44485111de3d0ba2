"""The implicit-fusion image head: title embedding + image features -> one ad embedding.

The conventional approach the paper argues against, built to be strong: standardised
features (train-ad statistics), a shared projection of the pooled vector and the parts,
attention pooling over them with a learned query (plus, optionally, a title-conditioned
one), and a fusion that starts exactly at the title embedding (zero-initialised output),
so training can only move away from the zero-shot model where the images help.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.text.encoder import EMBEDDING_DIM


class ImageFusionHead(nn.Module):
    """(title (B,384), pooled (B,D), parts (B,P,D), mask (B,P)) -> fused (B,384), normalised."""

    def __init__(self, image_dim: int = 1280, hidden: int = 384, text_dim: int = EMBEDDING_DIM,
                 fusion: str = "residual", query: str = "title", dropout: float = 0.1) -> None:
        super().__init__()
        if fusion not in ("residual", "concat"):
            raise ValueError(f"unknown fusion {fusion!r}")
        if query not in ("learned", "title"):
            raise ValueError(f"unknown fusion query {query!r}")
        self.fusion, self.query_kind = fusion, query
        # Standardisation statistics of the training ads (set by `fit_statistics`).
        self.register_buffer("pooled_mean", torch.zeros(image_dim))
        self.register_buffer("pooled_std", torch.ones(image_dim))
        self.register_buffer("parts_mean", torch.zeros(image_dim))
        self.register_buffer("parts_std", torch.ones(image_dim))
        self.dropout = nn.Dropout(dropout)
        self.project = nn.Sequential(nn.Linear(image_dim, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.type_embedding = nn.Parameter(torch.zeros(2, hidden))  # 0: pooled, 1: part
        self.learned_query = nn.Parameter(torch.randn(hidden) / math.sqrt(hidden))
        self.title_query = nn.Linear(text_dim, hidden, bias=False) if query == "title" else None
        self.key = nn.Linear(hidden, hidden, bias=False)
        self.out = nn.Linear(hidden, text_dim)
        if fusion == "residual":
            nn.init.zeros_(self.out.weight)  # starts as the title embedding itself
            nn.init.zeros_(self.out.bias)
            self.combine = None
        else:
            self.combine = nn.Linear(2 * text_dim, text_dim)
            with torch.no_grad():  # starts as the title embedding: [I, 0]
                self.combine.weight.zero_()
                self.combine.weight[:, :text_dim].copy_(torch.eye(text_dim))
                self.combine.bias.zero_()

    @torch.no_grad()
    def fit_statistics(self, pooled: np.ndarray, parts: np.ndarray, parts_mask: np.ndarray) -> None:
        """Per-dimension mean/std of the training ads' pooled vectors and (valid) parts."""
        valid_parts = parts[parts_mask]  # (M,D)
        if len(valid_parts) == 0:
            valid_parts = pooled
        for name, values in (("pooled", pooled), ("parts", valid_parts)):
            values = torch.as_tensor(np.asarray(values, dtype=np.float32))
            getattr(self, f"{name}_mean").copy_(values.mean(0))
            getattr(self, f"{name}_std").copy_(values.std(0).clamp(min=1e-3))

    def image_tokens(self, pooled: torch.Tensor, parts: torch.Tensor) -> torch.Tensor:
        """(B,D), (B,P,D) -> projected tokens (B,1+P,H), pooled first."""
        pooled = (pooled - self.pooled_mean) / self.pooled_std
        parts = (parts - self.parts_mean) / self.parts_std
        tokens = torch.cat([pooled[:, None, :], parts], dim=1)  # (B,1+P,D)
        tokens = self.project(self.dropout(tokens))  # (B,1+P,H)
        kind = torch.ones(tokens.shape[1], dtype=torch.long, device=tokens.device)
        kind[0] = 0
        return tokens + self.type_embedding[kind]

    def image_embedding(self, title: torch.Tensor, pooled: torch.Tensor, parts: torch.Tensor,
                        parts_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention-pooled image vector in text space (B,384), not normalised."""
        tokens = self.image_tokens(pooled, parts)  # (B,1+P,H)
        b = tokens.shape[0]
        query = self.learned_query.expand(b, -1)  # (B,H)
        if self.title_query is not None:
            query = query + self.title_query(title)
        logits = torch.einsum("bh,bth->bt", query, self.key(tokens)) / math.sqrt(tokens.shape[-1])  # (B,1+P)
        if parts_mask is None:
            parts_mask = torch.ones(parts.shape[:2], dtype=torch.bool, device=parts.device)
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=parts.device), parts_mask.bool()], dim=1)
        logits = logits.masked_fill(~keep, float("-inf"))
        weights = logits.softmax(dim=-1)  # (B,1+P)
        pooled_tokens = torch.einsum("bt,bth->bh", weights, tokens)  # (B,H)
        return self.out(self.dropout(pooled_tokens))  # (B,384)

    def forward(self, title: torch.Tensor, pooled: torch.Tensor, parts: torch.Tensor,
                parts_mask: torch.Tensor | None = None) -> torch.Tensor:
        image = self.image_embedding(title, pooled, parts, parts_mask)  # (B,384)
        if self.combine is None:
            fused = title + image
        else:
            fused = self.combine(torch.cat([title, image], dim=-1))
        return F.normalize(fused, dim=-1)
