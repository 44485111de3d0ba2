"""The one device rule of the project: vision, text, alignment and matcher all use it."""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None` or "auto" -> CUDA when available, else CPU; anything else as torch names it."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
