"""Seeded train/valid/test assignment by group, so items of one group never straddle splits."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from components.data.format import SPLITS


def assign_splits(groups: Iterable[str], fractions: Mapping[str, float], seed: int) -> dict[str, str]:
    """Map each distinct group to a split.

    Groups are shuffled with `seed` and cut by the cumulative fractions, so the split
    sizes follow `fractions` in groups (not items) and the result depends only on the
    set of groups and the seed, not on their order.
    """
    unknown = set(fractions) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split name(s) {sorted(unknown)}; expected {SPLITS}")
    total = sum(fractions.values())
    if total <= 0:
        raise ValueError("split fractions must sum to a positive number")
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    shuffled = [unique[i] for i in order]
    out: dict[str, str] = {}
    start = 0.0
    names = [s for s in SPLITS if fractions.get(s, 0) > 0]
    for i, name in enumerate(names):
        end = start + fractions[name] / total
        lo = round(start * len(shuffled))
        hi = len(shuffled) if i == len(names) - 1 else round(end * len(shuffled))
        for group in shuffled[lo:hi]:
            out[group] = name
        start = end
    return out


def training_query_subset(query_ids: Sequence[str], fraction: float, seed: int) -> list[str]:
    """The seeded share of training queries a run at `fraction` uses: the ids (in the given
    order, e.g. the queries table's) shuffled by `seed`, the first round(fraction * n) (at
    least one) kept. Nested by construction: for one seed the 25% queries are inside the
    50% ones, inside 100%. The alignment's click text and the matcher's training pairs both
    come from this one function, so at 50% both see the same queries."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    query_ids = list(query_ids)
    if not query_ids:
        return []
    order = np.random.default_rng(seed).permutation(len(query_ids))
    keep_n = max(1, int(round(fraction * len(query_ids))))
    return [query_ids[i] for i in sorted(order[:keep_n])]
