"""The ad index: faiss over the model's ad vectors, searched by inner product.

A hit's score is the model's own score, q . a, exactly what evaluation ranks by. The vectors are
not normalised here: an ad vector that carries the word channel's evidence is not unit-norm, and
dividing it by its norm re-weights every ad (format 1 did that: on openclipart the served
ranking lost 0.041 test nDCG@10 against the evaluated model, 0.588 -> 0.547).

`kind="auto"` is exact (a flat index) up to `exact_max` ads and HNSW past it, as measured by
`alignsearch bench-index` (components/retrieve/bench.py; see `IndexConfig`); IVF is there
for corpora where HNSW's memory is a concern. An index is saved as the faiss file plus a
JSON of ad ids and config (no pickle), so it can ship as an MLflow artifact.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from components.retrieve.config import IndexConfig

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
FORMAT_VERSION = 2
_COSINE_FORMAT = 1  # held L2-normalised ad vectors (cosine ranking); still loads, with a warning

# faiss warns below ~39 training points per IVF list; fewer lists than that is still correct.
_IVF_MIN_POINTS_PER_LIST = 39


def resolve_kind(cfg: IndexConfig, num_ads: int) -> Literal["flat", "hnsw", "ivf"]:
    """The concrete index kind for `num_ads` ads ("auto" → flat up to `exact_max`, else HNSW)."""
    if cfg.kind == "auto":
        return "flat" if num_ads <= cfg.exact_max else "hnsw"
    return cfg.kind


def _as_matrix(embeddings: np.ndarray, what: str) -> np.ndarray:
    """A C-contiguous float32 array of finite values (rows x dim), as faiss takes it."""
    x = np.asarray(embeddings, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-d array (rows x dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    return np.ascontiguousarray(x)


class AdIndex:
    """Ad ids and a faiss index over their vectors (row i of the index = ad_ids[i])."""

    def __init__(self, index: faiss.Index, ad_ids: Sequence[str], cfg: IndexConfig, kind: str):
        if index.ntotal != len(ad_ids):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(ad_ids)} ad ids were given")
        self.index = index
        self.ad_ids: list[str] = [str(a) for a in ad_ids]
        self.cfg = cfg
        self.kind = kind
        self._apply_search_params()

    # -- building -------------------------------------------------------------------------
    @classmethod
    def build(cls, ad_ids: Sequence[str], embeddings: np.ndarray, cfg: IndexConfig | None = None) -> AdIndex:
        """Index `embeddings` (num_ads x dim, the ad tower's vectors as they are) under `ad_ids`."""
        cfg = cfg or IndexConfig()
        ad_ids = [str(a) for a in ad_ids]
        x = _as_matrix(embeddings, "ad embeddings")
        if len(ad_ids) == 0 or x.shape[0] == 0:
            raise ValueError("cannot build an ad index over 0 ads: the split or dataset has no ads "
                             "(check the dataset's ads.parquet and its split column)")
        if x.shape[0] != len(ad_ids):
            raise ValueError(f"{len(ad_ids)} ad ids but {x.shape[0]} embedding rows")
        if len(set(ad_ids)) != len(ad_ids):
            seen: set[str] = set()
            dupes = sorted({a for a in ad_ids if a in seen or seen.add(a)})
            raise ValueError(f"ad ids must be unique; duplicated: {dupes[:5]}")
        num_ads, dim = x.shape
        kind = resolve_kind(cfg, num_ads)
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = cfg.hnsw_ef_construction
        else:
            nlist = max(1, min(cfg.ivf_nlist, num_ads // _IVF_MIN_POINTS_PER_LIST))
            if nlist < cfg.ivf_nlist:
                logger.info("ivf: %d ads support %d lists (asked for %d)", num_ads, nlist, cfg.ivf_nlist)
            quantizer = faiss.IndexFlatIP(dim)
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(x)
        index.add(x)
        logger.info("built a %s index over %d ads (dim %d)", kind, num_ads, dim)
        return cls(index, ad_ids, cfg, kind)

    def _apply_search_params(self) -> None:
        if self.kind == "hnsw":
            faiss.downcast_index(self.index).hnsw.efSearch = self.cfg.hnsw_ef_search
        elif self.kind == "ivf":
            faiss.extract_index_ivf(self.index).nprobe = self.cfg.ivf_nprobe

    def _search_params(self, k: int) -> faiss.SearchParameters | None:
        # Per-call parameters leave the index untouched, so concurrent searches are safe.
        if self.kind == "hnsw":  # HNSW returns at most efSearch results: widen it for a large k
            return faiss.SearchParametersHNSW(efSearch=max(self.cfg.hnsw_ef_search, k))
        if self.kind == "ivf":
            return faiss.SearchParametersIVF(nprobe=self.cfg.ivf_nprobe)
        return None

    # -- searching ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ad_ids)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def search(self, query_embeddings: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-`k` ads per query by the inner product of query and ad vectors (the model's score).

        Returns `scores` (num_queries x k, float32, best first) and, per query, the ad ids of
        the hits. When fewer than `k` ads can be returned (k > number of ads), the score row is
        padded with -inf and the id list is simply shorter.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.asarray(query_embeddings)
        if q.ndim == 1:
            q = q[None, :]
        q = _as_matrix(q, "query embeddings")
        if q.shape[1] != self.dim:
            raise ValueError(f"query embeddings have dim {q.shape[1]}, the index has dim {self.dim}")
        scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        ids: list[list[str]] = [[] for _ in range(q.shape[0])]
        if q.shape[0] == 0:
            return scores, ids
        k_eff = min(k, len(self))
        dist, labels = self.index.search(q, k_eff, params=self._search_params(k_eff))  # (Q, k_eff) each
        found = labels >= 0  # faiss marks missing results with -1
        scores[:, :k_eff] = np.where(found, dist, -np.inf)
        for row, (row_labels, row_found) in enumerate(zip(labels, found, strict=True)):
            ids[row] = [self.ad_ids[j] for j in row_labels[row_found]]
        return scores, ids

    # -- persistence ----------------------------------------------------------------------
    def save(self, out_dir: Path) -> Path:
        """Write `index.faiss` and `index.json` (ad ids, config, kind) into `out_dir`."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(out_dir / INDEX_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "dim": self.dim,
            "num_ads": len(self),
            "config": self.cfg.model_dump(),
            "ad_ids": self.ad_ids,
        }
        (out_dir / META_FILE).write_text(json.dumps(meta))
        return out_dir

    @classmethod
    def load(cls, index_dir: Path) -> AdIndex:
        index_dir = Path(index_dir)
        index_path, meta_path = index_dir / INDEX_FILE, index_dir / META_FILE
        for path in (index_path, meta_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: not found (an ad index directory holds {INDEX_FILE} and {META_FILE})")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") == _COSINE_FORMAT:
            logger.warning("%s: an index of format 1 holds normalised ad vectors, so it ranks by cosine, not by "
                           "the model's score; re-register the model (or re-index its catalogue) to serve what "
                           "was evaluated", meta_path)
        elif meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: unsupported index format version {meta.get('format_version')!r}")
        index = faiss.read_index(str(index_path))
        return cls(index, meta["ad_ids"], IndexConfig(**meta["config"]), meta["kind"])
