"""Catalogue changes on the team stack (MLflow server on Postgres, artifacts in S3) never lose
an acknowledged ad: two `alignsearch ads add` at once, then two during a promotion (right
after the re-indexing read the champion's catalogue, and as `champion` moves). The race is
tests/ops/catalogue_race.py's (tests/ops/test_catalogue_race.py runs it on a local server);
here two models are trained through the team's MLflow and Prefect servers, under a model
name of this test's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))  # the race, shared with tests/ops

from catalogue_race import (  # noqa: E402
    REPO_ROOT,
    Race,
    adds_during_a_promotion,
    two_adds_at_once,
    waiting_on_a_lock,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # includes the session's `team up`

NAME = "catalogue-race"
TINY = ["align.max_iter=20", "match.max_steps=4", "match.eval_every=2", "match.lr=0.0001", "benchmark.gallery_size=4"]


def _retrain(env: dict[str, str], overrides: list[str]) -> None:
    command = [sys.executable, "-m", "flows.cli", "retrain"] + [arg for o in overrides for arg in ("--set", o)]
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_every_acknowledged_ad_is_in_the_final_catalogue_on_the_team_stack(team_env, synthetic_dataset_dir,
                                                                             tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from components.catalogue.live import catalogue_carrier, current_catalogue
    from components.config import load_params
    from components.registry.config import PromoteConfig
    from components.registry.models import open_model
    from components.registry.promotion import evaluate_version, promote
    from components.registry.tracking import configure_mlflow

    for key, value in team_env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    cache = tmp_path / "cache"
    overrides = [f"data.path={synthetic_dataset_dir}", f"data.cache_dir={cache}", f"paths.flow_dir={tmp_path / 'flow'}",
                 f"registry.model_name={NAME}", *TINY]
    env = dict(os.environ)
    _retrain(env, overrides)                                                     # v1
    _retrain(env, [*overrides, "match.seed=1", "match.word_channel=false"])      # v2, a genuinely other model

    cfg = load_params(None, overrides)
    configure_mlflow(cfg.registry)
    rule = PromoteConfig(guardrail_metric="ndcg@10")
    ndcg = {v: evaluate_version(f"models:/{NAME}/{v}", synthetic_dataset_dir, rule, cache)["ndcg@10"] for v in ("1", "2")}
    assert ndcg["1"] != ndcg["2"], ndcg
    worse, better = sorted(ndcg, key=ndcg.get)
    client = MlflowClient()
    client.set_registered_model_alias(NAME, "champion", worse)
    client.set_registered_model_alias(NAME, "challenger", better)

    race = Race(NAME, synthetic_dataset_dir, tmp_path / "race", cache, env)
    two_adds_at_once(race)
    decision = adds_during_a_promotion(race, monkeypatch, lambda: promote(
        cfg.registry, rule, dataset_dir=None, cache_dir=cache, carry_catalogue=catalogue_carrier(cfg.registry, cache),
        validation=cfg.validation))
    assert decision.outcome == "promoted", decision.reason
    acknowledged = race.acknowledged()
    assert len(acknowledged) == 4, [a.output()[-2000:] for a in race.started]

    champion = open_model(f"models:/{NAME}@champion", cache)
    assert champion.version == better
    final = set(current_catalogue(champion, cache).ads["ad_id"])
    assert not set(acknowledged) - final, f"acknowledged, then lost: {sorted(set(acknowledged) - final)}"
    [late] = [a for a in race.started if a.ad_id == "race:while-moving"]
    assert waiting_on_a_lock(late.output()), late.output()[-2000:]
    assert not [m.name for m in client.search_registered_models() if m.name.startswith(f"{NAME}.")]  # no lock left
