"""The planted truth file of a synthetic dataset: written by the generator, read only to
score an alignment (never by training)."""

from __future__ import annotations

import json
from pathlib import Path

TRUTH_FILE = "synthetic_truth.json"


def load_synthetic_truth(root: Path) -> dict:
    """The planted truth of a synthetic dataset directory (see `build_synthetic`)."""
    path = Path(root) / TRUTH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no synthetic truth file; is {root} a dataset built with source=synthetic?")
    return json.loads(path.read_text())
