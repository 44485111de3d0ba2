"""`alignsearch traffic import|report|ingest|simulate|prune|export` through the real CLI, on the synthetic
dataset and a throwaway log and MLflow store."""

from __future__ import annotations

import datetime as dt

import pandas as pd
import pytest
from traffic_helpers import click, impression
from typer.testing import CliRunner

from components.traffic.events import EventCounts, EventStore, read_exported, utc_now
from flows.cli import app

runner = CliRunner()


@pytest.fixture
def env(tmp_path, synthetic_dataset_dir) -> dict:
    """The --set overrides pointing every store at tmp_path, the dataset's train ads and queries."""
    ads = pd.read_parquet(synthetic_dataset_dir / "ads.parquet")
    queries = pd.read_parquet(synthetic_dataset_dir / "queries.parquet")
    store_uri = f"sqlite:///{tmp_path / 'traffic.db'}"
    overrides = [f"traffic.store_uri={store_uri}", f"traffic.dataset_dir={tmp_path / 'live'}",
                 f"registry.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 f"registry.artifact_location={tmp_path / 'artifacts'}", f"paths.reports_dir={tmp_path / 'reports'}",
                 f"data.path={synthetic_dataset_dir}"]
    return {"set": [a for o in overrides for a in ("--set", o)], "store_uri": store_uri,
            "ads": ads.loc[ads["split"] == "train", "ad_id"].tolist(),
            "queries": queries.loc[queries["split"] == "train", "text"].tolist()}


def _invoke(*args: str, env: dict):
    return runner.invoke(app, ["traffic", *args, *env["set"]])


def test_import_a_file_refuse_a_bad_one_and_add_nothing_twice(tmp_path, env):
    a1, a2, a3 = env["ads"][:3]
    rows = [{"kind": "impression", "event_id": "e1", "time": "2025-03-01T08:00:00Z", "query": env["queries"][0],
             "position": p, "ad_id": ad} for p, ad in enumerate((a1, a2, a3), start=1)]
    rows.append({"kind": "click", "event_id": "e1", "time": "2025-03-01T08:00:04Z", "ad_id": a2})
    good = tmp_path / "events.jsonl"
    pd.DataFrame(rows).to_json(good, orient="records", lines=True)
    result = _invoke("import", str(good), env=env)
    assert result.exit_code == 0, result.output
    assert "added 1 searches and 1 clicks" in result.output

    bad = tmp_path / "bad.csv"
    pd.DataFrame([*rows, {**rows[0], "event_id": "e2", "ad_id": "no-such-ad"}]).to_csv(bad, index=False)
    result = _invoke("import", str(bad), env=env)
    assert result.exit_code == 1
    assert "REFUSED, nothing imported" in result.output and "row 5 (ad_id='no-such-ad')" in result.output
    assert "ad_id must be an ad of the dataset" in result.output

    as_csv = tmp_path / "events.txt"  # the format from --format, not the extension
    pd.DataFrame(rows).to_csv(as_csv, index=False)
    result = _invoke("import", str(as_csv), "--format", "csv", env=env)
    assert result.exit_code == 0 and "1 searches and 1 clicks were logged already" in result.output, result.output
    with EventStore(env["store_uri"]) as store:
        assert store.counts() == EventCounts(1, 1)

    result = _invoke("import", str(as_csv), env=env)
    assert result.exit_code == 1 and "--format csv|parquet|jsonl" in result.output


def test_report_prints_the_table_and_logs_a_run(tmp_path, env):
    from mlflow import MlflowClient

    result = _invoke("report", env=env)
    assert result.exit_code == 0 and "no searches logged; nothing reported" in result.output

    now = utc_now()
    searches = [impression(q, tuple(env["ads"][:10]), time=now - dt.timedelta(hours=2), model_version="1",
                           took_ms=12.0) for q in env["queries"][:4]]
    with EventStore(env["store_uri"]) as store:
        store.append([*searches, click(searches[0], env["ads"][0]), click(searches[1], env["ads"][4])])
    result = _invoke("report", "--days", "1", "--out", str(tmp_path / "out"), env=env)
    assert result.exit_code == 0, result.output
    assert "No query drift for alignsearch v1" in result.output  # no such registered version
    table = pd.read_csv(tmp_path / "out" / "traffic_report.csv")
    assert table[["searches", "clicks", "ctr@1", "ctr@10", "abandonment"]].values.tolist() == [[4, 2, 0.25, 0.5, 0.5]]
    assert (tmp_path / "out" / "traffic_report.png").is_file()

    mlflow = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = mlflow.get_experiment_by_name("alignsearch-monitoring")
    [run] = mlflow.search_runs([experiment.experiment_id])
    assert run.data.tags["model_version"] == "1" and run.data.params["days"] == "1"
    assert run.data.metrics["alignsearch/v1/ctr_at_10"] == 0.5
    assert run.info.run_id in result.output.replace("\n", "")


def test_ingest_writes_a_version_then_nothing_new(tmp_path, env):
    shown = [impression(q, tuple(env["ads"][:5]), time=utc_now() - dt.timedelta(minutes=30), event_id=f"e{i}")
             for i, q in enumerate(env["queries"][:3])]
    with EventStore(env["store_uri"]) as store:
        store.append([*shown, click(shown[0], env["ads"][2]), click(shown[2], env["ads"][0])])
    result = _invoke("ingest", env=env)
    assert result.exit_code == 0, result.output
    assert "new version" in result.output
    assert (tmp_path / "live" / "ads.parquet").is_file()
    again = _invoke("ingest", env=env)
    assert again.exit_code == 0 and "nothing new, unchanged" in again.output, again.output


def test_prune_and_export(tmp_path, env):
    now = utc_now()
    old = impression("old", tuple(env["ads"][:2]), time=now - dt.timedelta(days=40))
    recent = impression("recent", tuple(env["ads"][:2]), time=now - dt.timedelta(days=2))
    with EventStore(env["store_uri"]) as store:
        store.append([old, recent, click(old, env["ads"][0]), click(recent, env["ads"][1])])

    start = (now - dt.timedelta(days=50)).date().isoformat()
    result = _invoke("export", str(tmp_path / "export"), "--start", start, env=env)
    assert result.exit_code == 0, result.output
    exported = read_exported(tmp_path / "export")
    assert sorted(exported.impressions["query"]) == ["old", "recent"] and len(exported.clicks) == 2
    assert _invoke("export", str(tmp_path / "x"), "--start", "yesterday", env=env).exit_code == 2

    result = _invoke("prune", "--days", "30", env=env)
    assert result.exit_code == 0, result.output
    assert "Deleted 1 searches and 1 clicks older than 30 days; the log holds 1 searches and 1 clicks" in result.output
    with EventStore(env["store_uri"]) as store:
        assert store.read().impressions["query"].tolist() == ["recent"]
    result = _invoke("prune", env=env)  # traffic.retention_days: 90
    assert result.exit_code == 0 and "Deleted 0 searches" in result.output


def test_simulate_names_a_bad_setting_and_a_service_it_cannot_reach(env):
    bad = _invoke("simulate", "--url", "http://127.0.0.1:9", "--split", "tomorrow", env=env)
    assert bad.exit_code == 2 and "split" in bad.output
    # Port 9 (discard) has no service: every search fails, the command says so and exits 1.
    down = _invoke("simulate", "--url", "http://127.0.0.1:9", "--searches", "3", env=env)
    assert down.exit_code == 1 and "0 searches answered" in down.output and "ConnectError" in down.output
