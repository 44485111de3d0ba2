"""Events for the traffic tests, built by hand."""

from __future__ import annotations

import datetime as dt

from components.traffic.events import Click, Hit, Impression, new_id

T0 = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)


def impression(query: str = "red car", ads: tuple[str, ...] = ("a1", "a2", "a3"), *, event_id: str | None = None,
               time: dt.datetime = T0, **fields) -> Impression:
    """A search for `query` that showed `ads` in that order (scores falling from 1)."""
    hits = tuple(Hit(ad_id, position, 1.0 - 0.1 * position) for position, ad_id in enumerate(ads, start=1))
    fields = {"model_name": "alignsearch", "model_version": "3", "catalogue_version": "v7", **fields}
    return Impression(event_id=event_id or new_id(), query=query, k=len(ads), hits=hits, time=time, **fields)


def click(on: Impression, ad_id: str, *, after_s: float = 5.0) -> Click:
    """A click on `ad_id` of `on`, at the position `on` showed it, `after_s` after the search."""
    position = on.hit(ad_id).position
    return Click(click_id=new_id(), request_id=on.event_id, ad_id=ad_id, position=position,
                 time=on.time + dt.timedelta(seconds=after_s))
