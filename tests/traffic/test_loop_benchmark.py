"""The loop benchmark (`alignsearch benchmark-loop`) on the tiny synthetic dataset: two rounds of
simulated people searching the real search service over HTTP, ingest into new dataset versions,
warm retraining and the promotion rule, for ours and late_fusion. Quality never drops round over
round, every search and click the simulated people made is in the traffic log and in the loop's
training data, and the report is written."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from components.config import load_params
from components.data.format import read_dataset
from components.traffic.events import open_store
from components.traffic.ingest import ingest, read_observations
from components.traffic.loop_benchmark import impressions_needed, loop_base
from flows.cli import app

pytestmark = pytest.mark.slow

TINY = ["align.max_iter=20", "match.max_steps=4", "match.eval_every=2", "match.lr=0.0001", "match.warm_start_steps=3",
        "promote.min_online_impressions=20", "benchmark_loop.online_searches=40", "benchmark_loop.final_searches=40"]


def test_loop_base_keeps_a_share_of_the_training_qrels_and_everything_else(synthetic_dataset_dir, tmp_path):
    full = read_dataset(synthetic_dataset_dir)
    base = read_dataset(loop_base(synthetic_dataset_dir, tmp_path / "base", 0.25, seed=3))
    judged = full.qrels.loc[full.qrels["split"] == "train", "query_id"].nunique()
    kept = base.qrels.loc[base.qrels["split"] == "train", "query_id"].unique()
    assert len(kept) == round(0.25 * judged)
    for name in ("valid", "test"):  # untouched
        pd.testing.assert_frame_equal(base.split(name).qrels, full.split(name).qrels)
    pd.testing.assert_frame_equal(base.queries, full.queries)  # the other queries stay, unjudged
    pd.testing.assert_frame_equal(base.ads, full.ads)
    again = read_dataset(loop_base(synthetic_dataset_dir, tmp_path / "again", 0.25, seed=3))
    pd.testing.assert_frame_equal(again.qrels, base.qrels)  # by seed


def test_impressions_needed_counts_from_where_the_verdict_stays():
    prefs = pd.DataFrame({"preference": ["challenger"] * 6 + ["champion"] * 2 + ["challenger"] * 10})
    # 6-0 is significant (p = 0.031); 6-1 is not; from 10-2 (p = 0.039, impression 12) on it stays.
    assert impressions_needed(prefs, "challenger", 0.05) == 12
    assert impressions_needed(prefs, "champion", 0.05) is None
    assert impressions_needed(prefs.iloc[:6], "challenger", 0.05) == 6
    assert impressions_needed(prefs.iloc[:7], "challenger", 0.05) is None  # not significant at the end


def test_two_rounds_through_the_service_account_for_every_event(synthetic_dataset_dir, tmp_path):
    work, out = tmp_path / "work", tmp_path / "report"
    overrides = [*TINY, f"data.cache_dir={tmp_path / 'cache'}"]
    result = CliRunner().invoke(app, ["benchmark-loop", "--data", str(synthetic_dataset_dir), "--rounds", "2",
                                      "--searches", "60", "--seeds", "0", "--systems", "ours,late_fusion",
                                      "--out", str(out), "--work", str(work),
                                      *[arg for item in overrides for arg in ("--set", item)]])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "loop.json").read_text())
    assert (out / "learning_curves.png").stat().st_size > 0
    assert "The loop helps" in (out / "loop.md").read_text()
    rows = pd.DataFrame(report["rows"])
    full = read_dataset(synthetic_dataset_dir)
    cfg = load_params(None, overrides)
    for system in ("ours", "late_fusion"):
        mine = rows[rows["system"] == system].sort_values("round")
        assert mine["round"].tolist() == [0, 1, 2]
        decisions = [d for d in report["decisions"] if d["system"] == system]
        assert [d["round"] for d in decisions] == [1, 2]
        for d, (_, row) in zip(decisions, mine.iloc[1:].iterrows(), strict=True):
            # the online verdict was there, read every interleaved search, and the rule (advisory)
            # followed both verdicts: a significant online loss vetoes, otherwise offline decides
            assert d["online"]["impressions"] == 40 and d["online_status"] != "missing", d
            assert d["promoted"] == (d["offline_promote"] and d["online_status"] != "champion_better"), d
            assert row["outcome"] == ("promoted" if d["promoted"] else "kept")
        # Quality as the rule reads it (valid) never drops; a kept round keeps its champion.
        assert mine["decide_ndcg@10"].is_monotonic_increasing, mine
        kept = mine["outcome"] == "kept"
        assert (mine["ndcg@10"][kept].to_numpy() == mine["ndcg@10"].shift()[kept].to_numpy()).all(), mine
        assert mine["clicks"].is_monotonic_increasing and mine["clicks"].iloc[-1] > 0
        # Every event: the log holds exactly what the simulated people were answered and had
        # acknowledged, and a last ingest puts every click into the loop's data exactly once.
        traffic = cfg.traffic.model_copy(update={"store_uri": f"sqlite:///{work / f'{system}-seed0' / 'traffic.db'}"})
        with open_store(traffic) as store:
            events = store.read()
            assert len(events.impressions) == sum(d["searches_answered"] for d in decisions) == 2 * (60 + 40)
            assert len(events.clicks) == sum(d["clicks_acknowledged"] for d in decisions)
            # a round's retraining had every click logged before it: all but its own online phase's
            assert mine["clicks"].iloc[-1] == len(events.clicks) - decisions[-1]["online_clicks_acknowledged"]
            live = work / f"{system}-seed0" / "live"
            ingest(work / f"{system}-seed0" / "base", live, store, traffic)
        observations = read_observations(live)
        assert observations["event_id"].nunique() == len(events.impressions)
        assert sorted(observations.loc[observations["clicked"], "click_id"]) == sorted(events.clicks["click_id"])
        # The simulated people never saw the test split: the loop's data keeps it as it was.
        version = read_dataset(live)
        pd.testing.assert_frame_equal(version.split("test").qrels[["query_id", "ad_id", "relevance"]],
                                      full.split("test").qrels[["query_id", "ad_id", "relevance"]])
        assert set(version.queries["query_id"]) == set(full.queries["query_id"])  # no new query: training texts
    assert (rows["outcome"] == "promoted").any(), rows  # the loop did move a champion
    final = [c for c in report["comparisons"] if c["kind"] == "final"]
    assert len(final) == 1 and final[0]["impressions"] == 40
    # The same simulated people met both systems: the same queries in the same order (round 1's;
    # their clicks differ as the two systems showed different ads).
    firsts = []
    for system in ("ours", "late_fusion"):
        traffic = cfg.traffic.model_copy(update={"store_uri": f"sqlite:///{work / f'{system}-seed0' / 'traffic.db'}"})
        with open_store(traffic) as store:
            firsts.append(store.read().impressions.sort_values("seq").head(60)[["query"]]
                          .reset_index(drop=True))
    pd.testing.assert_frame_equal(*firsts)
