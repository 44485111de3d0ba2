"""Everything a search needs, as one directory (a "bundle"), and the engine that answers from it.

A bundle holds the alignment model (network, visual concepts, vocabulary), the trained
two-tower matcher, a faiss index over the catalogue's ads, the catalogue itself (ad id,
title, visual words) and the vision settings the alignment was trained with. It is what the
MLflow pyfunc ships, and what promotion re-evaluates on the current test split: ads it has
never seen are translated into visual words by the bundled alignment model.

    bundle/
      bundle.json         format version, system, dataset hash, vision config, counts
      align/              AlignmentModel.save
      scorer/             Scorer.save (a two-tower system)
      index/              AdIndex.save over the catalogue's ad embeddings
      catalogue.parquet   ad_id, title, words, scores (the ads the index holds, in index order)
      word_vectors.npz    query-tower vectors of the catalogue's visual words ("matched words")
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

# Imports are lazy (inside functions) where they are heavy: a one-off search imports only
# what a query needs (no Lightning, no alignment, no evaluation).
if TYPE_CHECKING:
    from components.data.format import Dataset
    from components.match.systems import TwoTowerScorer
    from components.metrics import ScoreMatrix
    from components.retrieve.config import IndexConfig
    from components.retrieve.index import AdIndex
    from components.vision.config import PartsConfig
    from components.vision.parts import PartsFeatures

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
BUNDLE_FILE = "bundle.json"
CATALOGUE_FILE = "catalogue.parquet"
WORD_VECTORS_FILE = "word_vectors.npz"
# A visual word "matched" a query when the query tower puts them this close (cosine), or
# when it shares a stem with a query token.
MATCHED_WORD_MIN_COSINE = 0.5

Words = list[tuple[str, float]]


@dataclass
class SearchHit:
    rank: int
    ad_id: str
    title: str
    score: float
    visual_words: list[str] = field(default_factory=list)
    matched_words: list[str] = field(default_factory=list)
    catalogue_version: str = "v0"


def _two_tower(scorer, where: Path) -> TwoTowerScorer:
    from components.match.systems import TwoTowerScorer

    if not isinstance(scorer, TwoTowerScorer):
        raise ValueError(f"{where}: system {scorer.system!r} cannot serve retrieval; a search bundle needs a "
                         f"two-tower system (ours, text_only, implicit_fusion, text_zero_shot)")
    return scorer


def ad_features(dataset: Dataset, vision: PartsConfig, cache_dir: Path) -> PartsFeatures:
    """Visual parts of `dataset`'s ads in ads.parquet order, through the content-addressed cache."""
    from components.vision.cache import extract_parts_cached

    paths = [dataset.image_file(p) for p in dataset.ads["image_path"].astype(str)]
    return extract_parts_cached(paths, vision, cache_dir=Path(cache_dir) / "features", progress=False)


def _query_moments(scorer, queries: pd.DataFrame) -> np.ndarray:
    """E[q q^T] of the training queries' vectors (all queries when the set has no training ones):
    what a compressed (pq) index of this model's catalogue whitens by, kept with every index."""
    from components.match.data import QuerySide
    from components.retrieve.compressed import second_moments

    chosen = queries[queries["split"] == "train"] if (queries["split"] == "train").any() else queries
    chosen = chosen.drop_duplicates("text")
    ids, texts = chosen["query_id"].astype(str).tolist(), chosen["text"].astype(str).tolist()
    return second_moments(scorer.encode_queries(QuerySide(ids, texts)))


def build_bundle(out_dir: Path, *, align_dir: Path, scorer_dir: Path, dataset_dir: Path, words: dict[str, Words],
                 vision: PartsConfig, index_cfg: IndexConfig, dataset_hash: str,
                 features: PartsFeatures | None = None, word_logits=None) -> Path:
    """Assemble a bundle from trained stage outputs; the catalogue is every ad of the dataset.

    `words`, `word_logits`: visual words and per-word logits per ad (from the align stage;
    the logits feed ours' word channel); `features`: the dataset's parts in ad order,
    needed only by systems with an image head.
    """
    from components.data.format import read_dataset
    from components.match.data import QuerySide, match_data
    from components.match.systems import load_scorer
    from components.retrieve.index import AdIndex

    started = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    shutil.copytree(align_dir, out_dir / "align")
    shutil.copytree(scorer_dir, out_dir / "scorer")
    scorer = _two_tower(load_scorer(out_dir / "scorer"), scorer_dir)
    dataset = read_dataset(dataset_dir)
    data = match_data(dataset, words=words, features=features, word_logits=word_logits)
    ads = data.ads
    index = AdIndex.build(ads.ad_ids, scorer.encode_ads(ads), index_cfg,
                          query_moments=_query_moments(scorer, dataset.queries))
    index.save(out_dir / "index")
    ad_words = ads.words or [[] for _ in ads.ad_ids]
    pd.DataFrame({"ad_id": ads.ad_ids, "title": ads.titles,
                  "words": [[w for w, _ in ws] for ws in ad_words],
                  "scores": [[float(s) for _, s in ws] for ws in ad_words]}).to_parquet(out_dir / CATALOGUE_FILE,
                                                                                       index=False)
    vocabulary = sorted({w for ws in ad_words for w, _ in ws})
    vectors = (scorer.encode_queries(QuerySide(vocabulary, vocabulary)) if vocabulary
               else np.zeros((0, index.dim), np.float32))
    np.savez(out_dir / WORD_VECTORS_FILE, words=np.array(vocabulary, dtype=str), vectors=vectors)
    meta = {"format_version": FORMAT_VERSION, "system": scorer.system, "dataset_hash": dataset_hash,
            "num_ads": len(ads), "vision": vision.model_dump(mode="json"), "index_kind": index.kind,
            "words_per_ad": scorer.words_per_ad, "built_seconds": round(time.perf_counter() - started, 2)}
    (out_dir / BUNDLE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("bundle %s: %s over %d ads (%s index)", out_dir, scorer.system, len(ads), index.kind)
    return out_dir


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

    def __init__(self, bundle_dir: Path, device: str = "auto", catalogue=None) -> None:
        self.bundle_dir = Path(bundle_dir)
        meta_path = self.bundle_dir / BUNDLE_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not found; {self.bundle_dir} is not a search bundle")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: bundle format {self.meta.get('format_version')!r}, "
                             f"expected {FORMAT_VERSION}")
        self.device = device
        self._scorer = None
        self._query_tower = None
        self._align = None
        if catalogue is None:
            from components.catalogue.store import from_bundle

            catalogue = from_bundle(self.bundle_dir, model_name="", model_version="", dataset_dir=None)
        self._view = _View(catalogue)

    @property
    def system(self) -> str:
        return self.meta["system"]

    @property
    def vision(self) -> PartsConfig:
        from components.vision.config import PartsConfig

        return PartsConfig(**self.meta["vision"])

    @property
    def scorer(self):
        """The bundled two-tower scorer (ad tower included; loaded on first use)."""
        if self._scorer is None:
            from components.match.systems import load_scorer

            self._scorer = _two_tower(load_scorer(self.bundle_dir / "scorer", device=self.device), self.bundle_dir)
        return self._scorer

    @property
    def query_tower(self):
        """The query tower alone (`components.search.query`), or the scorer's when loaded."""
        if self._query_tower is None:
            from components.search.query import QueryTower

            self._query_tower = (QueryTower.from_scorer(self._scorer) if self._scorer is not None
                                 else QueryTower.load(self.bundle_dir / "scorer", device=self.device))
        return self._query_tower

    @property
    def alignment(self):
        """The bundled alignment model (loaded on first use: only new ads need it)."""
        if self._align is None:
            from components.align.model import AlignmentModel

            self._align = AlignmentModel.load(self.bundle_dir / "align")
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
        from components.text.stems import word_stem

        matched = []
        for word in words:
            row = view.word_row.get(word)
            close = row is not None and float(view.word_vectors[row] @ query_vector) >= MATCHED_WORD_MIN_COSINE
            if close or word_stem(word) in query_stems:
                matched.append(word)
        return matched

    def search(self, queries: list[str], k: int = 10) -> list[list[SearchHit]]:
        """Top-`k` ads for each query (best first)."""
        from components.match.data import normalize_text
        from components.text.stems import word_stem

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
        from components.align.stage import translate_ads
        from components.match.data import match_data
        from components.metrics import ScoreMatrix

        part = dataset.split(split)
        features = ad_features(part, self.vision, cache_dir)
        words, word_logits = translate_ads(self.alignment, part.ads["ad_id"].astype(str).tolist(), features)
        needs_images = self.scorer.net.image_head is not None
        data = match_data(part, words=words, features=features if needs_images else None, word_logits=word_logits)
        return ScoreMatrix(data.queries.query_ids, data.ads.ad_ids, self.scorer.score(data.queries, data.ads))

    def evaluate(self, dataset_dir: Path, split: str = "test", *, cache_dir: Path, seed: int = 0) -> dict[str, float]:
        """Metrics on a split of the dataset at `dataset_dir` (flat keys as in reports/metrics.json)."""
        from components.data.format import read_dataset
        from components.evaluate.subsets import evaluate_scores, flatten_records

        dataset = read_dataset(dataset_dir)
        matrix = self.score_split(dataset, split, cache_dir)
        return flatten_records(evaluate_scores(dataset.split(split), matrix, seed))

