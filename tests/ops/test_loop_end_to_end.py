"""The loop end to end (issue 20, "Done means"): a champion served over real HTTP, simulated
people searching and clicking, the scheduled job (ingest -> validate -> retrain -> register ->
promote), the traffic report; then nothing new means nothing added and nothing registered.

Real everything: the retraining and promotion flows in a throwaway Prefect server, an MLflow
store, the traffic log (SQLite) and the live dataset in a temporary directory, `alignsearch
serve` in a child process on a free port, the simulator's people (`run_users`: position-based
examination, clicks on what the qrels call relevant, noise) over HTTP, the tiny synthetic
dataset of tests/conftest.py. The expected contents of the ingested version are worked out
here from what the simulator had acknowledged, by the rules docs/traffic.md gives (a click
belongs to the query of its text in the ad's split; cross-split clicks are dropped and counted;
a positive's weight is the sum of its clicks' inverse propensities), not read back from the
ingest's own bookkeeping."""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from ops_helpers import start_serve
from typer.testing import CliRunner

from components.config import Params, load_params
from components.data.format import SPLITS, dataset_hash, read_dataset
from components.data.validate import validate_dataset
from components.registry.promotion import KEPT, PROMOTED
from components.traffic.config import SimulatorConfig
from components.traffic.events import EventStore, open_store
from components.traffic.ingest import ingest as ingest_events
from components.traffic.ingest import (
    normalize_query,
    query_split,
    read_observations,
    read_state,
    split_fractions,
)
from components.traffic.simulator import UsersResult, run_users
from flows.cli import app
from flows.promote import promote_flow, retrain_and_promote_flow
from flows.retrain import WARM_FROM_TAG, retrain_flow

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "alignsearch"
TAG = "alignsearch.loop"
# Tiny training (as tests/flows/test_loop_flow.py): v1 cold at a known rate; the loop's runs
# leave the rate open, so a warm start can only take the champion's.
TINY = ["align.max_iter=20", "match.max_steps=4", "match.eval_every=2", "benchmark.gallery_size=4",
        "match.warm_start_steps=3"]
CHAMPION_LR = 1e-4
NUM_SEARCHES = 300
# What people type beyond the dataset: texts no base query has, so the version gains queries.
# The simulated people find every ad relevant to them (they click what they examine, at
# `click_relevant`), which spreads their clicks over all three splits of ads.
NEW_TEXTS = ["striped balloon", "Green   Umbrella", "paper kite"]


def _overrides(root: Path, dataset_dir: Path) -> list[str]:
    """Every output of the flows (stages, MLflow store, caches, traffic log, live dataset) under `root`."""
    return [f"data.path={dataset_dir}", f"data.cache_dir={root / 'cache'}", f"paths.flow_dir={root / 'flow'}",
            f"registry.tracking_uri=sqlite:///{root / 'mlruns' / 'mlflow.db'}",
            f"registry.artifact_location={root / 'mlruns' / 'artifacts'}",
            f"traffic.store_uri=sqlite:///{root / 'traffic.db'}", f"traffic.dataset_dir={root / 'live'}",
            f"paths.reports_dir={root / 'reports'}", *TINY]


def _params(overrides: list[str]) -> dict:
    return load_params(None, overrides).model_dump(mode="json", by_alias=True)


def _versions(client: MlflowClient) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{MODEL}'"))


# --------------------------------------------------------------------------- serving and people


def _serve(cfg: Params, root: Path) -> tuple[subprocess.Popen, str]:
    """`alignsearch serve` of the champion in a child process, logging into the test's traffic log."""
    sets = [f"registry.tracking_uri={cfg.registry.tracking_uri}", f"data.cache_dir={cfg.data.cache_dir}",
            f"traffic.store_uri={cfg.traffic.store_uri}"]
    return start_serve(root, f"models:/{MODEL}@champion", sets, cwd=root, log_path=root / "serve.log")


def _people(base_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The simulator's queries (the training split's, plus NEW_TEXTS) and what it takes as relevant
    (the dataset's qrels; for a new text, every ad)."""
    base = read_dataset(base_dir)
    new = pd.DataFrame({"query_id": [f"people:{i}" for i in range(len(NEW_TEXTS))], "text": NEW_TEXTS,
                        "split": "train"})
    liked = pd.DataFrame([(q, a, 1, "train") for q in new["query_id"] for a in base.ads["ad_id"]],
                         columns=["query_id", "ad_id", "relevance", "split"])
    return (pd.concat([base.queries[["query_id", "text", "split"]], new], ignore_index=True),
            pd.concat([base.qrels[["query_id", "ad_id", "relevance", "split"]], liked], ignore_index=True))


def _simulate(cfg: Params, root: Path, base_dir: Path) -> UsersResult:
    """Serve v1, let the people search and click, stop the server cleanly (its log is written)."""
    queries, qrels = _people(base_dir)
    server, url = _serve(cfg, root)
    try:
        people = SimulatorConfig(seed=11, split="train", num_searches=NUM_SEARCHES, k=10)
        result = run_users(url, queries, qrels, people)
        health = httpx.get(f"{url}/health", timeout=30).json()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)
    # A clean stop: uvicorn runs the app's shutdown (which writes the queued searches), then
    # re-raises the SIGTERM it caught, so the process ends by that signal.
    served = (root / "serve.log").read_text()
    assert server.returncode in (0, -signal.SIGTERM) and "Application shutdown complete" in served, served[-3000:]
    assert health["version"] == "1" and health["traffic"]["logging"] == "on"
    assert health["traffic"]["dropped"] == health["traffic"]["failed"] == 0
    assert result.searches == NUM_SEARCHES and result.num_errors == 0, dict(result.errors)
    assert result.clicks_acknowledged == result.clicks_sent == len(result.acknowledged) > 0
    return result


# --------------------------------------------------------------------------- what the version must hold


def _expected(base_dir: Path, searched: dict[str, str], acknowledged: list[tuple[str, str, int]],
              propensities: list[float | None], clip: float) -> dict:
    """From the acknowledged clicks alone, by the ingest's rules: each click's (query, ad) pair
    (query id None for a new text) with its clicks and summed inverse-propensity weight, the
    clicks on an ad of another split than their query, and each new text's split."""
    base = read_dataset(base_dir)
    by_text: dict[str, dict[str, str]] = defaultdict(dict)
    for query_id, text, split in sorted(zip(base.queries["query_id"], base.queries["text"], base.queries["split"],
                                            strict=True)):
        by_text[normalize_query(text)].setdefault(str(split), str(query_id))
    ad_split = dict(zip(base.ads["ad_id"].astype(str), base.ads["split"].astype(str), strict=True))
    fractions = split_fractions(base.queries)
    p = np.array([np.nan if v is None else v for v in propensities])
    pairs: dict[tuple[str, str | None, str, str], list] = defaultdict(lambda: [0, 0.0])
    cross: Counter = Counter()
    for request_id, ad_id, position in acknowledged:
        text = normalize_query(searched[request_id])
        if text in by_text:
            splits = by_text[text]
            split = ad_split[ad_id] if ad_split[ad_id] in splits else next(s for s in SPLITS if s in splits)
            query_id = splits[split]
        else:
            split, query_id = query_split(text, fractions), None
        if split != ad_split[ad_id]:
            cross[(text, ad_id)] += 1
            continue
        pair = pairs[(text, query_id, ad_id, split)]
        pair[0] += 1
        pair[1] += min(1.0 / p[position - 1], clip)
    return {"pairs": dict(pairs), "cross": cross}


def _check_version(live: Path, base_dir: Path, result: UsersResult, searched: dict[str, str], clip: float) -> dict:
    """The version holds exactly the simulated searches and clicks; returns the counts it should have."""
    state = read_state(live)
    counts = state["counts"]
    assert counts["impressions"] == result.searches and counts["clicks"] == len(result.acknowledged)
    assert counts["orphan_clicks"] == counts["unknown_ad_clicks"] == 0

    obs = read_observations(live)  # every search ingested, one row per ad shown
    assert sorted(obs["event_id"].unique()) == sorted(result.request_ids)
    assert obs.groupby("event_id").size().eq(10).all()
    clicked = obs[obs["clicked"]]
    assert len(clicked) == len(result.acknowledged) == clicked["click_id"].nunique()
    assert set(zip(clicked["event_id"], clicked["ad_id"], clicked["position"], strict=True)) == \
        set(result.acknowledged)

    expected = _expected(base_dir, searched, result.acknowledged, state["propensities"], clip)
    pairs, cross = expected["pairs"], expected["cross"]
    # Every acknowledged click once: in a positive's weight, or counted as cross-split.
    assert sum(n for n, _ in pairs.values()) + sum(cross.values()) == len(result.acknowledged)
    assert counts["cross_split_clicks"] == sum(cross.values())

    base, version = read_dataset(base_dir), read_dataset(live)
    base_qrels = base.qrels.set_index(["query_id", "ad_id"])
    base_weight = base_qrels["weight"] if "weight" in base_qrels.columns else pd.Series(1.0, base_qrels.index)
    base_ids = set(base.queries["query_id"])
    new_queries = version.queries[~version.queries["query_id"].isin(base_ids)]
    new_id = dict(zip(new_queries["text"], new_queries["query_id"], strict=True))
    qrels = version.qrels.set_index(["query_id", "ad_id"])
    assert not qrels.index.duplicated().any()
    new_positives = set()
    for (text, query_id, ad_id, split), (_, weight) in pairs.items():
        query_id = query_id or new_id[text]  # a new text with a positive is a new query, in its split
        row = qrels.loc[(query_id, ad_id)]
        assert row["relevance"] > 0 and row["split"] == split, (text, ad_id)
        if (query_id, ad_id) in base_qrels.index:  # a pair the base judged relevant: its weight grew
            assert row["weight"] == pytest.approx(base_weight.loc[(query_id, ad_id)] + weight), (text, ad_id)
        else:
            assert row["weight"] == pytest.approx(weight), (text, ad_id)
            new_positives.add((query_id, ad_id))
    # ... and no positive came from anywhere else; the base's unclicked qrels are as they were.
    grown = {(q, a) for (t, q, a, s) in pairs if q is not None}
    added_positives = set(qrels.index[qrels["relevance"] > 0]) - set(base_qrels.index)
    assert added_positives == new_positives
    untouched = base_qrels.index.difference(list(grown))
    assert np.allclose(qrels.loc[untouched, "weight"], base_weight.loc[untouched])
    assert set(new_queries["text"]) == {t for (t, q, _, _) in pairs if q is None} <= {normalize_query(t) for t in
                                                                                       NEW_TEXTS}
    for text, split in zip(new_queries["text"], new_queries["split"], strict=True):
        assert split == query_split(text, split_fractions(base.queries))

    # Negatives only where a person skipped an ad above a click, and never clicked it for that text.
    negatives = version.qrels[version.qrels["relevance"] == 0]
    text_of = dict(zip(version.queries["query_id"], version.queries["text"], strict=True))
    lowest = clicked.groupby("event_id")["position"].max()
    skipped = obs[~obs["clicked"] & (obs["position"] < obs["event_id"].map(lowest).astype(float))]
    skipped_pairs = set(zip(skipped["query"], skipped["ad_id"], strict=True))
    clicked_pairs = set(zip(clicked["query"], clicked["ad_id"], strict=True))
    for query_id, ad_id in zip(negatives["query_id"], negatives["ad_id"], strict=True):
        assert (normalize_query(text_of[query_id]), ad_id) in skipped_pairs - clicked_pairs, (query_id, ad_id)
    assert counts["positives"] == len(new_positives) and counts["negatives"] == len(negatives)
    assert counts["new_queries"] == len(new_queries)
    return counts


# --------------------------------------------------------------------------- the test


def test_served_clicks_flow_into_the_next_version_a_warm_v2_and_the_report(prefect_harness, synthetic_dataset_dir,
                                                                           tmp_path):
    started = time.perf_counter()
    root, base_dir = tmp_path, synthetic_dataset_dir
    overrides = _overrides(root, base_dir)
    # 1. v1 trained cold and promoted: the champion people will search.
    assert retrain_flow(_params([*overrides, f"match.lr={CHAMPION_LR}"]))["version"] == "1"
    assert promote_flow(_params(overrides))["outcome"] == PROMOTED
    overrides = [*overrides, "match.lr=null"]
    cfg = load_params(None, overrides)
    client = MlflowClient(tracking_uri=cfg.registry.tracking_uri)

    # 2. The champion served over HTTP, the traffic log on; simulated people search and click.
    result = _simulate(cfg, root, base_dir)
    clicked_searches = len({request_id for request_id, _, _ in result.acknowledged})

    # 3. The log holds exactly the searches answered and the clicks acknowledged.
    with EventStore(cfg.traffic.store_uri) as store:
        events = store.read()
    impressions, clicks = events.impressions, events.clicks
    assert len(impressions) == result.searches
    assert sorted(impressions["event_id"]) == sorted(result.request_ids)
    assert set(impressions["model_version"]) == {"1"} and set(impressions["model_name"]) == {MODEL}
    assert len(clicks) == len(result.acknowledged)
    assert set(zip(clicks["request_id"], clicks["ad_id"], clicks["position"], strict=True)) == set(result.acknowledged)
    searched = dict(zip(impressions["event_id"], impressions["query"], strict=True))
    assert {normalize_query(t) for t in NEW_TEXTS} <= {normalize_query(t) for t in searched.values()}

    # 4. The scheduled job: ingest -> validate -> retrain warm from v1 -> register v2 -> promote.
    out = retrain_and_promote_flow(str(REPO_ROOT / "params.yaml"), overrides, loop=True)
    retrained, decision = out["retrain"], out["promotion"]
    live = (root / "live").resolve()
    base_hash, live_hash = dataset_hash(base_dir), dataset_hash(live)
    assert retrained["dataset_dir"] == str(live) and retrained["dataset_hash"] == live_hash != base_hash
    counts = _check_version(live, base_dir, result, searched, cfg.traffic.ipw_clip)
    assert counts["new_queries"] > 0 and counts["positives"] > 0 and counts["cross_split_clicks"] > 0
    assert validate_dataset(live, cfg.validation).success  # as the flow's validate stage found

    assert retrained["version"] == "2" and retrained["version_created"]
    run, v2 = client.get_run(retrained["run_id"]), client.get_model_version(MODEL, "2")
    v1_run = client.get_model_version(MODEL, "1").run_id
    for tags in (run.data.tags, v2.tags):
        assert tags[TAG] == "on" and tags[f"{TAG}.changed"] == "true"
        assert tags[f"{TAG}.dataset_before"] == tags[f"{TAG}.champion_dataset"] == base_hash
        assert tags[f"{TAG}.dataset_after"] == tags["dataset_hash"] == live_hash
        assert tags[f"{TAG}.impressions"] == str(result.searches)
        assert tags[f"{TAG}.clicks"] == str(len(result.acknowledged))
        assert tags[f"{TAG}.new_queries"] == str(counts["new_queries"])
        assert tags[f"{TAG}.positives"] == str(counts["positives"])
        assert tags[f"{TAG}.negatives"] == str(counts["negatives"])
        assert tags[WARM_FROM_TAG] == "1" and tags[f"{TAG}.warm_start"].startswith(f"warm: {MODEL} v1 (run {v1_run})")
    assert run.data.metrics["loop/clicks"] == len(result.acknowledged)
    assert run.data.metrics["matcher/lr"] == CHAMPION_LR and run.data.metrics["matcher/steps"] == 3

    assert decision["challenger_version"] == "2" and decision["champion_version"] == "1"
    assert decision["outcome"] in (PROMOTED, KEPT), decision
    assert client.get_model_version(MODEL, "2").tags["alignsearch.promotion.outcome"] == decision["outcome"]
    champion = str(client.get_model_version_by_alias(MODEL, "champion").version)
    assert champion == ("2" if decision["outcome"] == PROMOTED else "1")

    # 5. `alignsearch traffic report` over that log: one run in the monitoring experiment.
    report_dir = root / "report"
    report = CliRunner().invoke(app, ["traffic", "report", "--days", "1", "--out", str(report_dir),
                                      *[arg for item in overrides for arg in ("--set", item)]])
    assert report.exit_code == 0, report.output
    monitoring = client.get_experiment_by_name(cfg.traffic.monitoring_experiment)
    [report_run] = client.search_runs([monitoring.experiment_id])
    assert report_run.info.run_id in report.output.replace("\n", "")
    assert report_run.data.tags["model_version"] == "1" and report_run.data.tags["model_name"] == MODEL
    assert report_run.data.tags["searches"] == str(result.searches)
    # Per UTC day (a run across midnight has two): searches add up, CTR@10 weighted by them.
    searches = {m.step: m.value for m in client.get_metric_history(report_run.info.run_id, f"{MODEL}/v1/searches")}
    ctr10 = {m.step: m.value for m in client.get_metric_history(report_run.info.run_id, f"{MODEL}/v1/ctr_at_10")}
    assert sum(searches.values()) == result.searches
    assert sum(ctr10[day] * searches[day] for day in searches) == pytest.approx(clicked_searches)
    artifacts = {f.path for f in client.list_artifacts(report_run.info.run_id)}
    assert {"traffic_report.csv", "traffic_report.png"} <= artifacts

    # 6. Nothing new: a second ingest writes nothing, a second loop run registers nothing.
    with open_store(cfg.traffic) as store:
        again = ingest_events(base_dir, live, store, cfg.traffic)
    assert not again.changed and again.dataset_hash == live_hash
    assert (again.impressions, again.clicks) == (0, 0)
    rerun = retrain_and_promote_flow(str(REPO_ROOT / "params.yaml"), overrides, loop=True)["retrain"]
    assert rerun["dataset_hash"] == live_hash and rerun["version"] == "2" and not rerun["version_created"]
    assert rerun["loop"][f"{TAG}.changed"] == "false" and rerun["loop"][f"{TAG}.clicks"] == "0"
    assert _versions(client) == ["1", "2"]
    print(f"\nloop end to end: {result.searches} searches, {len(result.acknowledged)} clicks "
          f"({clicked_searches} searches clicked, {counts['cross_split_clicks']} cross-split), "
          f"{counts['new_queries']} new queries, {counts['positives']} new positives, "
          f"{counts['negatives']} negatives; promotion {decision['outcome']}; "
          f"{time.perf_counter() - started:.0f} s")
