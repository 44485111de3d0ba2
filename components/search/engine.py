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

from components.align.config import AlignConfig
from components.data.format import Dataset, read_dataset
from components.evaluate.subsets import evaluate_scores, flatten_records
from components.match.data import match_data, normalize_text
from components.metrics import ScoreMatrix
from components.search.bundle import ALIGN_DIR, SCORER_DIR, bundle_catalogue, read_meta, two_tower
from components.search.catalogue import IMAGE_HASH, WORD_BOXES, Catalogue, file_ref_hashes
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
# How many of an ad's words a person is shown when its catalogue does not say (format 1):
# the alignment's default (params.yaml align.words_shown).
DEFAULT_WORDS_SHOWN = AlignConfig.model_fields["words_shown"].default


@dataclass
class SearchHit:
    """One result. `visual_words`: every word the matcher read; `words_shown`: the first ones a
    person judges, `word_boxes[j]` the image region ([x0, y0, x1, y1] in 0..1, [] = none) that
    `words_shown[j]` came from; `duplicates`: the other ads whose image is byte-identical to
    this one's (same `image_hash`), collapsed into this, the best-scoring of them."""

    rank: int
    ad_id: str
    title: str
    score: float
    visual_words: list[str] = field(default_factory=list)
    matched_words: list[str] = field(default_factory=list)
    catalogue_version: str = "v0"
    words_shown: list[str] = field(default_factory=list)
    word_boxes: list[list[float]] = field(default_factory=list)
    image_hash: str | None = None
    duplicates: list[str] = field(default_factory=list)

    @property
    def word_regions(self) -> dict[str, list[float]]:
        """word -> [x0, y0, x1, y1] for the shown words that have a region."""
        return {w: box for w, box in zip(self.words_shown, self.word_boxes, strict=False) if box}


FRAME_COLUMNS = ["query", "rank", "ad_id", "title", "score", "visual_words", "matched_words", "catalogue_version",
                 "words_shown", "word_boxes", "image_hash", "duplicates"]


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
        self.words_shown = catalogue.words_shown or DEFAULT_WORDS_SHOWN
        self.boxes = dict(zip(ads["ad_id"].astype(str), ads[WORD_BOXES], strict=True))
        # A version built before hashes were stored (format 1) has its dataset images hashed
        # here, once per loaded version (~0.1 s for 3,000 files), never per request.
        hashes = ads[IMAGE_HASH] if ads[IMAGE_HASH].all() else file_ref_hashes(ads)
        self.hashes = {a: h for a, h in zip(ads["ad_id"].astype(str), hashes, strict=True) if h}
        groups: dict[str, list[str]] = {}
        for ad_id, digest in self.hashes.items():
            groups.setdefault(digest, []).append(ad_id)
        self.same_image = {digest: sorted(ids) for digest, ids in groups.items() if len(ids) > 1}
        self.num_collapsible = sum(len(ids) - 1 for ids in self.same_image.values())
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

    @staticmethod
    def _distinct(view: _View, row_scores: np.ndarray, row_ids: list[str], k: int) -> list[tuple[str, float]]:
        """The first `k` candidates whose images differ: of ads with one image hash, the first
        (best-scoring) stands for all."""
        seen: set[str] = set()
        kept = []
        for ad_id, score in zip(row_ids, row_scores, strict=False):
            digest = view.hashes.get(ad_id)
            if digest in view.same_image:
                if digest in seen:
                    continue
                seen.add(digest)
            kept.append((ad_id, float(score)))
            if len(kept) == k:
                break
        return kept

    def _hit(self, view: _View, rank: int, ad_id: str, score: float, vector: np.ndarray,
             stems: set[str]) -> SearchHit:
        words = view.words.get(ad_id, [])
        shown = words[:view.words_shown]
        boxes = view.boxes.get(ad_id) or []
        digest = view.hashes.get(ad_id)
        return SearchHit(rank=rank, ad_id=ad_id, title=view.titles.get(ad_id, ""), score=score, visual_words=words,
                         matched_words=self._matched(view, vector, stems, words), catalogue_version=view.label,
                         words_shown=shown, word_boxes=[list(b) for b in boxes[:len(shown)]],
                         image_hash=digest,
                         duplicates=[a for a in view.same_image.get(digest, []) if a != ad_id])

    def search(self, queries: list[str], k: int = 10) -> list[list[SearchHit]]:
        """Top-`k` ads for each query (best first), ads with byte-identical images collapsed into
        the best-scoring one (its `duplicates` name the others).

        The index is asked for extra candidates (up to k more when the catalogue holds that many
        collapsible ads); a query still short of `k` distinct images is asked again for k plus
        every collapsible ad, which is always enough."""
        view = self._view  # one version for the whole call, whatever a reload does meanwhile
        texts = [normalize_text(q) for q in queries]
        vectors = self.query_tower.encode(texts)
        enough = min(len(view.index), k + view.num_collapsible)
        scores, ids = view.index.search(vectors, min(enough, k + min(view.num_collapsible, k)))
        results = []
        for text, vector, row_scores, row_ids in zip(texts, vectors, scores, ids, strict=True):
            kept = self._distinct(view, row_scores, row_ids, k)
            if len(kept) < k and len(row_ids) < enough:
                more_scores, more_ids = view.index.search(vector[None, :], enough)
                kept = self._distinct(view, more_scores[0], more_ids[0], k)
            stems = {word_stem(t) for t in text.lower().split()}
            results.append([self._hit(view, r + 1, ad_id, score, vector, stems) for r, (ad_id, score) in enumerate(kept)])
        return results

    def search_frame(self, queries: pd.DataFrame, default_k: int = 10) -> pd.DataFrame:
        """One row per (query, hit): FRAME_COLUMNS (`SearchHit`'s fields; `word_boxes` aligned
        with `words_shown`, a list rather than a word -> box map so MLflow can state its type).

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
        return pd.DataFrame(rows, columns=FRAME_COLUMNS)

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

