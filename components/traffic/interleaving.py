"""Clicks on interleaved searches credited per model (docs/traffic.md#interleaving): the rows
`alignsearch traffic compare` turns into an online verdict.

The service answers a share of searches with a team-draft interleaving of the champion's and
the challenger's rankings (`components.search.interleave`) and logs, per position, the model
that contributed the hit (the impression's `contributors`). Here each such impression's clicks
are counted per model and the impression's preference follows: the model with more clicks,
or a tie (equal counts, no click included).
"""

from __future__ import annotations

import pandas as pd

from components.search.interleave import preference, team_clicks
from components.traffic.events import Events

PREFERENCE_COLUMNS = ("event_id", "time", "challenger_clicks", "champion_clicks", "preference")


def impression_preferences(events: Events, challenger: str, champion: str) -> pd.DataFrame:
    """One row per impression interleaving `challenger` with `champion`, in time order:
    event_id, time (UTC), challenger_clicks, champion_clicks, preference ("challenger",
    "champion" or "tie").

    `challenger` and `champion` are contributor labels as the service stores them in an
    impression's `contributors`: "<registered model name>/<version>", e.g. "alignsearch/3"
    (`components.search.interleave.contributor_label`). An impression counts when its
    contributors name both labels and no other model: searches that were not interleaved
    (contributors empty), interleavings of another pair, and the rare interleaved impression
    with one contributor only (k = 1, or one ranking empty), which cannot say which pair it
    came from, are left out. A click counts for the model that contributed the position it
    clicked (the click's position is the impression's, checked when it was logged).
    """
    if challenger == champion:
        raise ValueError(f"challenger and champion are the same model ({challenger!r}): nothing to compare")
    pair = {challenger, champion}
    impressions = events.impressions
    rows = []
    if len(impressions):
        interleaved = impressions[impressions["contributors"].map(
            lambda c: c is not None and not _is_nan(c) and set(c) == pair)]
        clicks = events.clicks
        positions = (clicks.groupby(clicks["request_id"].astype(str))["position"].agg(list)
                     if len(clicks) else pd.Series(dtype=object))
        for event_id, time, contributors in zip(interleaved["event_id"].astype(str), interleaved["time"],
                                                interleaved["contributors"], strict=True):
            clicked = positions.get(event_id, [])
            try:
                counts = team_clicks(list(contributors), (int(p) for p in clicked))
            except ValueError as error:
                raise ValueError(f"impression {event_id}: {error}") from None
            side = preference(counts[challenger], counts[champion])
            rows.append({"event_id": event_id, "time": time, "challenger_clicks": counts[challenger],
                         "champion_clicks": counts[champion],
                         "preference": {"a": "challenger", "b": "champion", "tie": "tie"}[side]})
    frame = pd.DataFrame(rows, columns=list(PREFERENCE_COLUMNS))
    frame = frame.astype({"event_id": str, "challenger_clicks": "int64", "champion_clicks": "int64",
                          "preference": str})
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    return frame.sort_values(["time", "event_id"], kind="stable").reset_index(drop=True)


def _is_nan(value: object) -> bool:
    # A Parquet export or a frame built by hand may hold NaN where the log holds null.
    return isinstance(value, float) and value != value
