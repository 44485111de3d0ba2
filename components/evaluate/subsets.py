"""Image-only vs title-overlap subsets, and the full evaluation of one split.

A positive (query, ad) pair is *image-only* when no query word occurs in the ad's title
(lowercase word tokens), else *title-overlap*: image-only pairs are the ones a title-only
system cannot find, so they measure what the ad image adds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd

from components.data.format import Dataset
from components.metrics import (
    DEFAULT_METRICS,
    ScoreMatrix,
    auc_over_pairs,
    labelled_pairs,
    per_query_metrics,
    qrels_from_frame,
)
from components.text.vocabulary import tokenize

logger = logging.getLogger(__name__)

IMAGE_ONLY = "image_only"
TITLE_OVERLAP = "title_overlap"
ALL = "all"
SUBSETS: tuple[str, ...] = (ALL, IMAGE_ONLY, TITLE_OVERLAP)

# score_fn(queries, ads) -> (len(queries), len(ads)) array, rows/columns in table order.
ScoreFn = Callable[[pd.DataFrame, pd.DataFrame], np.ndarray]


def _words_by_id(table: pd.DataFrame, id_column: str, text_column: str) -> dict[str, set[str]]:
    texts = table[text_column].astype(object).where(table[text_column].notna(), "")
    return {str(i): set(tokenize(t)) for i, t in zip(table[id_column], texts, strict=True)}


def pair_subsets(pairs: pd.DataFrame, queries: pd.DataFrame, ads: pd.DataFrame) -> pd.Series:
    """"image_only" or "title_overlap" for each (query_id, ad_id) row of `pairs` (same index)."""
    query_words = _words_by_id(queries, "query_id", "text")
    title_words = _words_by_id(ads, "ad_id", "title")
    labels = []
    for query_id, ad_id in zip(pairs["query_id"].astype(str), pairs["ad_id"].astype(str), strict=True):
        if query_id not in query_words:
            raise KeyError(f"query {query_id!r} is not in the queries table")
        if ad_id not in title_words:
            raise KeyError(f"ad {ad_id!r} is not in the ads table")
        labels.append(TITLE_OVERLAP if query_words[query_id] & title_words[ad_id] else IMAGE_ONLY)
    return pd.Series(labels, index=pairs.index, name="subset", dtype=object)


def query_subsets(qrels: pd.DataFrame, queries: pd.DataFrame, ads: pd.DataFrame) -> pd.Series:
    """Per query with a relevant ad (index query_id, sorted): "image_only" when all its
    relevant ads are image-only pairs, else "title_overlap"."""
    positives = qrels.loc[qrels["relevance"] > 0, ["query_id", "ad_id"]].astype(str).drop_duplicates()
    if positives.empty:
        return pd.Series([], index=pd.Index([], name="query_id", dtype=object), name="subset", dtype=object)
    overlap = pair_subsets(positives, queries, ads).eq(TITLE_OVERLAP)
    any_overlap = overlap.groupby(positives["query_id"].to_numpy(dtype=object)).any().sort_index()
    out = any_overlap.map({True: TITLE_OVERLAP, False: IMAGE_ONLY}).astype(object)
    out.index.name, out.name = "query_id", "subset"
    return out


def _score_matrix(dataset_split: Dataset, scores: ScoreMatrix | ScoreFn) -> ScoreMatrix:
    if isinstance(scores, ScoreMatrix):
        return scores
    matrix = np.asarray(scores(dataset_split.queries, dataset_split.ads))
    return ScoreMatrix(list(dataset_split.queries["query_id"]), list(dataset_split.ads["ad_id"]), matrix)


def evaluate_scores(dataset_split: Dataset, scores: ScoreMatrix | ScoreFn, seed: int, *,
                    k: int = 100, metrics: tuple[str, ...] = DEFAULT_METRICS) -> list[dict]:
    """Every metric of the benchmark on one split, as records {subset, metric, value, count}.

    `scores` is a `ScoreMatrix` over the split's queries and all its ads, or a function
    `score_fn(queries, ads) -> array (num_queries, num_ads)` called on the split's tables.
    Ranking uses the top `k` ads per query; `count` is the number of queries (ranking
    metrics) or labelled pairs (auc) behind a value. Records:
    - subset "all": the ranking `metrics` over all queries with a relevant ad, and `auc`
      over `labelled_pairs(dataset_split, seed)`;
    - "image_only" / "title_overlap": `auc` on that subset's positive pairs plus the same
      negatives, and the ranking metrics over image-only queries / the other queries.
    A subset without queries or positive pairs is left out (and logged).
    """
    splits = set(dataset_split.ads["split"].astype(str)) | set(dataset_split.queries["split"].astype(str))
    if len(splits) > 1:
        raise ValueError(f"evaluate one split at a time (got {sorted(splits)}): pass dataset.split(name)")
    matrix = _score_matrix(dataset_split, scores)
    split_ads = set(dataset_split.ads["ad_id"].astype(str))
    if set(matrix.ad_ids) != split_ads:
        raise ValueError(f"the score matrix must cover exactly the split's {len(split_ads)} ads "
                         f"(every ad is a candidate); it has {len(matrix.ad_ids)} ads, "
                         f"{len(split_ads - set(matrix.ad_ids))} of the split's missing")
    qrels, queries, ads = dataset_split.qrels, dataset_split.queries, dataset_split.ads
    records: list[dict] = []

    # Ranking metrics: one ranx pass, averaged over each query subset.
    relevant = qrels_from_frame(qrels)
    per_query = per_query_metrics(relevant, matrix.top_k_run(k, sorted(relevant)), metrics)
    by_query = query_subsets(qrels, queries, ads).reindex(per_query.index)
    for subset in SUBSETS:
        rows = per_query if subset == ALL else per_query[by_query == subset]
        if rows.empty:
            logger.warning("no %s queries: ranking metrics for that subset left out", subset)
            continue
        records += [{"subset": subset, "metric": m, "value": float(rows[m].mean()), "count": len(rows)}
                    for m in metrics]

    # AUC: positives of a subset against all the negatives.
    pairs = labelled_pairs(dataset_split, seed)
    pair_score = matrix.pair_scores(pairs["query_id"], pairs["ad_id"])
    is_positive = pairs["label"].to_numpy() == 1
    pair_subset = pd.Series(ALL, index=pairs.index, dtype=object)
    pair_subset[is_positive] = pair_subsets(pairs[is_positive], queries, ads)
    for subset in SUBSETS:
        if subset == ALL:
            keep = np.ones(len(pairs), dtype=bool)
        else:
            keep = ~is_positive | (pair_subset == subset).to_numpy()
        labels = pairs["label"].to_numpy()[keep]
        if labels.sum() == 0 or labels.sum() == len(labels):
            logger.warning("no %s positive or negative pairs: auc for that subset left out", subset)
            continue
        records.append({"subset": subset, "metric": "auc",
                        "value": auc_over_pairs(labels, pair_score[keep]), "count": int(keep.sum())})
    return records


def flatten_records(records: list[dict]) -> dict[str, float]:
    """`evaluate_scores` records as one flat dict: `metric` for the whole split and
    `subset/metric` for the subsets (the layout of reports/metrics.json and MLflow keys)."""
    return {(r["metric"] if r["subset"] == "all" else f"{r['subset']}/{r['metric']}"): round(float(r["value"]), 5)
            for r in records}
