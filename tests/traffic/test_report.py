"""`traffic report`: metrics of hand-made searches and clicks whose values are known by hand, the
training words of a registered version for query drift, and the run in a throwaway MLflow store."""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import pandas as pd
import pytest
from traffic_helpers import click, impression

from components.registry.config import RegistryConfig
from components.registry.tracking import client, configure_mlflow
from components.traffic.events import EventStore
from components.traffic.report import (
    METRICS,
    PLOT_FILE,
    TABLE_FILE,
    compute_report,
    log_report,
    model_versions,
    training_vocabularies,
    training_vocabulary,
)

DAY1 = dt.datetime(2025, 3, 1, 9, 0, tzinfo=dt.UTC)
DAY2 = DAY1 + dt.timedelta(days=1)
TWELVE = tuple(f"a{i}" for i in range(1, 13))


@pytest.fixture
def events(tmp_path):
    """Day 1, alignsearch v3 (catalogue v7): four searches, clicked at position 1; at 3 and 2; not
    at all; at 12, taking 10, 20, 30 and 40 ms. Day 2, v3 (catalogue v8): one hashed query, no
    click, no time. Day 1, v4: one search clicked at 1."""
    v3 = {"model_version": "3", "catalogue_version": "v7"}
    s1 = impression("red car", TWELVE[:3], time=DAY1, took_ms=10.0, **v3)
    s2 = impression("the blue boat", TWELVE[:3], time=DAY1, took_ms=20.0, **v3)
    s3 = impression("green truck", TWELVE[:3], time=DAY1, took_ms=30.0, **v3)
    s4 = impression("red car", TWELVE, time=DAY1 + dt.timedelta(hours=14), took_ms=40.0, **v3)
    s5 = impression("sha256:0123456789abcdef", TWELVE[:3], time=DAY2, model_version="3", catalogue_version="v8")
    s6 = impression("red boat", TWELVE[:3], time=DAY1, took_ms=5.0, model_version="4", catalogue_version="v7")
    clicks = [click(s1, "a1"), click(s2, "a3"), click(s2, "a2", after_s=9), click(s4, "a12"), click(s6, "a1")]
    with EventStore(f"sqlite:///{tmp_path / 'traffic.db'}") as store:
        store.append([s1, s2, s3, s4, s5, s6, *clicks])
        return store.read()


VOCABULARIES = {("alignsearch", "3"): frozenset({"red", "car", "blue", "boat"})}


def _row(report: pd.DataFrame, **keys) -> dict:
    match = report
    for key, value in keys.items():
        match = match[match[key] == value]
    assert len(match) == 1, match
    return match.iloc[0].to_dict()


def test_metrics_of_four_searches_known_by_hand(events):
    report = compute_report(events, VOCABULARIES)
    assert list(report.columns) == ["model_name", "model_version", "catalogue_version", "date", *METRICS]
    assert report[["model_version", "catalogue_version", "date"]].values.tolist() == [
        ["3", "v7", "2025-03-01"], ["3", "v8", "2025-03-02"], ["4", "v7", "2025-03-01"]]
    day1 = _row(report, model_version="3", catalogue_version="v7")
    assert day1["searches"] == 4 and day1["clicks"] == 4
    assert day1["ctr@1"] == 0.25  # s1
    assert day1["ctr@10"] == 0.5  # s1, s2 (s4's click is at 12)
    assert day1["clicks_per_search"] == 1.0
    assert day1["mrr_clicked"] == pytest.approx((1 + 1 / 2 + 1 / 12) / 3)  # over the 3 clicked searches
    assert day1["abandonment"] == 0.25  # s3
    assert day1["latency_p50_ms"] == 25.0 and day1["latency_p99_ms"] == pytest.approx(39.7)
    assert day1["query_drift"] == 0.25  # "green truck"; "the" is a stop word, not drift

    day2 = _row(report, catalogue_version="v8")
    assert (day2["searches"], day2["clicks"], day2["abandonment"], day2["ctr@10"]) == (1, 0, 1.0, 0.0)
    for metric in ("mrr_clicked", "latency_p50_ms", "latency_p99_ms", "query_drift"):  # nothing to average
        assert math.isnan(day2[metric]), metric
    v4 = _row(report, model_version="4")
    assert (v4["ctr@1"], v4["mrr_clicked"], v4["latency_p99_ms"]) == (1.0, 1.0, 5.0)
    assert math.isnan(v4["query_drift"])  # no training words known for v4


def test_per_model_version_and_one_model_only(events):
    by_version = compute_report(events, VOCABULARIES, per_catalogue=False)
    assert "catalogue_version" not in by_version.columns
    assert by_version[["model_version", "date", "searches"]].values.tolist() == [
        ["3", "2025-03-01", 4], ["3", "2025-03-02", 1], ["4", "2025-03-01", 1]]
    assert compute_report(events, model_name="another").empty
    assert len(compute_report(events, model_name="alignsearch")) == 3


def test_searches_without_latency_or_model_are_reported_not_dropped(events):
    searches = events.impressions.drop(columns="took_ms")  # a log without the column
    searches.loc[:, "model_version"] = None  # imported searches without a model version
    report = compute_report(type(events)(searches, events.clicks))
    assert set(report["model_version"]) == {"-"} and report["searches"].sum() == 6
    assert report["latency_p50_ms"].isna().all()


def _dataset(root: Path) -> Path:
    root.mkdir()
    pd.DataFrame({"query_id": ["q1", "q2", "q3"], "text": ["a red car", "blue boats", "green truck"],
                  "split": ["train", "train", "test"]}).to_parquet(root / "queries.parquet")
    pd.DataFrame({"ad_id": ["x", "y"], "title": ["Sports car for sale", "Yellow taxi"], "image_path": ["i/x.png", "i/y.png"],
                  "split": ["train", "valid"]}).to_parquet(root / "ads.parquet")
    return root


def test_training_words_are_the_train_split_queries_and_titles(tmp_path):
    assert training_vocabulary(_dataset(tmp_path / "data")) == {"red", "car", "blue", "boats", "sports", "sale"}


def test_a_report_run_in_the_monitoring_experiment(events, tmp_path):
    registry = RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                              artifact_location=str(tmp_path / "artifacts"), experiment="alignsearch")
    configure_mlflow(registry)
    mlflow = client()
    # v3 is registered with the dataset it was trained on; v4 is not registered at all.
    dataset_dir = _dataset(tmp_path / "data")
    training = mlflow.create_run(mlflow.get_experiment_by_name("alignsearch").experiment_id)
    mlflow.create_registered_model("alignsearch")
    for _ in range(3):
        mlflow.create_model_version("alignsearch", source=f"runs:/{training.info.run_id}/model",
                                    run_id=training.info.run_id, tags={"dataset_dir": str(dataset_dir)})
    vocabularies = training_vocabularies(model_versions(events))
    assert vocabularies == {("alignsearch", "3"): training_vocabulary(dataset_dir), ("alignsearch", "4"): None}
    table = compute_report(events, vocabularies)
    assert _row(table, catalogue_version="v7", model_version="3")["query_drift"] == 0.5  # "boat" is not "boats"
    by_version = compute_report(events, vocabularies, per_catalogue=False)

    run = log_report(table, by_version, experiment="alignsearch-monitoring", out_dir=tmp_path / "reports",
                     beside_experiment="alignsearch", params={"days": "7"})
    found = mlflow.get_run(run.run_id)
    assert mlflow.get_experiment(found.info.experiment_id).name == "alignsearch-monitoring"
    assert found.info.status == "FINISHED"
    assert found.data.tags["model_name"] == "alignsearch" and found.data.tags["model_version"] == "3,4"
    assert found.data.params == {"days": "7"}
    history = mlflow.get_metric_history(run.run_id, "alignsearch/v3/ctr_at_10")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == [(0, 0.5), (1, 0.0)]
    assert sorted(m.timestamp for m in history) == [
        int(dt.datetime(2025, 3, d, tzinfo=dt.UTC).timestamp() * 1000) for d in (1, 2)]
    assert not mlflow.get_metric_history(run.run_id, "alignsearch/v3/mrr_clicked")[1:]  # day 2: NaN, not logged
    artifacts = {a.path for a in mlflow.list_artifacts(run.run_id)}
    assert {TABLE_FILE, PLOT_FILE} <= artifacts
    logged = pd.read_csv(Path(mlflow.download_artifacts(run.run_id, TABLE_FILE, str(tmp_path / "down"))))
    assert logged["searches"].tolist() == table["searches"].tolist()
    assert (tmp_path / "reports" / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
