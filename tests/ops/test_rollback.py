"""Rollback: `champion` goes back to the version it replaced when its live CTR@10 fell below that
version's by more than promote.rollback_max_ctr_drop, with a decision record, and the live
catalogue moves with it; --force rolls back whatever the numbers; no previous champion, too few
searches or a CTR within bounds change nothing; a rolled-back version is not promoted again.

Real registered models (two that differ offline, promoted for real one after the other, so the
registry knows which replaced which), the real promotion and rollback flows and CLI, and a
traffic log in tmp with hand-made searches of each version timed in its own time as champion."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from catalogue_race import new_ads_dir
from mlflow import MlflowClient
from ops_helpers import as_flow_params, decision_records, ops_params
from two_versions import NAME, copy_store, log_searches
from typer.testing import CliRunner

from components.catalogue.live import add_ads, current_catalogue
from components.registry.models import open_model
from components.registry.promotion import champion_history


@pytest.fixture
def promoted_twice(two_versions, synthetic_dataset_dir, tmp_path):
    """This test's copy of the store, where `worse` was promoted first and `better` then
    replaced it (each by the real promotion flow): (root, worse, better)."""
    from flows.promote import promote_flow

    source, worse, better = two_versions
    root = tmp_path / "store"
    copy_store(source, root, synthetic_dataset_dir)
    client = MlflowClient()
    for version in (worse, better):
        client.set_registered_model_alias(NAME, "challenger", version)
        decision = promote_flow(as_flow_params(ops_params(root, synthetic_dataset_dir, "promote.online=off",
                                                          "promote.guardrail_metric=ndcg@10")))
        assert decision["outcome"] == "promoted", decision["reason"]
        if version == worse:  # the first champion has nothing to go back to
            first = rollback_with(root, synthetic_dataset_dir, tmp_path / "empty.db")
            assert first["outcome"] == "no_previous" and champion_now() == worse, first["reason"]
    return root, worse, better


def rollback_with(root: Path, dataset_dir: Path, traffic_db: Path, *overrides: str, force: bool = False) -> dict:
    from flows.promote import rollback_flow

    cfg = ops_params(root, dataset_dir, f"traffic.store_uri=sqlite:///{traffic_db}",
                     "promote.min_online_impressions=30", *overrides)
    return rollback_flow(as_flow_params(cfg), force=force)


def champion_now() -> str:
    return str(MlflowClient().get_model_version_by_alias(NAME, "champion").version)


def served_windows(worse: str, better: str) -> tuple[dt.datetime, dt.datetime]:
    """When `worse` became champion and when `better` replaced it, as the registry recorded."""
    client = MlflowClient()
    _, worse_since = champion_history(client.get_model_version(NAME, worse).tags)
    previous, better_since = champion_history(client.get_model_version(NAME, better).tags)
    assert previous == worse and worse_since < better_since
    return worse_since, better_since


def log_both(traffic_db: Path, worse: str, better: str, *, previous_ctr: tuple[int, int],
             current_ctr: tuple[int, int]) -> None:
    """(searches, clicked) of the previous champion in its time as champion, and of the current
    one since it became champion (until now)."""
    worse_since, better_since = served_windows(worse, better)
    uri = f"sqlite:///{traffic_db}"
    log_searches(uri, worse, searches=previous_ctr[0], clicked=previous_ctr[1], start=worse_since, end=better_since)
    log_searches(uri, better, searches=current_ctr[0], clicked=current_ctr[1], start=better_since,
                 end=dt.datetime.now(dt.UTC))


def state() -> dict:
    client = MlflowClient()
    return {"aliases": dict(client.get_registered_model(NAME).aliases),
            "tags": {str(v.version): dict(v.tags) for v in client.search_model_versions(f"name = '{NAME}'")}}


@pytest.mark.slow
def test_a_champion_whose_ctr_dropped_is_rolled_back_with_its_catalogue(promoted_twice, synthetic_dataset_dir, tmp_path):
    from flows.promote import promote_flow

    root, worse, better = promoted_twice
    cfg = ops_params(root, synthetic_dataset_dir)
    # no searches yet: too few to judge, nothing changes
    before = state()
    few = rollback_with(root, synthetic_dataset_dir, tmp_path / "empty.db")
    assert few["outcome"] == "too_few" and "each side needs 30" in few["reason"], few["reason"]
    assert state() == before

    # CTR@10 0.50 -> 0.475: a drop of 0.025, within 0.05: kept
    within = tmp_path / "within.db"
    log_both(within, worse, better, previous_ctr=(40, 20), current_ctr=(40, 19))
    kept = rollback_with(root, synthetic_dataset_dir, within)
    assert kept["outcome"] == "kept" and "within 0.05" in kept["reason"], kept["reason"]
    assert kept["champion_ctr"]["searches"] == 40 and kept["champion_ctr"]["ctr_at_10"] == pytest.approx(0.475)
    assert kept["previous_ctr"]["ctr_at_10"] == pytest.approx(0.5)
    assert state() == before

    # an ad added to the champion's live catalogue: the rollback must carry it
    added = add_ads(f"models:/{NAME}@champion", new_ads_dir(synthetic_dataset_dir, tmp_path / "ads",
                                                                [("new:rollback", "zenko offer", "syn:00000")]),
                    validate_cfg=cfg.validation, cache_dir=cfg.data.cache_dir, experiment=cfg.registry.experiment,
                    progress=False)
    assert "new:rollback" in set(added.catalogue.ads["ad_id"])

    # CTR@10 0.50 -> 0.20: rolled back
    dropped = tmp_path / "dropped.db"
    log_both(dropped, worse, better, previous_ctr=(40, 20), current_ctr=(40, 8))
    decision = rollback_with(root, synthetic_dataset_dir, dropped)
    assert decision["outcome"] == "rolled_back", decision["reason"]
    assert "CTR@10 dropped 0.3000 (> 0.05)" in decision["reason"] and decision["forced"] is False
    assert (decision["champion_version"], decision["previous_version"]) == (better, worse)
    assert champion_now() == worse
    client = MlflowClient()
    tags = client.get_model_version(NAME, better).tags
    assert tags["alignsearch.rollback.outcome"] == "rolled_back" and tags["alignsearch.rollback.to"] == worse
    assert tags["alignsearch.rollback.forced"] == "false"
    [record] = decision_records(f"models:/{NAME}/{better}", "rollback")
    assert record["outcome"] == "rolled_back" and record["champion_ctr"]["ctr_at_10"] == pytest.approx(0.2)
    restored = client.get_model_version(NAME, worse)
    assert restored.tags["alignsearch.champion.restored_from"] == better
    # the live catalogue moved with it: the new champion serves the ad added to the old one
    champion = open_model(f"models:/{NAME}@champion", cfg.data.cache_dir)
    assert champion.version == worse
    assert "new:rollback" in set(current_catalogue(champion, cfg.data.cache_dir).ads["ad_id"])
    # the cards say so
    assert f"Rolled back** to v{worse}" in client.get_model_version(NAME, better).description
    assert f"the rollback of v{better} restored it" in restored.description

    # the rolled-back version is still `challenger`, but never promoted again
    again = promote_flow(as_flow_params(ops_params(root, synthetic_dataset_dir, "promote.online=off",
                                                   "promote.guardrail_metric=ndcg@10")))
    assert again["outcome"] == "unchanged" and "rolled back" in again["reason"], again["reason"]
    assert champion_now() == worse
    # and the restored champion has no previous champion of its own: nothing further to go back to
    further = rollback_with(root, synthetic_dataset_dir, dropped)
    assert further["outcome"] == "no_previous" and champion_now() == worse


@pytest.mark.slow
def test_force_rolls_back_regardless_and_says_so(promoted_twice, synthetic_dataset_dir, tmp_path):
    from flows.cli import app

    root, worse, better = promoted_twice
    traffic = tmp_path / "traffic.db"
    log_both(traffic, worse, better, previous_ctr=(40, 10), current_ctr=(40, 30))  # the champion does better
    sets = [f"data.path={synthetic_dataset_dir}", f"data.cache_dir={root / 'cache'}", f"paths.flow_dir={root / 'flow'}",
            f"registry.tracking_uri=sqlite:///{root / 'mlruns' / 'mlflow.db'}",
            f"registry.artifact_location={root / 'mlruns' / 'artifacts'}", f"traffic.store_uri=sqlite:///{traffic}",
            "promote.min_online_impressions=30"]
    args = [arg for item in sets for arg in ("--set", item)]
    runner = CliRunner()
    kept = runner.invoke(app, ["rollback", *args])
    assert kept.exit_code == 0, kept.output
    assert "kept" in kept.output and champion_now() == better
    forced = runner.invoke(app, ["rollback", "--force", *args])
    assert forced.exit_code == 0, forced.output
    assert "rolled_back" in forced.output and "forced (--force)" in forced.output
    assert champion_now() == worse
    tags = MlflowClient().get_model_version(NAME, better).tags
    assert tags["alignsearch.rollback.forced"] == "true" and "forced" in tags["alignsearch.rollback.reason"]
