"""How the ad index is built and searched (the `retrieve` section of params.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class IndexConfig(BaseModel):
    """How the ad index is built and searched (`retrieve` section of params.yaml)."""

    model_config = ConfigDict(extra="forbid")

    # `auto` by measurement (`alignsearch bench-index`, README "The index at scale", one faiss
    # thread, quiet 2-core box): exact search stays within the 20 ms p99 target up to 100k ads
    # (p99 1.0 ms at 10k, 10.7 ms at 100k, 458 ms at 1M), so it is exact up to `exact_max`; past it
    # `pq` (query-whitened 4-bit codes, exact re-ranking; recall@10 0.976 at 1M, p99 9.0 ms, 49 B/ad
    # resident) when the index has its model's query moments (every bundle since format 2), HNSW
    # otherwise (recall@10 0.85 at 10k and 0.52 at 100k even at efSearch 512 on these vectors).
    kind: Literal["auto", "flat", "hnsw", "ivf", "pq"] = "auto"
    exact_max: int = Field(100_000, ge=0, description="auto: exact flat index up to this many ads (measured: "
                           "flat p99 10.7 ms at 100k), pq (or HNSW without query moments) past it")
    hnsw_m: int = Field(32, ge=2, description="HNSW graph degree")
    hnsw_ef_construction: int = Field(80, ge=1)
    hnsw_ef_search: int = Field(128, ge=1, description="HNSW search breadth (raised to k when k is larger)")
    ivf_nlist: int = Field(256, ge=1, description="IVF lists (capped so each list gets enough training points)")
    ivf_nprobe: int = Field(16, ge=1, description="IVF lists visited per query")
    # pq: query-whitened 4-bit product codes pick candidates, the ads' own vectors re-rank them
    # (components/retrieve/compressed.py); needs real query vectors to whiten by.
    # Defaults: the measured 1M row with the most recall margin under the targets (192 dims, 96
    # codes = 48 B/ad; 128 dims / 64 codes reached 0.956 at 33 B/ad, too close to 0.95 to rely on).
    pq_dim: int = Field(192, ge=2, description="pq: projected dimensions the codes cover")
    pq_subquantizers: int = Field(96, ge=1, description="pq: 4-bit codes per ad (pq_subquantizers / 2 bytes)")
    pq_nlist: int = Field(0, ge=0, description="pq: IVF lists in front of the codes (0: score every code)")
    pq_nprobe: int = Field(64, ge=1, description="pq: IVF lists visited per query (with pq_nlist > 0)")
    pq_rerank: int = Field(2000, ge=1, description="pq: candidates re-ranked exactly per query (measured at 1M: "
                           "recall@10 0.918 / 0.954 / 0.976 at 500 / 1000 / 2000)")
