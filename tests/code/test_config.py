"""params.yaml loading and --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from components.config import apply_overrides, load_params

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def test_repo_params_load_and_match_documented_defaults():
    params = load_params(REPO_PARAMS)
    assert params.data.source == "openclipart"
    assert params.data.max_ads == 3000
    assert params.data.split_fractions == {"train": 0.7, "valid": 0.1, "test": 0.2}
    assert params.validation.min_image_side == 32


def test_overrides_parse_yaml_scalars():
    params = load_params(REPO_PARAMS, ["data.max_ads=50", "data.source=synthetic", "data.synthetic.num_ads=30",
                                       "data.coco.captions=null"])
    assert params.data.max_ads == 50 and params.data.source == "synthetic"
    assert params.data.synthetic.num_ads == 30 and params.data.coco.captions is None


def test_bad_override_and_unknown_key_are_rejected():
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["data.max_ads"])
    with pytest.raises(ValidationError, match="max_adz"):
        load_params(REPO_PARAMS, ["data.max_adz=5"])
    with pytest.raises(ValidationError, match="source"):
        load_params(REPO_PARAMS, ["data.source=imagenet"])


def test_missing_file_gives_defaults(tmp_path):
    assert load_params(tmp_path / "absent.yaml").data.seed == 0
