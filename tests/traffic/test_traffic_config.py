"""The `traffic` section of params.yaml: its values are the typed defaults, and it refuses what
it does not know."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from components.config import UnknownKeyError, load_params
from components.traffic.config import SimulatorConfig, TrafficConfig

REPO_PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def test_params_yaml_holds_the_documented_defaults():
    assert load_params(REPO_PARAMS).traffic == TrafficConfig()


def test_overrides_reach_the_section_and_unknown_keys_are_refused():
    params = load_params(REPO_PARAMS, ["traffic.redact_queries=hash", "traffic.simulator.propensities=[1.0, 0.5]"])
    assert params.traffic.redact_queries == "hash" and params.traffic.simulator.propensity(2) == 0.5
    with pytest.raises(UnknownKeyError, match=r"'traffic\.simulator\.etta'.*valid keys: seed, split"):
        load_params(REPO_PARAMS, ["traffic.simulator.etta=1"])
    with pytest.raises(ValidationError, match="redact_queries"):
        load_params(REPO_PARAMS, ["traffic.redact_queries=rot13"])
    with pytest.raises(ValidationError, match="split"):
        load_params(REPO_PARAMS, ["traffic.simulator.split=holdout"])


def test_propensity_by_eta_or_by_list():
    assert SimulatorConfig(eta=1.0).propensity(4) == 0.25
    assert SimulatorConfig(eta=0.0).propensity(9) == 1.0
    listed = SimulatorConfig(propensities=[1.0, 0.6, 0.3])
    assert [listed.propensity(k) for k in (1, 2, 3, 4)] == [1.0, 0.6, 0.3, 0.0]
