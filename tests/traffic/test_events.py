"""The event log: what goes in comes out, once, in commit order; retention, redaction, export.

Tests taking `store_uri` run on SQLite and on PostgreSQL (tests/traffic/conftest.py)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import pandas as pd
import pytest
from traffic_helpers import T0, click, impression

from components.traffic.config import Redaction
from components.traffic.events import (
    CLICK_COLUMNS,
    IMPRESSION_COLUMNS,
    REDACTIONS,
    Click,
    EventStore,
    Watermark,
    new_id,
    read_exported,
)


def test_append_reads_back_every_field(store_uri):
    store = EventStore(store_uri)
    shown = impression(contributors=("champion", "challenger", "champion"), source="page")
    clicked = click(shown, "a2")
    assert store.append([shown, clicked]) == (1, 1)

    assert store.impression(shown.event_id) == shown  # times exact to the microsecond
    assert store.impression("no-such-id") is None
    assert store.clicked(shown.event_id, "a2") and not store.clicked(shown.event_id, "a1")
    events = store.read()
    assert list(events.impressions.columns) == ["seq", *IMPRESSION_COLUMNS]
    assert list(events.clicks.columns) == ["seq", *CLICK_COLUMNS]
    row = events.impressions.iloc[0]
    assert row["time"] == pd.Timestamp(T0) and row["query"] == "red car" and row["source"] == "page"
    assert [h["ad_id"] for h in row["hits"]] == ["a1", "a2", "a3"] and row["contributors"][1] == "challenger"
    assert events.clicks.iloc[0][["request_id", "ad_id", "position"]].tolist() == [shown.event_id, "a2", 2]
    store.close()


def test_reimport_adds_nothing(store_uri):
    store = EventStore(store_uri)
    shown = impression()
    events = [shown, click(shown, "a1"), click(shown, "a3")]
    assert store.append(events) == (1, 2)
    assert store.append(events) == (0, 0)
    # The same click under another click id is still the one click on a1 of that search.
    assert store.append([dataclasses.replace(events[1], click_id=new_id())]) == (0, 0)
    assert store.counts() == (1, 2)
    store.close()


def test_watermark_reads_each_event_once_in_commit_order(store_uri):
    store = EventStore(store_uri)
    first = [impression(f"q{i}") for i in range(5)]
    store.append(first)
    seen = store.read()
    assert seen.impressions["event_id"].tolist() == [e.event_id for e in first]

    later = [impression(f"later{i}") for i in range(3)]
    store.append([*later, click(first[0], "a1")])  # a click on an impression read before
    new = store.read(seen.watermark)
    assert new.impressions["event_id"].tolist() == [e.event_id for e in later]
    assert new.clicks["request_id"].tolist() == [first[0].event_id]
    assert store.read(new.watermark).impressions.empty and new.watermark == store.read(new.watermark).watermark

    paged, mark = [], Watermark()
    while not (page := store.read(mark, limit=3)).impressions.empty:
        paged += page.impressions["event_id"].tolist()
        mark = page.watermark
    assert paged == [e.event_id for e in [*first, *later]]
    store.close()


def test_retention_deletes_old_events_with_their_clicks_and_the_watermark_goes_on(store_uri):
    store = EventStore(store_uri)
    now = T0 + dt.timedelta(days=100)
    old, recent = impression("old"), impression("recent", time=now - dt.timedelta(days=1))
    store.append([old, click(old, "a1"), recent, click(recent, "a2")])
    mark = store.read().watermark

    assert store.delete_older_than(30, now=now) == (1, 1)
    assert store.impression(old.event_id) is None and store.impression(recent.event_id) == recent
    assert store.read().clicks["request_id"].tolist() == [recent.event_id]

    assert store.delete_older_than(0.5, now=now) == (1, 1) and store.counts() == (0, 0)
    # An emptied table never hands out a number again: a reader's watermark still sees new events.
    fresh = impression("fresh", time=now)
    store.append([fresh])
    assert store.read(mark).impressions["event_id"].tolist() == [fresh.event_id]
    store.close()


def test_redaction_applies_before_the_query_is_written(tmp_path):
    written = {}
    for redaction in ("none", "drop-digits", "hash"):
        store = EventStore(f"sqlite:///{tmp_path / redaction}.db", redact=redaction)
        shown = impression("Red car  0612345678")
        store.append([shown])
        written[redaction] = store.impression(shown.event_id).query
        store.close()
    assert written["none"] == "Red car  0612345678"
    assert written["drop-digits"] == "Red car"
    # A pseudonym: 16 hex digits, the same for the query's case and spacing variants.
    assert written["hash"].startswith("sha256:") and len(written["hash"]) == len("sha256:") + 16
    assert written["hash"] == REDACTIONS["hash"]("red car 0612345678") != REDACTIONS["hash"]("red car")


def test_redaction_names_are_the_config_names_and_a_callable_works(tmp_path):
    assert set(REDACTIONS) == set(get_args(Redaction))
    store = EventStore(f"sqlite:///{tmp_path / 'traffic.db'}", redact=str.upper)
    shown = impression("red car")
    store.append([shown])
    assert store.impression(shown.event_id).query == "RED CAR"
    store.close()


def test_an_event_without_a_time_zone_is_refused(tmp_path):
    store = EventStore(f"sqlite:///{tmp_path / 'traffic.db'}")
    with pytest.raises(ValueError, match="time zone"):
        store.append([impression(time=dt.datetime(2025, 3, 1, 12, 0))])
    with pytest.raises(TypeError, match="not a traffic event"):
        store.append(["a1"])
    assert store.counts() == (0, 0)  # nothing of a refused batch was written
    store.close()


def test_export_writes_day_partitions_that_read_back_as_the_store_gives(tmp_path):
    store = EventStore(f"sqlite:///{tmp_path / 'traffic.db'}")
    day1 = [impression(f"d1-{i}", time=T0 + dt.timedelta(hours=i)) for i in range(3)]
    day2 = [impression(f"d2-{i}", time=T0 + dt.timedelta(days=1, hours=i)) for i in range(2)]
    day4 = impression("outside the range", time=T0 + dt.timedelta(days=3))
    store.append([*day1, *day2, day4, click(day1[0], "a2"), click(day2[1], "a1")])
    start, end = dt.datetime(2025, 3, 1, tzinfo=dt.UTC), dt.datetime(2025, 3, 3, tzinfo=dt.UTC)

    files = store.export_parquet(tmp_path / "export", start, end)
    relative = sorted(str(Path(f).relative_to(tmp_path / "export")) for f in files)
    name = f"part-{int(start.timestamp() * 1e6)}-{int(end.timestamp() * 1e6)}.parquet"
    assert relative == [f"clicks/date=2025-03-01/{name}", f"clicks/date=2025-03-02/{name}",
                        f"impressions/date=2025-03-01/{name}", f"impressions/date=2025-03-02/{name}"]

    exported = read_exported(tmp_path / "export")
    in_store = store.read(start=start, end=end)
    for got, want in ((exported.impressions, in_store.impressions), (exported.clicks, in_store.clicks)):
        pd.testing.assert_frame_equal(got, want.drop(columns="seq"), check_dtype=False)

    # The same range again rewrites the same files; an overlapping range adds files, not events.
    assert sorted(store.export_parquet(tmp_path / "export", start, end)) == sorted(files)
    store.export_parquet(tmp_path / "export", start - dt.timedelta(days=1), end + dt.timedelta(days=5))
    again = read_exported(tmp_path / "export")
    assert again.impressions["event_id"].tolist() == [e.event_id for e in [*day1, *day2, day4]]
    assert len(again.clicks) == 2
    store.close()


def test_a_click_object_keeps_its_position(tmp_path):
    store = EventStore(f"sqlite:///{tmp_path / 'traffic.db'}")
    shown = impression()
    store.append([shown])
    assert store.insert_click(Click(new_id(), shown.event_id, "a3", 3, T0))
    assert not store.insert_click(Click(new_id(), shown.event_id, "a3", 3, T0))
    assert store.read().clicks["position"].tolist() == [3]
    store.close()


def test_export_to_an_object_store_reads_back(tmp_path, monkeypatch):
    """The team stack's S3 (here moto_server, its stand-in) through a pyarrow URI."""
    moto_server = Path(sys.executable).parent / "moto_server"
    if not moto_server.exists():
        pytest.skip("moto_server not installed")
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_EC2_METADATA_DISABLED", "true")):
        monkeypatch.setenv(name, value)
    server = subprocess.Popen([str(moto_server), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _listening(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(
            Bucket="traffic")
        store = EventStore(f"sqlite:///{tmp_path / 'traffic.db'}")
        shown = impression()
        store.append([shown, click(shown, "a2")])
        uri = f"s3://traffic/events?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        files = store.export_parquet(uri, T0, T0 + dt.timedelta(days=1))
        assert [f.split("/date=")[0] for f in files] == ["s3://traffic/events/impressions",
                                                         "s3://traffic/events/clicks"]
        exported = read_exported(uri)
        assert exported.impressions["event_id"].tolist() == [shown.event_id]
        assert exported.clicks[["ad_id", "position"]].values.tolist() == [["a2", 2]]
        store.close()
    finally:
        server.terminate()
        server.wait(30)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
