"""Click rules: each broken rule is its own error with its own reason, and nothing is written;
a valid click is logged at the position its search showed the ad, once."""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from traffic_helpers import T0, impression

from components.traffic.clicks import (
    CLICK_ERRORS,
    AdNotShown,
    ClickError,
    ClickTooLate,
    RepeatedClick,
    UnknownRequest,
    check_click,
    record_click,
    validate_click,
)
from components.traffic.events import EventStore
from components.traffic.writer import BatchWriter

WINDOW_S = 600.0
SOON = T0 + dt.timedelta(seconds=30)


def test_each_error_has_its_own_reason_and_a_4xx():
    reasons = [error.reason for error in CLICK_ERRORS]
    assert reasons == ["unknown_request", "ad_not_shown", "repeated_click", "click_too_late"]
    assert all(400 <= error.http_status < 500 and issubclass(error, ClickError) for error in CLICK_ERRORS)
    assert len({error.http_status for error in CLICK_ERRORS}) == len(CLICK_ERRORS)


def test_the_rules_over_values():
    shown = impression(ads=("a1", "a2", "a3"))
    click = check_click(shown, shown.event_id, "a3", already_clicked=False, now=SOON, window_s=WINDOW_S)
    assert (click.request_id, click.ad_id, click.position, click.time) == (shown.event_id, "a3", 3, SOON)
    cases = [
        (None, "a1", False, SOON, UnknownRequest),
        (shown, "b9", False, SOON, AdNotShown),
        (shown, "a1", True, SOON, RepeatedClick),
        (shown, "a1", False, T0 + dt.timedelta(seconds=WINDOW_S + 1), ClickTooLate),
    ]
    for found, ad_id, already, now, error in cases:
        with pytest.raises(error) as caught:
            check_click(found, "r1", ad_id, already_clicked=already, now=now, window_s=WINDOW_S)
        assert caught.value.ad_id == ad_id and caught.value.request_id == "r1"
    # At the window's edge the click still counts.
    assert check_click(shown, shown.event_id, "a1", already_clicked=False, now=T0 + dt.timedelta(seconds=WINDOW_S),
                       window_s=WINDOW_S).position == 1


def test_record_click_refuses_each_broken_rule_and_writes_nothing(store_uri):
    store = EventStore(store_uri)
    shown = impression(ads=("a1", "a2", "a3"))
    store.append([shown])

    click = record_click(store, shown.event_id, "a2", window_s=WINDOW_S, now=SOON)
    assert click.position == 2 and store.counts() == (1, 1)
    refused = {
        UnknownRequest: ("no-such-search", "a1", SOON),
        AdNotShown: (shown.event_id, "b9", SOON),
        RepeatedClick: (shown.event_id, "a2", SOON),
        ClickTooLate: (shown.event_id, "a3", T0 + dt.timedelta(hours=2)),
    }
    for error, (request_id, ad_id, now) in refused.items():
        with pytest.raises(error):
            record_click(store, request_id, ad_id, window_s=WINDOW_S, now=now)
    assert store.counts() == (1, 1)
    assert store.read().clicks[["ad_id", "position"]].values.tolist() == [["a2", 2]]
    store.close()


def test_validation_reads_only(tmp_path):
    store = EventStore(f"sqlite:///{tmp_path / 'traffic.db'}")
    shown = impression()
    store.append([shown])
    assert validate_click(store, shown.event_id, "a1", window_s=WINDOW_S, now=SOON).position == 1
    assert store.counts() == (1, 0)
    store.close()


def test_two_identical_clicks_at_once_log_one(store_uri):
    store = EventStore(store_uri)
    shown = impression()
    store.append([shown])
    start, outcomes = threading.Barrier(8), []

    def click() -> None:
        start.wait()
        try:
            record_click(store, shown.event_id, "a1", window_s=WINDOW_S, now=SOON)
            outcomes.append("logged")
        except RepeatedClick:
            outcomes.append("repeated")

    threads = [threading.Thread(target=click) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert sorted(outcomes) == ["logged"] + ["repeated"] * 7 and store.counts() == (1, 1)
    store.close()


def test_a_click_before_its_search_is_flushed_finds_it_through_the_writer(tmp_path):
    store = EventStore(f"sqlite:///{tmp_path / 'traffic.db'}")
    writer = BatchWriter(store, batch_size=1000, flush_ms=60_000)  # the search would wait a minute
    shown = impression(time=dt.datetime.now(dt.UTC))
    writer.put(shown)
    with pytest.raises(UnknownRequest):
        validate_click(store, shown.event_id, "a1", window_s=WINDOW_S)
    assert record_click(store, shown.event_id, "a1", window_s=WINDOW_S, writer=writer).position == 1
    assert store.counts() == (1, 1)
    writer.close()
    store.close()
