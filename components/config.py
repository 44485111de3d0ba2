"""Typed configuration: `params.yaml` loaded once into one pydantic model per stage.

Stages receive their own section (`cfg.data`, `cfg.validate`, ...) and never read
`params.yaml`, argv or the environment themselves. `--set key=value` overrides are
applied here, with the same dotted keys as in `params.yaml`.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from components.align.config import AlignConfig
from components.data.config import CocoConfig, DataConfig, SyntheticConfig, ValidateConfig  # noqa: F401 (re-exported)
from components.evaluate.config import BenchmarkConfig, Variant
from components.match.config import MatchConfig
from components.registry.config import PromoteConfig, RegistryConfig
from components.retrieve.config import IndexConfig
from components.search.config import ServeConfig
from components.traffic.config import LoopBenchmarkConfig, TrafficConfig
from components.vision.config import PartsConfig

DEFAULT_PARAMS_PATH = Path("params.yaml")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PathsConfig(_Section):
    """Where the pipeline stages write (DVC outputs under data/, reports under reports/)."""

    features_dir: Path = Path("data/stages/features")
    align_dir: Path = Path("data/stages/align")
    matcher_dir: Path = Path("data/stages/matcher")
    reports_dir: Path = Path("reports")
    # The retraining flow's stage outputs, one directory per (stage, cache key).
    flow_dir: Path = Path("data/flow")


class ComputeConfig(_Section):
    """Where the flows' fan-out work runs (Prefect tasks on a Dask cluster, prefect-dask).

    No workers and no address: in the flow's own process, one task after another. The flows
    let the environment variable ALIGNSEARCH_DASK_ADDRESS override `scheduler_address`.
    """

    workers: int = Field(0, ge=0, description="Dask LocalCluster worker processes started for a run; "
                         "0 = sequential in the flow's process")
    threads_per_worker: int = Field(1, ge=1, description="threads of each worker, and the torch/ONNX "
                                    "intra-op threads of its tasks")
    scheduler_address: str | None = Field(None, description="a running Dask scheduler (tcp://host:8786), "
                                          "e.g. the team stack's; wins over `workers`")
    feature_shard_size: int = Field(64, ge=1, description="images per feature-extraction task (a multiple "
                                    "of 32 keeps the sequential run's batches)")


class Params(BaseModel):
    # Unknown keys fail at load time (a typo such as `mach.lr` must not be silently ignored).
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    data: DataConfig = DataConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    vision: PartsConfig = PartsConfig()
    align: AlignConfig = AlignConfig()
    match: MatchConfig = MatchConfig()
    retrieve: IndexConfig = IndexConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    paths: PathsConfig = PathsConfig()
    registry: RegistryConfig = RegistryConfig()
    promote: PromoteConfig = PromoteConfig()
    serve: ServeConfig = ServeConfig()
    compute: ComputeConfig = ComputeConfig()
    traffic: TrafficConfig = TrafficConfig()
    benchmark_loop: LoopBenchmarkConfig = LoopBenchmarkConfig()

    @property
    def validation(self) -> ValidateConfig:
        return self.validate_


def parse_override(item: str) -> tuple[str, Any]:
    """`key.sub=value` -> ("key.sub", value), the value read as a YAML scalar (numbers,
    booleans, null and lists parse as such; an empty value is the empty string). The one
    parser of `--set` overrides and `align compare --variant` settings."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} is not of the form key=value (e.g. data.max_ads=500)")
    return key.strip(), (yaml.safe_load(raw) if raw != "" else "")


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply `key.sub=value` overrides to a nested params dict (returns a new dict)."""
    out = copy.deepcopy(raw)
    for item in overrides or []:
        key, value = parse_override(item)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return out


def parse_variant(spec: str) -> Variant:
    """`name:key=value,key=value` (or `key=value,...`, named by itself; `` = the params as
    they are) -> an `align compare` variant, each setting read by `parse_override`."""
    name, _, body = spec.rpartition(":") if ":" in spec else ("", "", spec)
    overrides = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        try:
            key, value = parse_override(item)
        except ValueError:
            raise ValueError(f"variant {spec!r}: expected key=value, got {item!r}") from None
        overrides[key] = value
    return Variant(name or body or "params", overrides)


class UnknownKeyError(ValueError):
    """A key in `params.yaml` or a `--set` override that no section defines."""


def _section_model(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that holds the key at `loc` (a validation error's location)."""
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = next((f for name, f in model.model_fields.items() if part in (name, f.alias)), None)
        if field is None:
            return None
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return None
    return model


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return [field.alias or name for name, field in model.model_fields.items()]


def _explain_unknown_keys(exc: ValidationError) -> str | None:
    """One line per unknown key, naming the valid keys of its section; None if there are none."""
    lines = []
    for error in exc.errors():
        if error["type"] != "extra_forbidden":
            continue
        loc = tuple(str(p) for p in error["loc"])
        model = _section_model(loc)
        valid = ", ".join(_valid_keys(model)) if model is not None else "?"
        if len(loc) == 1:
            lines.append(f"unknown section {loc[0]!r}; valid sections: {valid}")
        else:
            lines.append(f"unknown key {'.'.join(loc)!r} in section {'.'.join(loc[:-1])!r}; valid keys: {valid}")
    return "\n".join(lines) or None


def load_params(path: Path | None = DEFAULT_PARAMS_PATH, overrides: list[str] | None = None) -> Params:
    """Load `params.yaml` (defaults when the default file does not exist) and apply overrides.

    Raises `UnknownKeyError` naming any key no section defines (and the valid ones), pydantic's
    `ValidationError` for values out of range, and `ValueError` for a parameter file that was
    named but does not exist (a typo must not run a job on the defaults); all are `ValueError`s.
    """
    raw: dict = {}
    if path is not None and Path(path).is_file():
        raw = yaml.safe_load(Path(path).read_text()) or {}
    elif path is not None and Path(path) != DEFAULT_PARAMS_PATH:
        raise ValueError(f"parameter file {path} does not exist")
    try:
        return Params.model_validate(apply_overrides(raw, overrides))
    except ValidationError as exc:
        explained = _explain_unknown_keys(exc)
        if explained is None:
            raise
        raise UnknownKeyError(explained) from exc
