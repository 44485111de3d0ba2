"""How datasets are built and validated (the `data` and `validate` sections of params.yaml).

Kept in the data layer so the data modules read their own settings without importing
`components.config`, which gathers every stage's section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticConfig(_Section):
    num_ads: int = Field(240, ge=10)
    parts_per_ad_min: int = Field(2, ge=1)
    parts_per_ad_max: int = Field(4, ge=1)
    title_words_min: int = Field(1, ge=0)
    title_words_max: int = Field(2, ge=0)
    image_size: int = Field(224, ge=32)


class CocoConfig(_Section):
    captions: Path | None = None
    images: Path | None = None


class DataConfig(_Section):
    """How a dataset is built (`alignsearch data build`, DVC stage `build_data`)."""

    source: Literal["openclipart", "synthetic", "coco"] = "openclipart"
    out_dir: Path = Path("data/openclipart")
    # An existing dataset directory in the interchange format: the retraining flow uses it
    # as is instead of building `source`.
    path: Path | None = None
    svg_root: Path = Path("/usr/share/openclipart/svg")
    max_ads: int | None = Field(3000, ge=1)
    seed: int = 0
    image_size: int = Field(224, ge=32)
    title_group_cap: int = Field(3, ge=1)
    split_fractions: dict[str, float] = {"train": 0.7, "valid": 0.1, "test": 0.2}
    tag_max_ad_share: float = Field(0.05, gt=0, le=1)
    tag_min_ads: int = Field(5, ge=1)
    pair_min_ads: int = Field(3, ge=1)
    raster_timeout_s: float = Field(20.0, gt=0)
    workers: int = Field(0, ge=0, description="0 = one per core")
    cache_dir: Path = Path(".cache/alignsearch")
    synthetic: SyntheticConfig = SyntheticConfig()
    coco: CocoConfig = CocoConfig()


class ValidateConfig(_Section):
    """Great Expectations validation (`alignsearch data validate`, DVC stage `validate`)."""

    min_image_side: int = Field(32, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1, description="larger images (width x height, read from the "
                                  "header) are refused before any pixel is decoded: validation decodes many at "
                                  "once, and a small file can hold a huge image")
    report_dir: Path = Path("reports/validation")
    max_examples: int = Field(5, ge=1)
