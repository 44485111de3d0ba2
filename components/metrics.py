"""IR metrics (ranx) and pair AUC (scikit-learn) over score matrices, below both matcher
training (validation) and evaluation, which use them.

Every metric of the benchmark is defined here once and reused by Lightning validation, the
evaluate stage and the tests. Conventions (ranx's own behaviour differs on some of them):
- a query is evaluated when its qrels hold at least one relevance > 0; relevance-0 rows are
  judged negatives and never count as relevant;
- a query with relevant ads but nothing retrieved scores 0 on every metric (never dropped);
- tied scores are ranked by ad id (ranx orders ties by an unstable sort, i.e. arbitrarily).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from components.data.format import Dataset

logger = logging.getLogger(__name__)

DEFAULT_METRICS: tuple[str, ...] = ("ndcg@10", "recall@10", "mrr@10")

Qrels = Mapping[str, Mapping[str, int]]  # query_id -> {ad_id: relevance}
Run = Mapping[str, Mapping[str, float]]  # query_id -> {ad_id: score}

# Above this many (query, ad) cells negatives are drawn by rejection instead of enumeration.
_ENUMERATE_MAX_CELLS = 2_000_000


# -- ranking metrics ------------------------------------------------------------------------

def qrels_from_frame(qrels: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{query_id: {ad_id: relevance}} of the positive rows (relevance > 0) of a qrels table."""
    positives = qrels[qrels["relevance"] > 0]
    out: dict[str, dict[str, int]] = {}
    for query_id, ad_id, relevance in zip(positives["query_id"], positives["ad_id"], positives["relevance"],
                                          strict=True):
        out.setdefault(str(query_id), {})[str(ad_id)] = int(relevance)
    return out


def _ranked(docs: Mapping[str, float]) -> dict[str, float]:
    """The same ranking with strictly decreasing scores: ties broken by ad id, so ranx's
    unstable sort cannot reorder them."""
    items = [(str(d), float(s)) for d, s in docs.items()]
    if any(math.isnan(s) for _, s in items):
        raise ValueError("run scores contain NaN")
    items.sort(key=lambda ds: (-ds[1], ds[0]))
    return {d: float(len(items) - rank) for rank, (d, _) in enumerate(items)}


def per_query_metrics(qrels: Qrels, run: Run, metrics: Sequence[str] = DEFAULT_METRICS) -> pd.DataFrame:
    """One row per evaluated query (index `query_id`, sorted), one column per metric.

    Evaluated queries are those of `qrels` with a relevance > 0; queries only in `run` are
    ignored, queries missing from `run` (or with an empty result list) score 0.
    """
    from numba.core.errors import NumbaWarning  # ranx runs on numba
    from ranx import evaluate  # imported here: ranx + numba take seconds to import

    metrics = list(dict.fromkeys(metrics))
    positives = {str(q): {str(d): int(r) for d, r in docs.items() if r > 0} for q, docs in qrels.items()}
    query_ids = sorted(q for q, docs in positives.items() if docs)
    values = pd.DataFrame(0.0, index=pd.Index(query_ids, name="query_id", dtype=object), columns=metrics)
    ranked = {q: _ranked(run.get(q, {})) for q in query_ids}
    retrieved = [q for q in query_ids if ranked[q]]
    if not retrieved:  # ranx cannot take empty result lists; every metric is 0 for them
        return values
    # ranx pairs plain dicts by insertion order (not by key): build both in the same order.
    # ranx 0.3 with one metric and return_mean=False looks the result up under the metric
    # name without its "@k" (KeyError): asking for the metric twice returns the usual dict.
    asked = metrics * 2 if len(metrics) == 1 else metrics
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NumbaWarning)
        scores = evaluate({q: positives[q] for q in retrieved}, {q: ranked[q] for q in retrieved},
                          asked, return_mean=False)
    for metric in metrics:
        values.loc[retrieved, metric] = np.asarray(scores[metric], dtype=float)
    return values


def ranking_metrics(qrels: Qrels, run: Run, metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Each metric averaged over the evaluated queries (see `per_query_metrics`); NaN when
    no query has a relevant ad."""
    per_query = per_query_metrics(qrels, run, metrics)
    if per_query.empty:
        logger.warning("no query with a relevant ad: ranking metrics are undefined (NaN)")
        return {m: float("nan") for m in metrics}
    return {m: float(per_query[m].mean()) for m in metrics}


@dataclass
class ScoreMatrix:
    """Dense relevance scores of every (query, ad) of a split: `scores[i, j]` scores
    `query_ids[i]` against `ad_ids[j]`; shape (num_queries, num_ads)."""

    query_ids: list[str]
    ad_ids: list[str]
    scores: np.ndarray

    def __post_init__(self) -> None:
        self.query_ids = [str(q) for q in self.query_ids]
        self.ad_ids = [str(a) for a in self.ad_ids]
        self.scores = np.asarray(self.scores, dtype=np.float64)
        expected = (len(self.query_ids), len(self.ad_ids))
        if self.scores.shape != expected:
            raise ValueError(f"scores have shape {self.scores.shape}, expected (num_queries, num_ads) = {expected}")
        for name, ids in (("query_ids", self.query_ids), ("ad_ids", self.ad_ids)):
            if len(set(ids)) != len(ids):
                raise ValueError(f"{name} must be unique")
        if np.isnan(self.scores).any():
            raise ValueError("scores contain NaN")

    def top_k_run(self, k: int = 100, query_ids: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """The run of the best `k` ads per query (all queries, or `query_ids`)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        row_of = {q: i for i, q in enumerate(self.query_ids)}
        wanted = list(self.query_ids) if query_ids is None else [str(q) for q in query_ids]
        missing = [q for q in wanted if q not in row_of]
        if missing:
            raise KeyError(f"no scores for {len(missing)} queries, e.g. {missing[:5]}")
        if not wanted or not self.ad_ids:
            return {q: {} for q in wanted}
        scores = self.scores[[row_of[q] for q in wanted]]  # (Q, A)
        k_eff = min(k, scores.shape[1])
        top = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]  # (Q, k) unordered
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.lexsort((top, -top_scores), axis=1)  # best first, ties by column
        top = np.take_along_axis(top, order, axis=1)
        top_scores = np.take_along_axis(top_scores, order, axis=1)
        return {q: {self.ad_ids[j]: float(s) for j, s in zip(cols, vals, strict=True)}
                for q, cols, vals in zip(wanted, top, top_scores, strict=True)}

    def pair_scores(self, query_ids: Sequence[str], ad_ids: Sequence[str]) -> np.ndarray:
        """Scores of the pairs (query_ids[i], ad_ids[i])."""
        row_of = {q: i for i, q in enumerate(self.query_ids)}
        col_of = {a: j for j, a in enumerate(self.ad_ids)}
        try:
            rows = np.array([row_of[str(q)] for q in query_ids], dtype=np.int64)
            cols = np.array([col_of[str(a)] for a in ad_ids], dtype=np.int64)
        except KeyError as exc:
            raise KeyError(f"pair id {exc} is not in the score matrix") from None
        return self.scores[rows, cols]


# -- AUC ------------------------------------------------------------------------------------

def auc_over_pairs(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """ROC-AUC of `scores` for binary `labels` (1 = relevant); ties count one half."""
    from scipy.stats import rankdata  # scipy and scikit-learn: about 0.9 s to import
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be 1-d of equal length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    if len(np.unique(y)) < 2:
        raise ValueError(f"AUC needs positive and negative pairs; got {int(y.sum())} positives of {len(y)}")
    if np.isinf(s).any():  # AUC depends only on the order: ranks keep it and are finite
        s = rankdata(s)
    return float(roc_auc_score(y, s))


# -- labelled pairs -------------------------------------------------------------------------

def labelled_pairs(dataset_split: Dataset, seed: int) -> pd.DataFrame:
    """Columns query_id, ad_id, label: every positive pair (relevance > 0), then negatives.

    Per split: when its qrels hold explicit negatives (relevance 0) those are the negatives;
    otherwise as many random (query, ad) pairs of that split as it has positives, never a
    positive pair, without repetition, fixed by `seed`.
    """
    rng = np.random.default_rng(seed)
    qrels, queries, ads = dataset_split.qrels, dataset_split.queries, dataset_split.ads
    frames: list[pd.DataFrame] = []
    for split in sorted(qrels["split"].astype(str).unique()):
        split_qrels = qrels[qrels["split"] == split]
        positives = _pairs(split_qrels[split_qrels["relevance"] > 0])
        explicit = _pairs(split_qrels[split_qrels["relevance"] == 0])
        explicit = explicit[~_pair_keys(explicit).isin(_pair_keys(positives))]
        if len(explicit):
            negatives = explicit
        else:
            negatives = _sample_negatives(
                positives,
                query_ids=np.sort(queries.loc[queries["split"] == split, "query_id"].astype(str).unique()),
                ad_ids=np.sort(ads.loc[ads["split"] == split, "ad_id"].astype(str).unique()),
                rng=rng,
            )
            if len(negatives) < len(positives):
                logger.warning("split %s: only %d negative pairs exist for %d positives",
                               split, len(negatives), len(positives))
        frames += [positives.assign(label=1), negatives.assign(label=0)]
    if not frames:
        return pd.DataFrame({"query_id": pd.Series(dtype=object), "ad_id": pd.Series(dtype=object),
                             "label": pd.Series(dtype=np.int64)})
    out = pd.concat(frames, ignore_index=True)
    out["label"] = out["label"].astype(np.int64)
    return out


def _pairs(table: pd.DataFrame) -> pd.DataFrame:
    pairs = pd.DataFrame({"query_id": table["query_id"].astype(str).to_numpy(dtype=object),
                          "ad_id": table["ad_id"].astype(str).to_numpy(dtype=object)})
    return pairs.drop_duplicates().sort_values(["query_id", "ad_id"]).reset_index(drop=True)


def _pair_keys(pairs: pd.DataFrame) -> pd.Series:
    return pairs["query_id"] + "\x1f" + pairs["ad_id"]


def _sample_negatives(positives: pd.DataFrame, query_ids: np.ndarray, ad_ids: np.ndarray,
                      rng: np.random.Generator) -> pd.DataFrame:
    """len(positives) distinct random (query, ad) pairs that are not positive (fewer if the
    split has fewer). A pair is coded as query_index * num_ads + ad_index."""
    num_ads = len(ad_ids)
    total = len(query_ids) * num_ads
    q_pos = pd.Index(query_ids).get_indexer(positives["query_id"])
    a_pos = pd.Index(ad_ids).get_indexer(positives["ad_id"])
    known = (q_pos >= 0) & (a_pos >= 0)  # positives outside the split's tables cannot be drawn
    positive_codes = np.unique(q_pos[known].astype(np.int64) * num_ads + a_pos[known])
    wanted = min(len(positives), total - len(positive_codes))
    if wanted <= 0:
        codes = np.empty(0, dtype=np.int64)
    elif total <= _ENUMERATE_MAX_CELLS or wanted * 2 >= total - len(positive_codes):
        candidates = np.setdiff1d(np.arange(total, dtype=np.int64), positive_codes, assume_unique=True)
        codes = rng.choice(candidates, size=wanted, replace=False)
    else:  # a large, sparse space: draw, drop positives and repeats (first draw kept), repeat
        codes = np.empty(0, dtype=np.int64)
        while len(codes) < wanted:
            draw = rng.integers(0, total, size=2 * (wanted - len(codes)) + 16)
            codes = np.concatenate([codes, draw[~np.isin(draw, positive_codes)]])
            _, first = np.unique(codes, return_index=True)
            codes = codes[np.sort(first)]
        codes = codes[:wanted]
    codes = np.sort(codes)
    return pd.DataFrame({"query_id": query_ids[codes // num_ads].astype(object) if num_ads else [],
                         "ad_id": ad_ids[codes % num_ads].astype(object) if num_ads else []})
