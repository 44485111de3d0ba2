"""What the stages write for DVC: the same inputs give byte-identical files.

Timings differ on every run, so they stay out of the JSON files DVC tracks (the flow logs
them to MLflow, and the stage functions still return them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def is_timing(key: str) -> bool:
    """A wall-clock measurement by name: `*_seconds` or `seconds_*`."""
    return key.endswith("_seconds") or key.startswith("seconds_")


def without_timings(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` without timing keys, recursively through nested mappings."""
    return {k: without_timings(v) if isinstance(v, Mapping) else v for k, v in values.items() if not is_timing(k)}


def write_stable_json(values: Mapping[str, Any], path: Path) -> Path:
    """Write `values` without timings as indented JSON (floats as floats)."""
    Path(path).write_text(json.dumps(without_timings(values), indent=2, default=float) + "\n")
    return Path(path)
