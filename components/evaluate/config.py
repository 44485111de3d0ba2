"""What the benchmark runs (the `benchmark` section of params.yaml)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

BASE_SYSTEMS = ("lexical", "text_zero_shot", "text_only", "implicit_fusion", "late_fusion", "ours")
# Ablations of ours: an alignment loss switched off, or random words instead of aligned ones.
ABLATIONS = ("ours_no_structure", "ours_no_mil", "ours_random_words")


class BenchmarkConfig(BaseModel):
    """What to run (`params.yaml: benchmark`, overridable from the CLI)."""

    model_config = ConfigDict(extra="forbid")

    systems: list[str] = list(BASE_SYSTEMS)
    ablations: list[str] = list(ABLATIONS)
    fractions: list[float] = [0.25, 0.5, 1.0]
    seeds: list[int] = [0, 1, 2]
    eval_split: str = "test"
    gallery_size: int = Field(12, ge=0)
    # --quick: a small configuration that finishes in minutes on a CPU.
    quick_max_steps: int = Field(40, ge=1)
    quick_align_epochs: int = Field(8, ge=1)

    @field_validator("systems")
    @classmethod
    def _known_systems(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(BASE_SYSTEMS))
        if unknown:
            raise ValueError(f"unknown system(s) {unknown}; choose from {list(BASE_SYSTEMS)}")
        return value

    @field_validator("ablations")
    @classmethod
    def _known_ablations(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(ABLATIONS))
        if unknown:
            raise ValueError(f"unknown ablation(s) {unknown}; choose from {list(ABLATIONS)}")
        return value

    @field_validator("fractions")
    @classmethod
    def _fractions_in_range(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < f <= 1 for f in value):
            raise ValueError(f"fractions must be in (0, 1], got {value}")
        return sorted(set(value))

