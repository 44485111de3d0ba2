"""Simulated users: people who search a dataset split's queries over HTTP and click the way
the position-based model says, so the traffic loop can be tested and benchmarked without
real people.

A simulated person examines position k with a known propensity (`SimulatorConfig.propensity`:
1/k^eta, or a given list) and clicks an examined ad with probability `click_relevant` when the
qrels mark it relevant to the query (relevance > 0), `click_nonrelevant` otherwise: the click
model of `clickmodel.py` with known parameters, which is what lets a test check that the
fitted model recovers them. `simulate_clicks` is that person (pure: the draws come from the
generator given); `run_users` sends them to a running service:

    POST /search {"query": ..., "k": ...}  -> {"request_id": ..., "results": [{"ad_id", "rank"}, ...]}
                                              (or the request id in the X-Request-ID header)
    POST /click {"request_id": ..., "ad_id": ...}  -> 2xx when the click is logged
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Collection, Mapping, Sequence

import httpx
import numpy as np
import pandas as pd

from components.search.service import REQUEST_ID_HEADER
from components.traffic.config import SimulatorConfig

log = logging.getLogger(__name__)


def simulate_clicks(ranked_ad_ids: Sequence[str], relevant_ids: Collection[str], rng: np.random.Generator,
                    cfg: SimulatorConfig = SimulatorConfig()) -> list[int]:
    """The 1-based positions one simulated person clicks in a ranked list, top first. Draws
    2 * len(ranked_ad_ids) numbers from `rng` (examined?, attracted? per position)."""
    num = len(ranked_ad_ids)
    examine_p = np.array([cfg.propensity(k) for k in range(1, num + 1)])  # [num]
    click_p = np.array([cfg.click_relevant if ad_id in relevant_ids else cfg.click_nonrelevant
                        for ad_id in ranked_ad_ids])  # [num]
    draws = rng.random((2, num))
    return [int(k) + 1 for k in np.flatnonzero((draws[0] < examine_p) & (draws[1] < click_p))]


@dataclasses.dataclass
class UsersResult:
    """What `run_users` did: searches answered, clicks sent and logged, and the errors by kind
    (`search:<status>`, `click:<status>`, or the transport error's class name)."""

    searches: int = 0
    clicks_sent: int = 0
    clicks_acknowledged: int = 0
    errors: Counter = dataclasses.field(default_factory=Counter)
    # (request_id, ad_id, position) of every acknowledged click, in the order sent.
    acknowledged: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)
    request_ids: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_errors(self) -> int:
        return sum(self.errors.values())


def relevant_by_query(qrels: pd.DataFrame) -> dict[str, set[str]]:
    """query id -> the ad ids the qrels mark relevant (relevance > 0)."""
    positives = qrels[qrels["relevance"] > 0]
    out: dict[str, set[str]] = {}
    for query_id, ad_id in zip(positives["query_id"].astype(str), positives["ad_id"].astype(str), strict=True):
        out.setdefault(query_id, set()).add(ad_id)
    return out


def run_users(base_url: str, queries: pd.DataFrame, qrels: pd.DataFrame, cfg: SimulatorConfig, *,
              headers: Mapping[str, str] | None = None, client: httpx.Client | None = None) -> UsersResult:
    """Issue `cfg.num_searches` searches of `cfg.split`'s queries (drawn with replacement, by
    `cfg.seed`) against the service at `base_url`, and send each simulated click. `headers`
    go with every request (an API key); `client` replaces the HTTP client (tests)."""
    pool = queries[queries["split"] == cfg.split].reset_index(drop=True)
    if pool.empty:
        raise ValueError(f"no queries in split {cfg.split!r} to simulate users with")
    relevant = relevant_by_query(qrels)
    rng = np.random.default_rng(cfg.seed)
    picks = rng.integers(0, len(pool), size=cfg.num_searches)
    result = UsersResult()
    own_client = client is None
    http = client or httpx.Client(base_url=base_url, timeout=cfg.timeout_s)
    try:
        for row in picks:
            query_id, text = str(pool.at[row, "query_id"]), str(pool.at[row, "text"])
            answer = _post(http, "/search", {"query": text, "k": cfg.k}, headers, result, "search")
            if answer is None:
                continue
            body = answer.json()
            request_id = body.get("request_id") or answer.headers.get(REQUEST_ID_HEADER)
            ranked = [str(hit["ad_id"]) for hit in sorted(body["results"], key=lambda hit: hit["rank"])]
            result.searches += 1
            result.request_ids.append(request_id)
            for position in simulate_clicks(ranked, relevant.get(query_id, set()), rng, cfg):
                ad_id = ranked[position - 1]
                result.clicks_sent += 1
                if _post(http, "/click", {"request_id": request_id, "ad_id": ad_id}, headers, result,
                         "click") is not None:
                    result.clicks_acknowledged += 1
                    result.acknowledged.append((request_id, ad_id, position))
    finally:
        if own_client:
            http.close()
    if result.num_errors:
        log.warning("simulated users: %d search(es), %d error(s): %s", result.searches, result.num_errors,
                    dict(result.errors))
    return result


def _post(http: httpx.Client, path: str, payload: dict, headers: Mapping[str, str] | None, result: UsersResult,
          kind: str) -> httpx.Response | None:
    """The response when it is 2xx; None (the error counted) otherwise."""
    try:
        response = http.post(path, json=payload, headers=dict(headers or {}))
    except httpx.HTTPError as exc:
        result.errors[type(exc).__name__] += 1
        return None
    if not response.is_success:
        result.errors[f"{kind}:{response.status_code}"] += 1
        return None
    return response
