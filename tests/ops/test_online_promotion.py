"""Promotion listens to traffic (promote.online): the offline rule and the online verdict from
the traffic log decide together, and the record keeps both and why.

Real registered models in a real MLflow store (two versions that differ offline: the session's
v1 and one trained with another seed and no word channel), the real promotion flow, and a
traffic log in tmp holding hand-made interleaved searches of the pair whose wins are known.
The rule itself (`online_rule`) is checked on hand-made verdicts too."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from mlflow import MlflowClient
from ops_helpers import as_flow_params, decision_records, ops_params
from two_versions import NAME, copy_store, log_interleaved

from components.registry.config import PromoteConfig
from components.registry.promotion import online_rule

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


# --------------------------------------------------------------------------- the rule


OFFLINE_WIN, OFFLINE_LOSS = (True, "ndcg@10 better"), (False, "ndcg@10 worse")


@pytest.mark.parametrize(("mode", "offline", "online", "promoted", "says"), [
    ("off", OFFLINE_WIN, ("off", "promote.online is off"), True, "online: promote.online is off"),
    ("advisory", OFFLINE_WIN, ("no_champion", "no champion"), True, "online: no champion"),
    ("advisory", OFFLINE_WIN, ("champion_better", "p = 0.001"), False, "loses online"),     # offline win overruled
    ("required", OFFLINE_WIN, ("champion_better", "p = 0.001"), False, "although it wins offline"),
    ("advisory", OFFLINE_WIN, ("challenger_better", "p = 0.001"), True, "wins offline and online"),
    ("required", OFFLINE_WIN, ("challenger_better", "p = 0.001"), True, "wins offline and online"),
    ("advisory", OFFLINE_LOSS, ("challenger_better", "p = 0.001"), False, "but not offline"),   # offline stays a gate
    ("advisory", OFFLINE_WIN, ("no_difference", "p = 0.4"), True, "the offline rule decides"),
    ("advisory", OFFLINE_LOSS, ("no_difference", "p = 0.4"), False, "the offline rule decides"),
    ("required", OFFLINE_WIN, ("no_difference", "p = 0.4"), False, "required"),
    ("advisory", OFFLINE_WIN, ("missing", "12 impressions"), True, "online verdict missing"),
    ("required", OFFLINE_WIN, ("missing", "12 impressions"), False, "online verdict missing"),
])
def test_online_rule(mode, offline, online, promoted, says):
    decision, reason = online_rule(offline, online, PromoteConfig(online=mode))
    assert decision is promoted, reason
    assert says in reason


# --------------------------------------------------------------------------- real promotions


@pytest.fixture
def pair(two_versions, synthetic_dataset_dir, tmp_path):
    """This test's copy of the two-version store, the worse version `champion` and the better
    `challenger` (it wins offline): (root, worse, better)."""
    source, worse, better = two_versions
    root = tmp_path / "store"
    copy_store(source, root, synthetic_dataset_dir)
    client = MlflowClient()
    client.set_registered_model_alias(NAME, "champion", worse)
    client.set_registered_model_alias(NAME, "challenger", better)
    return root, worse, better


def log_pair(traffic: Path, challenger: str, champion: str, wins: int, losses: int, ties: int) -> None:
    log_interleaved(f"sqlite:///{traffic}", challenger, champion, wins=wins, losses=losses, ties=ties, start=T0)


def promote_with(root: Path, dataset_dir: Path, traffic_db: Path, *overrides: str) -> dict:
    from flows.promote import promote_flow

    cfg = ops_params(root, dataset_dir, "promote.guardrail_metric=ndcg@10", f"traffic.store_uri=sqlite:///{traffic_db}",
                     *overrides)
    return promote_flow(as_flow_params(cfg))


def champion_now() -> str:
    return str(MlflowClient().get_model_version_by_alias(NAME, "champion").version)


def recorded(version: str, key: str) -> dict:
    [record] = [r for r in decision_records(f"models:/{NAME}/{version}", "promotion") if r["key"] == key]
    return record


@pytest.mark.slow
def test_a_challenger_that_loses_online_is_not_promoted_though_it_wins_offline(pair, synthetic_dataset_dir, tmp_path):
    root, worse, better = pair
    traffic = tmp_path / "traffic.db"
    log_pair(traffic, better, worse, wins=50, losses=150, ties=40)  # 240 >= 200
    decision = promote_with(root, synthetic_dataset_dir, traffic)
    assert decision["outcome"] == "kept", decision["reason"]
    assert decision["offline_promote"] is True and decision["online_status"] == "champion_better"
    assert "loses online" in decision["reason"] and "although it wins offline" in decision["reason"]
    assert champion_now() == worse
    # the record: both verdicts, the online numbers, why
    record = recorded(better, decision["key"])
    assert record["offline_promote"] is True and "ndcg@10" in record["offline_reason"]
    assert record["online"]["impressions"] == 240 and record["online"]["preferred"] == 200
    assert (record["online"]["challenger_wins"], record["online"]["champion_wins"]) == (50, 150)
    assert record["online"]["p_value"] < 1e-6
    tags = MlflowClient().get_model_version(NAME, better).tags
    assert tags["alignsearch.promotion.offline"] == "wins" and tags["alignsearch.promotion.online"] == "champion_better"
    assert tags["alignsearch.online.verdict"] == "champion_better" and tags["alignsearch.online.impressions"] == "240"
    assert tags["alignsearch.online.champion"] == f"{NAME}/{worse}"

    # asking again with the same log: the same key, nothing changes
    assert promote_with(root, synthetic_dataset_dir, traffic)["outcome"] == "unchanged"
    # promote.online off: the offline rule alone, which promotes
    off = promote_with(root, synthetic_dataset_dir, traffic, "promote.online=off")
    assert off["outcome"] == "promoted" and off["online_status"] == "off", off["reason"]
    assert champion_now() == better


@pytest.mark.slow
def test_a_challenger_that_wins_offline_and_online_is_promoted(pair, synthetic_dataset_dir, tmp_path):
    root, worse, better = pair
    traffic = tmp_path / "traffic.db"
    log_pair(traffic, better, worse, wins=150, losses=50, ties=40)
    decision = promote_with(root, synthetic_dataset_dir, traffic)
    assert decision["outcome"] == "promoted", decision["reason"]
    assert decision["online_status"] == "challenger_better" and "wins offline and online" in decision["reason"]
    assert champion_now() == better
    tags = MlflowClient().get_model_version(NAME, better).tags
    assert tags["alignsearch.champion.previous"] == worse and tags["alignsearch.champion.since"]
    assert tags["alignsearch.online.win_share"] == "0.7500"


@pytest.mark.slow
def test_required_promotes_only_on_a_significant_online_win(pair, synthetic_dataset_dir, tmp_path):
    root, worse, better = pair
    traffic = tmp_path / "traffic.db"
    log_pair(traffic, better, worse, wins=105, losses=95, ties=40)  # p ~ 0.5
    required = promote_with(root, synthetic_dataset_dir, traffic, "promote.online=required")
    assert required["outcome"] == "kept" and required["online_status"] == "no_difference"
    assert required["offline_promote"] is True and "promote.online is required" in required["reason"]
    assert champion_now() == worse
    # advisory, the same log: no significant difference leaves it to the offline rule
    advisory = promote_with(root, synthetic_dataset_dir, traffic)
    assert advisory["outcome"] == "promoted" and "the offline rule decides" in advisory["reason"]
    assert champion_now() == better


@pytest.mark.slow
def test_too_few_impressions_leave_it_to_the_offline_rule_and_say_so(pair, synthetic_dataset_dir, tmp_path):
    root, worse, better = pair
    # no traffic log at all: required refuses, says why, and creates no log
    nothing = tmp_path / "none.db"
    required = promote_with(root, synthetic_dataset_dir, nothing, "promote.online=required")
    assert required["outcome"] == "kept" and required["online_status"] == "missing"
    assert f"no traffic log at {nothing}" in required["reason"] and not nothing.exists()
    # 150 interleaved searches, all lost by the challenger, but fewer than 200: missing
    traffic = tmp_path / "traffic.db"
    log_pair(traffic, better, worse, wins=0, losses=110, ties=40)
    advisory = promote_with(root, synthetic_dataset_dir, traffic)
    assert advisory["outcome"] == "promoted", advisory["reason"]
    assert advisory["online_status"] == "missing"
    assert "online verdict missing (150 interleaved impressions, fewer than the 200 needed)" in advisory["reason"]
    assert advisory["online"]["verdict"] == "too_few" and advisory["online"]["champion_wins"] == 110
    tags = MlflowClient().get_model_version(NAME, better).tags
    assert tags["alignsearch.promotion.online"] == "missing" and tags["alignsearch.online.verdict"] == "too_few"
    assert champion_now() == better
