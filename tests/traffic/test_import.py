"""`traffic import`: a team's impressions and clicks file, checked rule by rule before anything is
written (one test per rule, each failing on exactly that rule and writing nothing), read from CSV,
Parquet and JSON lines alike, and imported once however often it is given."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pytest
from traffic_helpers import impression as logged_impression

from components.traffic.config import TrafficConfig
from components.traffic.events import EventCounts, EventStore
from components.traffic.importer import format_import_report, import_events, known_ad_ids

NOW = dt.datetime(2025, 3, 2, 12, 0, tzinfo=dt.UTC)
ADS = [f"ad{i}" for i in range(1, 9)]


def _rows() -> list[dict]:
    """Two searches of three ads each and two clicks, as an ad server exports them."""
    rows = []
    for event_id, query, time, ads, session in (
            ("s1", "red car", "2025-03-01T10:00:00+02:00", ("ad1", "ad2", "ad3"), "u1"),
            ("s2", "blue boat", "2025-03-01T09:30:00Z", ("ad4", "ad5", "ad6"), "u2")):
        for position, ad_id in enumerate(ads, start=1):
            rows.append({"kind": "impression", "event_id": event_id, "time": time, "query": query,
                         "position": position, "ad_id": ad_id, "score": 2.0 ** -position, "k": 10,
                         "session_id": session, "model_version": "3"})
    rows.append({"kind": "click", "event_id": "s1", "time": "2025-03-01T08:00:05Z", "ad_id": "ad2"})
    rows.append({"kind": "click", "event_id": "s2", "time": "2025-03-01T09:31:00Z", "ad_id": "ad4",
                 "session_id": "u2"})
    return rows


def _write(rows: list[dict], path: Path) -> Path:
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        path.write_text("".join(json.dumps({k: v for k, v in row.items()}) + "\n" for row in rows))
    return path


@pytest.fixture
def ads_dir(tmp_path) -> Path:
    """A dataset's ads table (the importer reads its ad ids)."""
    root = tmp_path / "dataset"
    root.mkdir()
    pd.DataFrame({"ad_id": ADS, "title": [f"title {a}" for a in ADS], "image_path": [f"images/{a}.png" for a in ADS],
                  "split": ["train"] * len(ADS)}).to_parquet(root / "ads.parquet", index=False)
    return root


@pytest.fixture
def store(tmp_path):
    with EventStore(f"sqlite:///{tmp_path / 'traffic.db'}") as opened:
        yield opened


def _import(path: Path, store: EventStore, ads_dir: Path, **cfg):
    return import_events(path, store, TrafficConfig(**cfg), ad_ids=known_ad_ids(ads_dir), now=NOW)


def _refused(result, rule_start: str, rows: list[int], store: EventStore):
    """Exactly one rule failed, it names `rows` (1-based file rows), and nothing was written."""
    assert not result.success
    assert len(result.failures) == 1, format_import_report(result)
    failure = result.failures[0]
    assert failure.rule.startswith(rule_start), failure.rule
    assert failure.examples == [f"row {r}" for r in rows], format_import_report(result)
    assert store.counts() == EventCounts(0, 0) and result.added == EventCounts(0, 0)
    assert "REFUSED, nothing imported" in format_import_report(result)
    return failure


# --- round trips ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_each_format_round_trips_and_a_second_import_adds_nothing(suffix, tmp_path, ads_dir, store):
    path = _write(_rows(), tmp_path / f"events{suffix}")
    result = _import(path, store, ads_dir)
    assert result.success, format_import_report(result)
    assert result.added == EventCounts(impressions=2, clicks=2)

    events = store.read()
    searches = events.impressions.set_index("event_id")
    assert list(searches.index) == ["s1", "s2"]
    assert set(searches["source"]) == {"import"}
    # 10:00 at +02:00 is 08:00 UTC; a time with Z stays as it is.
    assert searches.loc["s1", "time"] == pd.Timestamp("2025-03-01T08:00:00Z")
    assert searches.loc["s2", "time"] == pd.Timestamp("2025-03-01T09:30:00Z")
    assert searches.loc["s1", "query"] == "red car" and searches.loc["s1", "k"] == 10
    assert searches.loc["s1", "model_version"] == "3" and searches.loc["s1", "model_name"] is None
    assert searches.loc["s1", "hits"] == [{"ad_id": "ad1", "position": 1, "score": 0.5},
                                          {"ad_id": "ad2", "position": 2, "score": 0.25},
                                          {"ad_id": "ad3", "position": 3, "score": 0.125}]
    clicks = events.clicks.set_index("request_id")
    assert clicks.loc["s1", "ad_id"] == "ad2" and clicks.loc["s1", "position"] == 2  # taken from the impression
    assert clicks.loc["s2", "position"] == 1

    again = _import(path, store, ads_dir)
    assert again.success and again.added == EventCounts(0, 0), format_import_report(again)
    assert store.counts() == EventCounts(2, 2)
    assert "2 searches and 2 clicks were logged already" in format_import_report(again)


def test_the_same_file_imports_once_on_either_engine(store_uri, tmp_path, ads_dir):
    path = _write(_rows(), tmp_path / "events.csv")
    with EventStore(store_uri) as store:
        assert _import(path, store, ads_dir).added == EventCounts(2, 2)
        assert _import(path, store, ads_dir).added == EventCounts(0, 0)
        assert store.counts() == EventCounts(2, 2)


def test_clicks_may_refer_to_impressions_already_in_the_log(tmp_path, ads_dir, store):
    shown = logged_impression("red car", ("ad1", "ad2", "ad3"), event_id="live-1",
                              time=dt.datetime(2025, 3, 1, 8, tzinfo=dt.UTC))
    store.append([shown])
    path = _write([{"kind": "click", "event_id": "live-1", "time": "2025-03-01T08:00:09Z", "ad_id": "ad3"}],
                  tmp_path / "clicks.csv")
    result = _import(path, store, ads_dir)
    assert result.success and result.added == EventCounts(0, 1), format_import_report(result)
    assert store.read().clicks.loc[0, "position"] == 3


def test_rows_without_optional_columns_and_times_without_a_zone_are_utc(tmp_path, ads_dir, store):
    rows = [{"kind": "impression", "event_id": 17, "time": "2025-03-01 08:00:00", "query": "cat",
             "position": 1, "ad_id": "ad1"},
            {"kind": "impression", "event_id": 17, "time": "2025-03-01 08:00:00", "query": "cat",
             "position": 2, "ad_id": "ad2"}]
    result = _import(_write(rows, tmp_path / "minimal.jsonl"), store, ads_dir)
    assert result.success, format_import_report(result)
    search = store.impression("17")
    assert search.time == dt.datetime(2025, 3, 1, 8, tzinfo=dt.UTC)
    assert search.k == 2 and [h.score for h in search.hits] == [0.0, 0.0] and search.took_ms is None


# --- one test per rule ---------------------------------------------------------------------------

def test_unknown_ad_ids(tmp_path, ads_dir, store):
    rows = _rows()
    rows[4]["ad_id"] = "ad-nobody-has"
    failure = _refused(_import(_write(rows, tmp_path / "e.csv"), store, ads_dir),
                       "ad_id must be an ad of the dataset", [5], store)
    assert failure.details == ["ad_id='ad-nobody-has'"]


def test_clicks_with_no_impression(tmp_path, ads_dir, store):
    rows = _rows()
    rows.append({"kind": "click", "event_id": "never-shown", "time": "2025-03-01T09:00:00Z", "ad_id": "ad1"})
    rows.append({"kind": "click", "event_id": "s1", "time": "2025-03-01T09:00:00Z", "ad_id": "ad5"})  # s1 showed ad1-3
    _refused(_import(_write(rows, tmp_path / "e.csv"), store, ads_dir),
             "a click must refer to an impression that showed its ad", [9, 10], store)


def test_times_in_the_future(tmp_path, ads_dir, store):
    rows = _rows()
    rows[7]["time"] = (NOW + dt.timedelta(minutes=6)).isoformat()  # skew allowed: 5 minutes
    rows[6]["time"] = (NOW + dt.timedelta(minutes=4)).isoformat()
    _refused(_import(_write(rows, tmp_path / "e.csv"), store, ads_dir, import_clock_skew_s=300),
             "time must not be in the future", [8], store)


def test_duplicate_event_ids_in_the_file(tmp_path, ads_dir, store):
    rows = _rows()
    rows.append({**rows[1], "ad_id": "ad7"})  # s1 position 2 again, another ad
    rows.append(dict(rows[6]))  # the click on s1/ad2 again
    failure = _refused(_import(_write(rows, tmp_path / "e.csv"), store, ads_dir),
                       "event ids must not repeat", [9, 10], store)
    assert failure.details[0].endswith("duplicate_of='repeats row 2'")
    assert failure.details[1].endswith("duplicate_of='repeats row 7'")


def test_duplicate_event_ids_with_other_content_in_the_log(tmp_path, ads_dir, store):
    assert _import(_write(_rows(), tmp_path / "first.csv"), store, ads_dir).success
    rows = _rows()
    for row in rows[:3]:
        row["query"] = "green car"  # s1 again, but another search
    result = _import(_write(rows, tmp_path / "second.csv"), store, ads_dir)
    assert [f.rule.split(":")[0] for f in result.failures] == ["event ids must not repeat"]
    assert result.failures[0].examples == ["row 1", "row 2", "row 3"]
    assert "logged already (import) with other content" in result.failures[0].details[0]
    assert store.counts() == EventCounts(2, 2) and result.added == EventCounts(0, 0)


def test_a_flood_of_clicks_from_one_session(tmp_path, ads_dir, store):
    rows = _rows()
    rows += [{"kind": "click", "event_id": "s1", "time": "2025-03-01T08:00:09Z", "ad_id": ad} for ad in ("ad1", "ad3")]
    # u1 clicked 3 ads, u2 one: at most 2 a session.
    failure = _refused(_import(_write(rows, tmp_path / "e.csv"), store, ads_dir, import_max_clicks=2),
                       "one session (or query, without session_id) must have at most 2 clicks", [7, 9, 10], store)
    assert failure.details[0] == "clicks_of='3 clicks in session u1'"


def test_a_flood_of_clicks_on_one_query_without_sessions(tmp_path, ads_dir, store):
    rows = [{k: v for k, v in row.items() if k != "session_id"} for row in _rows()]
    for n, query in enumerate(("Red  car", "red car")):  # the same query, typed twice more
        event_id = f"t{n}"
        rows += [{"kind": "impression", "event_id": event_id, "time": "2025-03-01T08:00:00Z", "query": query,
                  "position": 1, "ad_id": "ad1"},
                 {"kind": "click", "event_id": event_id, "time": "2025-03-01T08:00:03Z", "ad_id": "ad1"}]
    failure = _refused(_import(_write(rows, tmp_path / "e.parquet"), store, ads_dir, import_max_clicks=2),
                       "one session (or query, without session_id)", [7, 10, 12], store)
    assert failure.details[0] == "clicks_of=\"3 clicks in query 'red car'\""


# --- schema rules ---------------------------------------------------------------------------------

def test_a_required_column_missing(tmp_path, ads_dir, store):
    rows = [{k: v for k, v in row.items() if k != "ad_id"} for row in _rows()]
    result = _import(_write(rows, tmp_path / "e.csv"), store, ads_dir)
    assert [f.rule for f in result.failures] == ["required column 'ad_id' must be present"]
    assert "column missing" in format_import_report(result) and store.counts() == EventCounts(0, 0)


def test_positions_start_at_one(tmp_path, ads_dir, store):
    rows = _rows()
    rows[3]["position"] = 0
    rows[4]["position"] = "second"
    _refused(_import(_write(rows, tmp_path / "e.csv"), store, ads_dir),
             "an impression row must have a position, an integer >= 1", [4, 5], store)


def test_types_of_times_kinds_and_numbers(tmp_path, ads_dir, store):
    rows = _rows()
    rows[0]["time"] = rows[1]["time"] = rows[2]["time"] = "yesterday"
    rows[3]["kind"] = "view"
    rows[5]["score"] = "high"
    result = _import(_write(rows, tmp_path / "e.jsonl"), store, ads_dir)
    failed = {f.column: f.examples for f in result.failures}
    assert failed == {"kind": ["row 4"], "time": ["row 1", "row 2", "row 3"], "score": ["row 6"]}, \
        format_import_report(result)
    assert store.counts() == EventCounts(0, 0)


def test_rows_of_one_impression_agree(tmp_path, ads_dir, store):
    rows = _rows()
    rows[2]["query"] = "red cars"
    failure = _refused(_import(_write(rows, tmp_path / "e.csv"), store, ads_dir),
                       "rows of one impression (event_id) must agree", [3], store)
    assert "query differ from row 1" in failure.details[0]
