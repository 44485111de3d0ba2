"""The rules a click must pass before it is logged, each broken rule its own error.

A click names the search it belongs to (`request_id`, the impression's event id) and the ad
opened. It counts when that search is in the log, showed that ad, had no click on it yet, and
was answered at most `click_window_s` before. The position is the one the impression showed
the ad at, never the client's word. `check_click` is the rule over values; `validate_click`
reads the log for it (and writes nothing); `record_click` validates and writes.

Each error carries a `reason` (a stable name for logs and clients) and the HTTP status the
service answers it with.
"""

from __future__ import annotations

import datetime as dt
from typing import ClassVar

from components.traffic.events import Click, EventStore, Impression, new_id, utc_now
from components.traffic.writer import BatchWriter


class ClickError(ValueError):
    """A click that is not logged; `reason` names the rule it broke."""

    reason: ClassVar[str] = "invalid_click"
    http_status: ClassVar[int] = 400

    def __init__(self, request_id: str, ad_id: str, detail: str):
        super().__init__(f"click on ad {ad_id!r} of search {request_id!r}: {detail}")
        self.request_id = request_id
        self.ad_id = ad_id
        self.detail = detail


class UnknownRequest(ClickError):
    """No search with that request id is in the log (never answered, or deleted by retention)."""

    reason = "unknown_request"
    http_status = 404


class AdNotShown(ClickError):
    """The search was answered, but not with that ad."""

    reason = "ad_not_shown"
    http_status = 422


class RepeatedClick(ClickError):
    """That ad of that search was clicked already: one click per (search, ad) counts."""

    reason = "repeated_click"
    http_status = 409


class ClickTooLate(ClickError):
    """The click came more than `click_window_s` after the search."""

    reason = "click_too_late"
    http_status = 410


CLICK_ERRORS: tuple[type[ClickError], ...] = (UnknownRequest, AdNotShown, RepeatedClick, ClickTooLate)


def check_click(impression: Impression | None, request_id: str, ad_id: str, *, already_clicked: bool,
                now: dt.datetime, window_s: float, click_id: str | None = None) -> Click:
    """The click to log, or the first rule it breaks (in this order: unknown request, ad not
    shown, repeated, too late). Pure: everything it needs is given."""
    if impression is None:
        raise UnknownRequest(request_id, ad_id, "no such search in the log")
    hit = impression.hit(ad_id)
    if hit is None:
        raise AdNotShown(request_id, ad_id, f"the search showed {len(impression.hits)} other ad(s)")
    if already_clicked:
        raise RepeatedClick(request_id, ad_id, "already clicked")
    age_s = (now - impression.time).total_seconds()
    if age_s > window_s:
        raise ClickTooLate(request_id, ad_id, f"{age_s:.0f} s after the search (the window is {window_s:g} s)")
    return Click(click_id=click_id or new_id(), request_id=request_id, ad_id=ad_id, position=hit.position,
                 time=now)


def validate_click(store: EventStore, request_id: str, ad_id: str, *, window_s: float,
                   now: dt.datetime | None = None, writer: BatchWriter | None = None) -> Click:
    """`check_click` against the log (read only). With the `writer` that logs the service's
    impressions, a search not found yet is looked up again after the writer's pending events
    are written: a fast client clicks before its search's batch is flushed."""
    impression = store.impression(request_id)
    if impression is None and writer is not None:
        writer.flush()
        impression = store.impression(request_id)
    already = impression is not None and store.clicked(request_id, ad_id)
    return check_click(impression, request_id, ad_id, already_clicked=already, now=now or utc_now(),
                       window_s=window_s)


def record_click(store: EventStore, request_id: str, ad_id: str, *, window_s: float,
                 now: dt.datetime | None = None, writer: BatchWriter | None = None) -> Click:
    """Validate the click and write it at once (clicks are few; the caller answers only when it
    is stored). Two identical clicks racing past validation: the log's unique key keeps one,
    the other gets `RepeatedClick`."""
    click = validate_click(store, request_id, ad_id, window_s=window_s, now=now, writer=writer)
    if not store.insert_click(click):
        raise RepeatedClick(request_id, ad_id, "already clicked")
    return click
