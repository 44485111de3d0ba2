"""Evaluation: ranking metrics and AUC (metrics.py), image-only / title-overlap subsets and the
full evaluation of one split (subsets.py), and the plots a person reads (plots.py)."""

from components.evaluate.metrics import (
    DEFAULT_METRICS,
    ScoreMatrix,
    auc_over_pairs,
    labelled_pairs,
    per_query_metrics,
    qrels_from_frame,
    ranking_metrics,
)
from components.evaluate.subsets import (
    evaluate_scores,
    image_only_queries,
    pair_subsets,
    query_subsets,
)

__all__ = [
    "DEFAULT_METRICS",
    "ScoreMatrix",
    "auc_over_pairs",
    "evaluate_scores",
    "image_only_queries",
    "labelled_pairs",
    "pair_subsets",
    "per_query_metrics",
    "qrels_from_frame",
    "query_subsets",
    "ranking_metrics",
]
