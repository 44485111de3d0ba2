"""Team-draft interleaving of two rankings, and how an interleaved impression's clicks say which
ranking people preferred (Radlinski, Kurup & Joachims, "How does clickthrough data reflect
retrieval quality?", CIKM 2008; Chapelle, Joachims, Radlinski & Yue, "Large-scale validation
and analysis of interleaved search evaluation", TOIS 2012).

Team draft, as the papers state it: two teams pick players in turns. Before each round a fair
coin says which team picks first, and in that round each team adds its highest-ranked result
not yet shown. Equivalently, position by position: the team with fewer picks so far picks
next, and when both have as many a coin decides. A result both rankings hold high is shown
once and credited only to the team that picked it, so a shared prefix is split between the
teams as the coins fall, never counted for both. When one ranking has nothing left that is
not shown, the other team fills the remaining positions.

Credit: a click on a result counts for the team that contributed it; the ranking whose team
got more clicks on an impression is preferred on it, equal counts (no click included) are a
tie. Pure functions, no I/O: the service interleaves with them, the traffic log credits with
them.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Literal

Team = Literal["a", "b"]
Preference = Literal["a", "b", "tie"]


def team_draft(ranking_a: Sequence[str], ranking_b: Sequence[str], k: int,
               rng: random.Random) -> tuple[list[str], list[Team]]:
    """Interleave two rankings (ad ids, best first) into at most `k` distinct ids.

    Returns (ids, contributors): `contributors[i]` is the team ("a" or "b") whose ranking put
    `ids[i]` there. Each team gets floor(k/2) or ceil(k/2) of the positions while both
    rankings have unshown ids; fewer than `k` come back only when the two rankings together
    hold fewer than `k` distinct ids. A ranking's repeated id counts once. `rng` draws the
    coins (one `rng.random()` per tied round), so the same seed gives the same interleaving.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    rankings = {"a": list(ranking_a), "b": list(ranking_b)}
    cursor = {"a": 0, "b": 0}
    picks = {"a": 0, "b": 0}
    shown: set[str] = set()
    ids: list[str] = []
    contributors: list[Team] = []

    def next_unshown(team: Team) -> str | None:
        ranking = rankings[team]
        while cursor[team] < len(ranking) and ranking[cursor[team]] in shown:
            cursor[team] += 1
        return ranking[cursor[team]] if cursor[team] < len(ranking) else None

    while len(ids) < k:
        candidates = {team: next_unshown(team) for team in ("a", "b")}
        if candidates["a"] is None and candidates["b"] is None:
            break
        if candidates["a"] is None:
            team: Team = "b"
        elif candidates["b"] is None:
            team = "a"
        elif picks["a"] != picks["b"]:
            team = "a" if picks["a"] < picks["b"] else "b"
        else:
            team = "a" if rng.random() < 0.5 else "b"
        ad_id = candidates[team]
        assert ad_id is not None
        shown.add(ad_id)
        ids.append(ad_id)
        contributors.append(team)
        picks[team] += 1
    return ids, contributors


def team_clicks(contributors: Sequence[str], clicked_positions: Iterable[int]) -> dict[str, int]:
    """Clicks per contributor of one interleaved impression: `contributors[i]` names who put
    position i + 1 there (any labels: "a"/"b" or model versions); `clicked_positions` count
    from 1, each click once. A position outside the impression is an error."""
    counts = {label: 0 for label in contributors}
    for position in clicked_positions:
        if not 1 <= position <= len(contributors):
            raise ValueError(f"clicked position {position} is not in an impression of {len(contributors)} positions")
        counts[contributors[position - 1]] += 1
    return counts


def preference(clicks_a: int, clicks_b: int) -> Preference:
    """Which ranking one impression prefers: the one whose team got more clicks; "tie" when
    both got as many (an impression without a click is a tie)."""
    if clicks_a > clicks_b:
        return "a"
    if clicks_b > clicks_a:
        return "b"
    return "tie"


def contributor_label(model_name: str, version: str | int) -> str:
    """How an interleaved impression names a model in its `contributors`: "<registered model
    name>/<version>", e.g. "alignsearch/3" (the name and version the registry gives)."""
    return f"{model_name}/{version}"
