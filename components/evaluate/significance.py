"""Claims that survive noise: paired, query-level tests between two systems.

A benchmark run keeps, per (system, fraction, seed), what the test split's metrics are
made of (`RunDetail`): the ranking metrics of every query with its subset, and the score
of every labelled pair (AUC). `paired_test` compares two systems over the same seeds with
a paired bootstrap over test queries, seeds pooled: one resample of queries is applied to
every seed, the statistic is the mean over seeds of (left - right) on it. It gives the
observed delta, a 95% percentile interval and a one-sided p-value for "left > right"
(the share of resamples whose delta is <= 0, with the usual +1 correction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from components.evaluate.subsets import ALL, pair_subsets, query_subsets
from components.metrics import (
    DEFAULT_METRICS,
    ScoreMatrix,
    labelled_pairs,
    per_query_metrics,
    qrels_from_frame,
)

RANKING_DEPTH = 100


@dataclass
class RunDetail:
    """Per-query ranking metrics (index query_id; metric columns + `subset`) and the labelled
    pairs with their scores (query_id, label, subset of positives, score) of one run."""

    per_query: pd.DataFrame
    pairs: pd.DataFrame


def run_detail(dataset_split, matrix: ScoreMatrix, seed: int,
               metrics: tuple[str, ...] = DEFAULT_METRICS) -> RunDetail:
    """The query- and pair-level numbers behind `evaluate_scores` on one split."""
    qrels, queries, ads = dataset_split.qrels, dataset_split.queries, dataset_split.ads
    relevant = qrels_from_frame(qrels)
    per_query = per_query_metrics(relevant, matrix.top_k_run(RANKING_DEPTH, sorted(relevant)), metrics)
    per_query["subset"] = query_subsets(qrels, queries, ads).reindex(per_query.index).to_numpy()
    pairs = labelled_pairs(dataset_split, seed)[["query_id", "ad_id", "label"]].copy()
    pairs["score"] = matrix.pair_scores(pairs["query_id"], pairs["ad_id"])
    positive = pairs["label"].to_numpy() == 1
    pairs["subset"] = ALL
    pairs.loc[positive, "subset"] = pair_subsets(pairs[positive], queries, ads).to_numpy()
    return RunDetail(per_query=per_query, pairs=pairs.drop(columns="ad_id"))


def _ranking_deltas(left: Sequence[RunDetail], right: Sequence[RunDetail], subset: str, metric: str):
    """(S, Q) per-seed, per-query deltas over the subset's queries, and the query ids."""
    rows = []
    queries = None
    for lhs, rhs in zip(left, right, strict=True):
        lq, rq = lhs.per_query, rhs.per_query
        keep = lq.index if subset == ALL else lq.index[lq["subset"] == subset]
        keep = keep.sort_values()
        if queries is None:
            queries = keep
        elif not keep.equals(queries):
            raise ValueError("the runs compared must evaluate the same queries")
        rows.append(lq.loc[keep, metric].to_numpy(float) - rq.loc[keep, metric].to_numpy(float))
    return np.vstack(rows), queries


def _auc_arrays(details: Sequence[RunDetail], subset: str):
    out = []
    for detail in details:
        pairs = detail.pairs
        keep = (pairs["label"] == 0) | (pairs["subset"] == subset) if subset != ALL else np.ones(len(pairs), bool)
        pairs = pairs[keep]
        out.append((pairs["query_id"].astype(str).to_numpy(), pairs["label"].to_numpy(int),
                    pairs["score"].to_numpy(float)))
    return out


def paired_test(left: Sequence[RunDetail], right: Sequence[RunDetail], subset: str, metric: str, *,
                samples: int = 1000, seed: int = 0) -> dict[str, float]:
    """Paired bootstrap over test queries (seeds pooled) of left - right on `metric` over
    `subset`; `left[i]` and `right[i]` are the same seed. Returns delta (observed), low and
    high (95% interval), p (one-sided, left > right), num_queries and num_seeds."""
    from sklearn.metrics import roc_auc_score  # scikit-learn: ~0.7 s to import, only for a report

    if not left or len(left) != len(right):
        raise ValueError("paired_test needs the same number (> 0) of runs on each side")
    rng = np.random.default_rng(seed)
    if metric == "auc":
        lhs, rhs = _auc_arrays(left, subset), _auc_arrays(right, subset)
        query_ids = np.unique(np.concatenate([q for q, _, _ in lhs + rhs]))
        # Each pair's query as an integer once, so a resample is one gather per side.
        lhs = [(np.searchsorted(query_ids, q), y, s) for q, y, s in lhs]
        rhs = [(np.searchsorted(query_ids, q), y, s) for q, y, s in rhs]

        def statistic(weights: np.ndarray) -> float:
            deltas = []
            for (ql, yl, sl), (qr, yr, sr) in zip(lhs, rhs, strict=True):
                wl, wr = weights[ql], weights[qr]
                if wl.sum() == 0 or len(np.unique(yl[wl > 0])) < 2 or len(np.unique(yr[wr > 0])) < 2:
                    return float("nan")
                deltas.append(roc_auc_score(yl, sl, sample_weight=wl) - roc_auc_score(yr, sr, sample_weight=wr))
            return float(np.mean(deltas))

        num_queries = len(query_ids)
        observed = statistic(np.ones(num_queries))
        draws = []
        for _ in range(samples):
            weights = np.bincount(rng.integers(0, num_queries, num_queries), minlength=num_queries).astype(float)
            draws.append(statistic(weights))
        draws = np.asarray([d for d in draws if np.isfinite(d)])
    else:
        deltas, queries = _ranking_deltas(left, right, subset, metric)  # (S,Q)
        num_queries = deltas.shape[1]
        if num_queries == 0:
            return {"delta": float("nan"), "low": float("nan"), "high": float("nan"), "p": float("nan"),
                    "num_queries": 0, "num_seeds": len(left)}
        per_query = deltas.mean(axis=0)  # seeds pooled: mean over seeds of each query's delta
        observed = float(per_query.mean())
        picks = rng.integers(0, num_queries, (samples, num_queries))
        draws = per_query[picks].mean(axis=1)
    low, high = (np.percentile(draws, [2.5, 97.5]) if len(draws) else (float("nan"), float("nan")))
    p = (1 + int((draws <= 0).sum())) / (1 + len(draws)) if len(draws) else float("nan")
    return {"delta": observed, "low": float(low), "high": float(high), "p": float(p),
            "num_queries": int(num_queries), "num_seeds": len(left)}
