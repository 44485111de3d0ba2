"""The search engine: answers text queries from a search bundle (`components.search.bundle`)
over a catalogue version (`components.search.catalogue`), and scores any dataset split with
the bundled model (promotion's evaluation).

Only what a query needs loads up front (the query tower, the index); the full scorer and the
alignment load on first use (encoding new ads, evaluation). Modules that import torch when
loaded (the scorer, the alignment, the vision backbone) are imported where that work starts,
so a one-off search with an ONNX query tower never loads torch.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from components.data.format import Dataset, read_dataset
from components.evaluate.subsets import evaluate_scores, flatten_records
from components.match.data import match_data, normalize_text
from components.metrics import ScoreMatrix
from components.search.bundle import ALIGN_DIR, SCORER_DIR, bundle_catalogue, read_meta, two_tower
from components.search.catalogue import Catalogue
from components.search.query import QueryTower
from components.text.stems import word_stem
from components.vision.config import PartsConfig

if TYPE_CHECKING:
    from components.retrieve.index import AdIndex
    from components.vision.parts import PartsFeatures

log = logging.getLogger(__name__)

# A visual word "matched" a query when the query tower puts them this close (cosine), or
# when it shares a stem with a query token.
MATCHED_WORD_MIN_COSINE = 0.5


@dataclass
class SearchHit:
    rank: int
    ad_id: str
    title: str
    score: float
    visual_words: list[str] = field(default_factory=list)
    matched_words: list[str] = field(default_factory=list)
    catalogue_version: str = "v0"


def ad_features(dataset: Dataset, vision: PartsConfig, cache_dir: Path) -> PartsFeatures:
    """Visual parts of `dataset`'s ads in ads.parquet order, through the content-addressed cache."""
    from components.vision.stage import dataset_features  # torch-bound (the backbone)

    return dataset_features(dataset, vision, cache_dir, progress=False)


class _View:
    """What a search reads from one catalogue version, swapped in as one object (so a search
    never mixes two versions, and a reload needs no lock)."""

    def __init__(self, catalogue) -> None:
        self.catalogue = catalogue
        self.index = catalogue.index
        ads = catalogue.ads
        self.titles = dict(zip(ads["ad_id"].astype(str), ads["title"].astype(str), strict=True))
        self.words = {str(a): list(ws) for a, ws in zip(ads["ad_id"], ads["words"], strict=True)}
        self.image_refs = dict(zip(ads["ad_id"].astype(str), ads["image_ref"].astype(str), strict=True))
        words = sorted(catalogue.word_vectors)
        self.word_row = {w: i for i, w in enumerate(words)}
        self.word_vectors = (np.stack([catalogue.word_vectors[w] for w in words]).astype(np.float32) if words
                             else np.zeros((0, self.index.dim), np.float32))
        self.label = catalogue.label


class SearchEngine:
    """Answers text queries from a bundle: faiss top-k over the catalogue, with each hit's
    visual words and the ones that matched the query.

    The catalogue is the bundle's own (version 0) unless another version is given or swapped
    in later (`use_catalogue`, `components.catalogue`). Only what a query needs is loaded up
    front (the query tower, the index); the full scorer and the alignment load on first use
    (encoding new ads, evaluation)."""

    def __init__(self, bundle_dir: Path, device: str = "auto", catalogue: Catalogue | None = None) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.meta = read_meta(self.bundle_dir)
        self.device = device
        self._scorer = None
        self._query_tower = None
        self._align = None
        self._view = _View(catalogue if catalogue is not None else bundle_catalogue(self.bundle_dir))

    @property
    def system(self) -> str:
        return self.meta["system"]

    @property
    def vision(self) -> PartsConfig:
        return PartsConfig(**self.meta["vision"])

    @property
    def scorer(self):
        """The bundled two-tower scorer (ad tower included; loaded on first use)."""
        if self._scorer is None:
            from components.match.scorers import load_scorer  # torch-bound

            self._scorer = two_tower(load_scorer(self.bundle_dir / SCORER_DIR, device=self.device), self.bundle_dir)
        return self._scorer

    @property
    def query_tower(self):
        """The query tower alone (`components.search.query`), or the scorer's when loaded."""
        if self._query_tower is None:
            self._query_tower = (QueryTower.from_scorer(self._scorer) if self._scorer is not None
                                 else QueryTower.load(self.bundle_dir / SCORER_DIR, device=self.device))
        return self._query_tower

    @property
    def alignment(self):
        """The bundled alignment model (loaded on first use: only new ads need it)."""
        if self._align is None:
            from components.align.model import AlignmentModel  # torch-bound

            self._align = AlignmentModel.load(self.bundle_dir / ALIGN_DIR)
        return self._align

    # -- the catalogue --------------------------------------------------------------------
    @property
    def catalogue(self):
        return self._view.catalogue

    @property
    def catalogue_version(self) -> str:
        return self._view.label

    @property
    def index(self) -> AdIndex:
        return self._view.index

    def use_catalogue(self, catalogue) -> None:
        """Serve `catalogue` from now on; searches already running finish on the old one."""
        view = _View(catalogue)
        if view.index.dim != self._view.index.dim:
            raise ValueError(f"catalogue {catalogue.label} has dim {view.index.dim}, this model's is "
                             f"{self._view.index.dim}: it was encoded by another model")
        self._view = view

    def image_ref(self, ad_id: str) -> str | None:
        return self._view.image_refs.get(str(ad_id))

    def __len__(self) -> int:
        return len(self._view.index)

    @staticmethod
    def _matched(view: _View, query_vector: np.ndarray, query_stems: set[str], words: list[str]) -> list[str]:
        matched = []
        for word in words:
            row = view.word_row.get(word)
            close = row is not None and float(view.word_vectors[row] @ query_vector) >= MATCHED_WORD_MIN_COSINE
            if close or word_stem(word) in query_stems:
                matched.append(word)
        return matched

    def search(self, queries: list[str], k: int = 10) -> list[list[SearchHit]]:
        """Top-`k` ads for each query (best first)."""
        view = self._view  # one version for the whole call, whatever a reload does meanwhile
        texts = [normalize_text(q) for q in queries]
        vectors = self.query_tower.encode(texts)
        scores, ids = view.index.search(vectors, k)
        results = []
        for text, vector, row_scores, row_ids in zip(texts, vectors, scores, ids, strict=True):
            stems = {word_stem(t) for t in text.lower().split()}
            results.append([SearchHit(rank=r + 1, ad_id=ad_id, title=view.titles.get(ad_id, ""),
                                      score=float(row_scores[r]), visual_words=view.words.get(ad_id, []),
                                      matched_words=self._matched(view, vector, stems, view.words.get(ad_id, [])),
                                      catalogue_version=view.label)
                            for r, ad_id in enumerate(row_ids)])
        return results

    def search_frame(self, queries: pd.DataFrame, default_k: int = 10) -> pd.DataFrame:
        """One row per (query, hit): query, rank, ad_id, title, score, visual_words, matched_words,
        catalogue_version.

        `queries` has a `query` column and optionally `k` (per row; missing → `default_k`).
        """
        if "query" not in queries.columns:
            raise ValueError(f"input needs a 'query' column; got columns {list(queries.columns)}")
        ks = queries["k"] if "k" in queries.columns else pd.Series([default_k] * len(queries), index=queries.index)
        ks = [default_k if pd.isna(k) else int(k) for k in ks]
        if any(k < 1 for k in ks):
            raise ValueError(f"k must be >= 1 in every row; got {sorted(set(k for k in ks if k < 1))}")
        texts = [str(text) for text in queries["query"]]
        # One encoding and one index search for the whole batch, at the largest k asked for.
        hits = self.search(texts, max(ks)) if texts else []
        rows = [{"query": text, **asdict(hit)} for text, k, row in zip(texts, ks, hits, strict=True) for hit in row[:k]]
        columns = ["query", "rank", "ad_id", "title", "score", "visual_words", "matched_words", "catalogue_version"]
        return pd.DataFrame(rows, columns=columns)

    # -- evaluation on any dataset (promotion) --------------------------------------------
    def score_split(self, dataset: Dataset, split: str, cache_dir: Path) -> ScoreMatrix:
        """Scores of every (query, ad) of one split of a dataset, ads translated afresh."""
        from components.align.stage import translate_ads  # torch-bound

        part = dataset.split(split)
        features = ad_features(part, self.vision, cache_dir)
        words, word_logits = translate_ads(self.alignment, part.ads["ad_id"].astype(str).tolist(), features)
        needs_images = self.scorer.net.image_head is not None
        data = match_data(part, words=words, features=features if needs_images else None, word_logits=word_logits)
        return self.scorer.score_matrix(data)

    def evaluate(self, dataset_dir: Path, split: str = "test", *, cache_dir: Path, seed: int = 0) -> dict[str, float]:
        """Metrics on a split of the dataset at `dataset_dir` (flat keys as in reports/metrics.json)."""
        dataset = read_dataset(dataset_dir)
        matrix = self.score_split(dataset, split, cache_dir)
        return flatten_records(evaluate_scores(dataset.split(split), matrix, seed))

