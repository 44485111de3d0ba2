"""params.yaml loading and --set overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from components.config import UnknownKeyError, apply_overrides, load_params

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
    with pytest.raises(UnknownKeyError, match="max_adz"):
        load_params(REPO_PARAMS, ["data.max_adz=5"])
    with pytest.raises(ValidationError, match="source"):
        load_params(REPO_PARAMS, ["data.source=imagenet"])


def test_missing_default_file_gives_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here
    assert load_params().data.seed == 0


def test_a_named_file_that_does_not_exist_is_an_error(tmp_path):
    # A typo in --params must not run a job on the defaults.
    with pytest.raises(ValueError, match="absent.yaml does not exist"):
        load_params(tmp_path / "absent.yaml")


def test_unknown_section_names_the_key_and_the_valid_sections():
    with pytest.raises(UnknownKeyError, match="'mach'") as caught:
        load_params(REPO_PARAMS, ["mach.lr=0.5"])
    assert "valid sections: data, validate, vision, align, match" in str(caught.value)


def test_unknown_nested_key_names_its_section_and_valid_keys():
    with pytest.raises(UnknownKeyError, match=r"'match\.lrr' in section 'match'") as caught:
        load_params(REPO_PARAMS, ["match.lrr=0.5"])
    assert "lr" in str(caught.value).split("valid keys:")[1]
    with pytest.raises(UnknownKeyError, match=r"'data\.coco\.foo'.*valid keys: captions, images"):
        load_params(REPO_PARAMS, ["data.coco.foo=1"])


def test_unknown_key_in_the_params_file_is_rejected(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(REPO_PARAMS.read_text() + "\nserving:\n  port: 9000\n")
    with pytest.raises(UnknownKeyError, match="'serving'.*valid sections"):
        load_params(path)


def test_cli_reports_an_unknown_key_as_a_usage_error():
    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["search", "tree", "--set", "mach.lr=0.5"])
    assert result.exit_code == 2
    assert "mach" in result.output and "valid sections" in result.output


def test_promote_online_off_is_read_as_the_word_not_yaml_false():
    # YAML 1.1 reads a bare `off` as false, in params.yaml and in --set alike.
    assert load_params(None, ["promote.online=off"]).promote.online == "off"
