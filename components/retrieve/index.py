"""The ad index: faiss over the model's ad vectors, searched by inner product.

A hit's score is the model's own score, q . a, exactly what evaluation ranks by. The vectors are
not normalised here: an ad vector that carries the word channel's evidence is not unit-norm, and
dividing it by its norm re-weights every ad (format 1 did that: on openclipart the served
ranking lost 0.041 test nDCG@10 against the evaluated model, 0.588 -> 0.547).

`kind="auto"` is exact (a flat index) up to `exact_max` ads and, past it, `pq` (compressed
candidates re-ranked exactly, components/retrieve/compressed.py) when the index knows the
second moments of real query vectors, HNSW otherwise; as measured by `alignsearch bench-index`
(components/retrieve/bench.py; see `IndexConfig`). An index is saved as faiss files, numpy
arrays and a JSON of ad ids and config (no pickle), so it can ship as an MLflow artifact.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from components.retrieve.compressed import CompressedIndex
from components.retrieve.config import IndexConfig

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
MOMENTS_FILE = "query_moments.npy"
FORMAT_VERSION = 2
_COSINE_FORMAT = 1  # held L2-normalised ad vectors (cosine ranking); still loads, with a warning

# faiss warns below ~39 training points per IVF list; fewer lists than that is still correct.
_IVF_MIN_POINTS_PER_LIST = 39


def resolve_kind(cfg: IndexConfig, num_ads: int, has_query_moments: bool = False) -> Literal["flat", "hnsw", "ivf", "pq"]:
    """The concrete index kind for `num_ads` ads ("auto" → flat up to `exact_max`, else pq when
    query moments are known, else HNSW)."""
    if cfg.kind == "auto":
        if num_ads <= cfg.exact_max:
            return "flat"
        return "pq" if has_query_moments else "hnsw"
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

    def __init__(self, index: faiss.Index | CompressedIndex, ad_ids: Sequence[str], cfg: IndexConfig, kind: str,
                 query_moments: np.ndarray | None = None):
        if index.ntotal != len(ad_ids):
            raise ValueError(f"index holds {index.ntotal} vectors but {len(ad_ids)} ad ids were given")
        self.index = index
        self.ad_ids: list[str] = [str(a) for a in ad_ids]
        self.cfg = cfg
        self.kind = kind
        # E[q q^T] of real query vectors of the model (components.retrieve.compressed.second_moments):
        # what a pq index whitens by; kept by every kind so a growing catalogue can switch to pq.
        self.query_moments = query_moments
        self._apply_search_params()

    # -- building -------------------------------------------------------------------------
    @classmethod
    def build(cls, ad_ids: Sequence[str], embeddings: np.ndarray, cfg: IndexConfig | None = None, *,
              query_moments: np.ndarray | None = None, like: AdIndex | None = None) -> AdIndex:
        """Index `embeddings` (num_ads x dim, the ad tower's vectors as they are) under `ad_ids`.

        `query_moments`: E[q q^T] of the model's query vectors (needed by `pq`). `like`: the
        index this one replaces (a catalogue change): its query moments carry over, and a pq or
        IVF index of the same kind and dimension keeps its trained projection, codebooks or
        lists (only the codes are recomputed)."""
        cfg = cfg or IndexConfig()
        if query_moments is None and like is not None:
            query_moments = like.query_moments
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
        kind = resolve_kind(cfg, num_ads, query_moments is not None)
        reuse = like is not None and like.kind == kind and like.dim == dim and like.cfg == cfg
        if kind == "pq":
            if reuse:
                index = like.index.refilled(x)
            elif query_moments is None:
                raise ValueError("a pq ad index whitens by the second moments of real query vectors: pass "
                                 "query_moments (components.retrieve.compressed.second_moments)")
            else:
                index = CompressedIndex.fit(x, query_moments, dim=cfg.pq_dim, subquantizers=cfg.pq_subquantizers,
                                            nlist=cfg.pq_nlist, rerank=cfg.pq_rerank, nprobe=cfg.pq_nprobe)
            logger.info("built a pq index over %d ads (dim %d)", num_ads, dim)
            return cls(index, ad_ids, cfg, kind, query_moments)
        if kind == "ivf" and reuse:
            index = faiss.clone_index(like.index)
            index.reset()
        elif kind == "flat":
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
        return cls(index, ad_ids, cfg, kind, query_moments)

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
        return int(self.index.vectors.shape[1] if self.kind == "pq" else self.index.d)

    def vectors(self) -> np.ndarray:
        """(N, dim) float32, the ad vectors this index holds (exact for flat, HNSW and IVF; the
        float16 re-ranking copy for pq)."""
        if self.kind == "pq":
            return np.asarray(self.index.vectors, dtype=np.float32)
        if self.kind == "ivf":
            faiss.extract_index_ivf(self.index).make_direct_map()
        return self.index.reconstruct_n(0, self.index.ntotal).astype(np.float32)

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
        if self.kind == "pq":
            dist, labels = self.index.search(q, k_eff)
        else:
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
        if self.kind == "pq":
            self.index.save(out_dir)
        else:
            faiss.write_index(self.index, str(out_dir / INDEX_FILE))
        if self.query_moments is not None:
            np.save(out_dir / MOMENTS_FILE, np.asarray(self.query_moments, np.float64))
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
        meta_path = index_dir / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not found (an ad index directory holds {META_FILE} and "
                                    f"{INDEX_FILE} or the pq files)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") == _COSINE_FORMAT:
            logger.warning("%s: an index of format 1 holds normalised ad vectors, so it ranks by cosine, not by "
                           "the model's score; re-register the model (or re-index its catalogue) to serve what "
                           "was evaluated", meta_path)
        elif meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: unsupported index format version {meta.get('format_version')!r}")
        cfg = IndexConfig(**meta["config"])
        if meta["kind"] == "pq":
            index = CompressedIndex.load(index_dir, cfg.pq_rerank, cfg.pq_nprobe)
        else:
            if not (index_dir / INDEX_FILE).is_file():
                raise FileNotFoundError(f"{index_dir / INDEX_FILE}: not found (the {meta['kind']} index of {meta_path})")
            index = faiss.read_index(str(index_dir / INDEX_FILE))
        moments = np.load(index_dir / MOMENTS_FILE) if (index_dir / MOMENTS_FILE).is_file() else None
        return cls(index, meta["ad_ids"], cfg, meta["kind"], moments)
