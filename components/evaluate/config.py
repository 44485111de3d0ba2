"""What the benchmark runs (the `benchmark` section of params.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, field_validator

from components.systems import ABLATIONS, SYSTEMS, AblationName, SplitName, SystemName

BASE_SYSTEMS = SYSTEMS


class BenchmarkConfig(BaseModel):
    """What to run (`params.yaml: benchmark`, overridable from the CLI)."""

    model_config = ConfigDict(extra="forbid")

    systems: list[SystemName] = list(SYSTEMS)
    ablations: list[AblationName] = list(ABLATIONS)
    fractions: list[float] = [0.25, 0.5, 1.0]
    seeds: list[int] = [0, 1, 2]
    eval_split: SplitName = "test"
    gallery_size: int = Field(12, ge=0)
    bootstrap_samples: int = Field(1000, ge=100, description="paired bootstrap resamples of test queries per claim")
    claim_alpha: float = Field(0.05, gt=0, lt=1, description="a claim holds when its one-sided p is below this")
    non_inferiority_margin: float = Field(0.01, ge=0, description='"not worse": the 95% interval of the delta '
                                          "stays above -margin")
    lr_grid: list[float] | None = Field(
        None, description="learning rates every trained system searches in the benchmark (its seed-0, full-data "
        "run; the others reuse the pick); None = match.lr_grid, what the flow trains at")
    # --quick: a small configuration that finishes in minutes on a CPU.
    quick_max_steps: int = Field(40, ge=1)

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < f <= 1 for f in value):
            raise ValueError(f"fractions must be in (0, 1], got {value}")
        return sorted(set(value))


@dataclass
class Variant:
    """One alignment setting of `alignsearch align compare`: a name and `align.*` overrides
    (`components.config.parse_variant` reads them from `name:key=value,...`)."""

    name: str
    overrides: dict
