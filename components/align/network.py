"""The alignment network f: whitened part vector -> the MiniLM word space (unit norm)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AlignmentNetwork(nn.Module):
    """A small MLP (or, with `hidden_dim=0`, a linear map) with a normalised output.

    The MLP keeps a linear skip path, so its lowest-capacity behaviour is the linear map.
    """

    def __init__(self, in_dim: int, out_dim: int = 384, hidden_dim: int = 512,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.in_dim, self.out_dim, self.hidden_dim = in_dim, out_dim, hidden_dim
        self.linear = nn.Linear(in_dim, out_dim)
        if hidden_dim > 0:
            self.mlp = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                     nn.Dropout(dropout), nn.Linear(hidden_dim, out_dim))
        else:
            self.mlp = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim), unit norm."""
        y = self.linear(x)
        if self.mlp is not None:
            y = y + self.mlp(x)
        return F.normalize(y, dim=-1)
