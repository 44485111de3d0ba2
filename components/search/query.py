"""The query tower of a bundled two-tower matcher: the fastest encoder that gives the scorer's
own query vectors.

Where the scorer directory holds an ONNX export (`components.search.onnx_query`), that runs,
without importing torch or transformers (together about 4 s of a 6-7 s one-off search);
otherwise the scorer is loaded without its image head (`load_scorer(query_only=True)`, no
training stack). A test (tests/catalogue/test_fast_search.py) asserts both give the same
vectors as the full scorer.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from components.match.data import QuerySide, normalize_text
from components.search import onnx_query

log = logging.getLogger(__name__)


class QueryTower:
    """`encode(texts) -> (Q, dim)` float32, equal to `TwoTowerScorer.encode_queries`."""

    def __init__(self, encode, dim: int, source: str) -> None:
        self._encode, self.dim, self.source = encode, dim, source

    def encode(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts)

    @classmethod
    def from_scorer(cls, scorer, source: str = "scorer") -> QueryTower:
        def encode(texts: list[str]) -> np.ndarray:
            texts = [normalize_text(t) for t in texts]
            return scorer.encode_queries(QuerySide([str(i) for i in range(len(texts))], texts))

        return cls(encode, scorer.net.dim, source)

    @classmethod
    def load(cls, scorer_dir: Path, device: str = "auto", onnx: bool = True) -> QueryTower:
        """Its ONNX export when present (and `onnx`; CPU, which is also right on a GPU machine
        for a handful of queries), else the scorer without its image head."""
        if onnx and device in ("auto", "cpu"):
            session = onnx_query.load(scorer_dir)
            if session is not None:
                return cls(session.encode, session.dim, "onnx")
        # torch-bound: imported only when there is no ONNX export, so a one-off search with
        # one never loads torch (~1.5 s here).
        from components.match.scorers import load_scorer

        return cls.from_scorer(load_scorer(scorer_dir, device=device, query_only=True), "light")
