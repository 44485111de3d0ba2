"""How the ad index behaves at catalogue scale (`alignsearch bench-index`): flat, HNSW, IVF-PQ and
pq (compressed candidates re-ranked exactly) at 10k / 100k / 1M ads: build time, bytes per ad
(resident, and on disk for pq's memory-mapped re-ranking vectors), query latency p50/p99 at
batch 1 and 32, and recall@10 against exact search.

The embeddings have the distribution of real ones:
- the base set is real: a model version's catalogue vectors (its ads through its ad tower, not
  normalised: the index ranks by the model's own inner product) and real queries through its
  query tower (training queries give pq its query moments; recall and latency are measured on
  the other splits' queries);
- past the base set, ads are drawn from a model fitted to it (`EmbeddingModel`): PCA over all
  components, a Gaussian mixture (full covariances, `components` of them) over the first
  `pca_dim`, and independent Gaussians with the fitted variances over the rest, so the drawn
  set has the real covariance, full spectrum included. The base ads are included as they are.
Flat (exact) search is the ground truth.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from components.retrieve.config import IndexConfig

log = logging.getLogger(__name__)

# (name, faiss index_factory string, search parameter sweeps). `{nlist}` scales with the size.
# `{pre}{pq}`: 8-bit PQ sub-quantizers (bytes), the largest divisor of the dimension <= 96; when
# that is small (591 = 3 x 197) a random rotation pads the vectors to a multiple of 8 first
# (`RR{d}`: orthogonal, so inner products are kept) and PQ codes 8 dimensions each.
# Not here: OPQ (its training took 445 s at 10k) and faiss' PCA front-end (it centres queries
# and ads alike, which breaks inner-product ranking: recall@10 0.05 measured; pq projects
# without centring).
ANN_CONFIGS: list[tuple[str, str, dict]] = [
    ("hnsw32", "HNSW32,Flat", {"efSearch": [64, 256, 512]}),
    ("ivfpq", "{pre}IVF{nlist},PQ{pq}", {"nprobe": [16, 64, 256]}),
]
# The product's own pq kind (`AdIndex`, components/retrieve/compressed.py): (name, IndexConfig
# fields, re-ranked candidates swept).
PQ_CONFIGS: list[tuple[str, dict, list[int]]] = [
    ("pq64x4-rerank", {"pq_dim": 128, "pq_subquantizers": 64}, [500, 1000, 2000]),
    ("pq96x4-rerank", {"pq_dim": 192, "pq_subquantizers": 96}, [500, 1000, 2000]),
]
TARGETS = {"recall@10": 0.95, "p99_ms": 20.0, "bytes_per_ad": 200.0}


@dataclass
class EmbeddingModel:
    """PCA over all components of real ad vectors; a Gaussian mixture over the leading ones and
    independent Gaussians (the fitted variances) over the rest."""

    mean: np.ndarray
    components: np.ndarray  # (p, dim) PCA axes, leading first
    tail_sd: np.ndarray  # (p - mixture_dim,) sd along the axes the mixture does not model
    gmm: object

    @property
    def mixture_dim(self) -> int:
        return self.components.shape[0] - self.tail_sd.shape[0]

    @classmethod
    def fit(cls, x: np.ndarray, pca_dim: int = 64, components: int = 16, seed: int = 0) -> EmbeddingModel:
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture

        pca = PCA(n_components=min(x.shape[0] - 1, x.shape[1]), random_state=seed).fit(x)
        z = pca.transform(x)
        pca_dim = min(pca_dim, z.shape[1])
        gmm = GaussianMixture(n_components=min(components, x.shape[0] // 20 or 1), covariance_type="full",
                              reg_covar=1e-5, random_state=seed).fit(z[:, :pca_dim])
        return cls(pca.mean_.astype(np.float32), pca.components_.astype(np.float32),
                   np.sqrt(pca.explained_variance_[pca_dim:]).astype(np.float32), gmm)

    def sample(self, n: int, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.mean.shape[0]), np.float32)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            self.gmm.random_state = int(rng.integers(2**31))
            head, _ = self.gmm.sample(m)
            tail = rng.standard_normal((m, self.tail_sd.shape[0]), dtype=np.float32) * self.tail_sd
            z = np.concatenate([head.astype(np.float32), tail], axis=1)
            out[start:start + m] = self.mean + z @ self.components
        return out


def corpus(base: np.ndarray, model: EmbeddingModel, size: int, seed: int = 0) -> np.ndarray:
    """`size` ads: the real base set, then draws from the fitted model."""
    base = np.ascontiguousarray(base, dtype=np.float32)
    if size <= len(base):
        return base[:size].copy()
    return np.concatenate([base, model.sample(size - len(base), seed=seed)])


@dataclass
class Row:
    size: int
    index: str
    factory: str
    params: str
    build_s: float
    bytes_per_ad: float
    recall_at_10: float
    p50_ms_b1: float
    p99_ms_b1: float
    p50_ms_b32: float
    p99_ms_b32: float
    meets_targets: bool = False
    notes: str = ""
    disk_bytes_per_ad: float = 0.0  # pq: the memory-mapped float16 re-ranking vectors
    change_s: float = 0.0  # pq: a catalogue change over all ads (trained state kept, codes recomputed)


def _pq_size(dim: int) -> dict[str, object]:
    """`pre` and `pq` for the 8-bit IVF-PQ factory string (see ANN_CONFIGS)."""
    divisor = max(m for m in range(1, 97) if dim % m == 0)
    if divisor >= 48:
        return {"pre": "", "pq": divisor}
    padded = -(-dim // 8) * 8
    return {"pre": f"RR{padded},", "pq": min(96, padded // 8)}


def _bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).nbytes)


def _latencies(index, queries: np.ndarray, k: int, batch: int, repeats: int) -> np.ndarray:
    times = []
    n = len(queries)
    for i in range(repeats):
        start = (i * batch) % max(1, n - batch + 1)
        q = queries[start:start + batch]
        t = time.perf_counter()
        index.search(q, k)
        times.append((time.perf_counter() - t) * 1000)
    return np.asarray(times)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = [len(set(f[f >= 0]) & set(t)) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits) / truth.shape[1])


def _set_param(index, name: str, value: int) -> None:
    import faiss

    faiss.ParameterSpace().set_index_parameter(index, name, value)


def measure_size(x: np.ndarray, queries: np.ndarray, *, k: int = 10, repeats_b1: int = 300, repeats_b32: int = 30,
                 configs=ANN_CONFIGS, pq_configs=PQ_CONFIGS, query_moments: np.ndarray | None = None,
                 skip: set[str] = frozenset(), seed: int = 0, progress=None) -> list[Row]:
    """Every index kind on corpus `x` (N x dim, the ad tower's vectors): one row per (config,
    search parameter). pq configs need `query_moments` (of queries other than `queries`)."""
    import faiss

    n, dim = x.shape
    rows: list[Row] = []
    # Exact search without an index copy (1M x 858 floats is 3.4 GB): the same kernel as IndexFlatIP.
    t = time.perf_counter()
    _, truth = faiss.knn(queries, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    flat_build = 0.0

    class _Flat:
        def search(self, q, kk):
            return faiss.knn(q, x, kk, metric=faiss.METRIC_INNER_PRODUCT)

    b1 = _latencies(_Flat(), queries, k, 1, 100 if n > 200_000 else repeats_b1)
    b32 = _latencies(_Flat(), queries, k, 32, 10 if n > 200_000 else repeats_b32)
    del t
    rows.append(Row(n, "flat", "Flat", "-", flat_build, float(dim * 4), 1.0,
                    *np.round(np.percentile(b1, [50, 99]), 3).tolist(), *np.round(np.percentile(b32, [50, 99]), 3).tolist()))
    if progress:
        progress(rows[-1])
    nlist = int(max(16, min(4096, round(4 * np.sqrt(n)))))
    train_n = min(n, max(40 * nlist, 50_000))
    rng = np.random.default_rng(seed)
    for name, factory, sweeps in configs:
        if name in skip:
            continue
        spec = factory.format(nlist=nlist, **_pq_size(dim))
        t = time.perf_counter()
        index = faiss.index_factory(dim, spec, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(x[rng.choice(n, size=train_n, replace=False)] if train_n < n else x)
        if name.startswith("hnsw"):
            faiss.downcast_index(index).hnsw.efConstruction = 80
        index.add(x)
        build = time.perf_counter() - t
        size = _bytes(index) / n
        (param, values), = sweeps.items()
        for value in values:
            _set_param(index, param, value)
            _, found = index.search(queries, k)
            b1 = _latencies(index, queries, k, 1, repeats_b1)
            b32 = _latencies(index, queries, k, 32, repeats_b32)
            row = Row(n, name, spec, f"{param}={value}", round(build, 3), round(size, 1), round(_recall(found, truth), 4),
                      *np.round(np.percentile(b1, [50, 99]), 3).tolist(),
                      *np.round(np.percentile(b32, [50, 99]), 3).tolist())
            rows.append(row)
            if progress:
                progress(row)
        del index
    if query_moments is not None:
        rows += _measure_pq(x, queries, truth, query_moments, pq_configs, skip, k, repeats_b1, repeats_b32, progress)
    for row in rows:
        row.meets_targets = (row.recall_at_10 >= TARGETS["recall@10"] and row.p99_ms_b1 < TARGETS["p99_ms"]
                             and row.bytes_per_ad < TARGETS["bytes_per_ad"])
    return rows


def _measure_pq(x, queries, truth, moments, pq_configs, skip, k, repeats_b1, repeats_b32, progress) -> list[Row]:
    """The product's pq kind, through `AdIndex` itself (saved and loaded, so the re-ranking
    vectors are read from their memory map as when serving)."""
    import tempfile

    from components.retrieve.index import AdIndex  # faiss at import, like the functions above

    rows = []
    ids = [str(i) for i in range(len(x))]
    for name, fields, reranks in pq_configs:
        if name in skip:
            continue
        cfg = IndexConfig(kind="pq", **fields)
        t = time.perf_counter()
        built = AdIndex.build(ids, x, cfg, query_moments=moments)
        build = time.perf_counter() - t
        t = time.perf_counter()
        AdIndex.build(ids, x, cfg, like=built)
        change = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as scratch:
            built.save(Path(scratch))
            resident = built.index.bytes_in_memory() / len(x)
            disk = (Path(scratch) / "vectors.f16.npy").stat().st_size / len(x)
            del built
            index = AdIndex.load(Path(scratch))
            for rerank in reranks:
                index.index.rerank = rerank
                search = _RowSearch(index)
                _, found = search.search(queries, k)
                b1 = _latencies(search, queries, k, 1, repeats_b1)
                b32 = _latencies(search, queries, k, 32, repeats_b32)
                row = Row(len(x), name, f"{cfg.pq_dim}d,PQ{cfg.pq_subquantizers}x4fs+rerank", f"rerank={rerank}",
                          round(build, 3), round(resident, 1), round(_recall(found, truth), 4),
                          *np.round(np.percentile(b1, [50, 99]), 3).tolist(),
                          *np.round(np.percentile(b32, [50, 99]), 3).tolist(), disk_bytes_per_ad=round(disk, 1),
                          change_s=round(change, 3))
                rows.append(row)
                if progress:
                    progress(row)
            del index, search
    return rows


class _RowSearch:
    """An `AdIndex` answering with row numbers, as the faiss indexes above do."""

    def __init__(self, index) -> None:
        self.index = index

    def search(self, q, k):
        scores, ids = self.index.search(q, k)
        return scores, np.array([[int(a) for a in row] + [-1] * (k - len(row)) for row in ids])


@dataclass
class BenchReport:
    rows: list[Row]
    base: dict = field(default_factory=dict)  # where the real embeddings came from
    generator: dict = field(default_factory=dict)
    threads: int = 1
    encoding: dict = field(default_factory=dict)
    choice: dict = field(default_factory=dict)


def choose(rows: list[Row]) -> dict:
    """What `retrieve.kind: auto` uses: per measured size, the cheapest config that meets the
    recall and latency targets (exact flat while its p99 is within the latency target)."""
    out = {}
    for size in sorted({r.size for r in rows}):
        at = [r for r in rows if r.size == size]
        flat = next(r for r in at if r.index == "flat")
        if flat.p99_ms_b1 < TARGETS["p99_ms"]:
            out[str(size)] = {"kind": "flat", "why": f"exact, p99 {flat.p99_ms_b1} ms < {TARGETS['p99_ms']} ms"}
            continue
        good = [r for r in at if r.recall_at_10 >= TARGETS["recall@10"] and r.p99_ms_b1 < TARGETS["p99_ms"]]
        if not good:
            best = max(at, key=lambda r: (r.recall_at_10, -r.p99_ms_b1))
            out[str(size)] = {"kind": best.index, "factory": best.factory, "params": best.params,
                              "why": "no config met recall and latency; the best recall"}
            continue
        best = min(good, key=lambda r: (r.bytes_per_ad, r.p99_ms_b1))
        out[str(size)] = {"kind": best.index, "factory": best.factory, "params": best.params,
                          "why": f"recall@10 {best.recall_at_10}, p99 {best.p99_ms_b1} ms, "
                                 f"{best.bytes_per_ad} B/ad (smallest meeting recall and latency)"}
    return out


def write_report(report: BenchReport, out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = asdict(report)
    (out_dir / "bench_index.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# Ad index at scale (`alignsearch bench-index`)", "",
             f"faiss threads: {report.threads}. Targets at 1M: recall@10 >= {TARGETS['recall@10']}, "
             f"p99 < {TARGETS['p99_ms']} ms (batch 1), < {TARGETS['bytes_per_ad']:.0f} bytes/ad.", "",
             f"Base (real): {json.dumps(report.base)}", "", f"Generator: {json.dumps(report.generator)}", "",
             "Bytes/ad: resident (faiss codes or vectors, ids, projection); pq also reads its float16 "
             "re-ranking vectors from a memory-mapped file (disk B/ad).", "",
             "Change s: pq's cost of a catalogue change over all ads (projection and codebooks kept, codes recomputed).", "",
             "| ads | index | params | build s | change s | bytes/ad | disk B/ad | recall@10 | p50 ms b1 | p99 ms b1 | p50 ms b32 | p99 ms b32 | targets |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report.rows:
        lines.append(f"| {r.size:,} | {r.index} | {r.params} | {r.build_s} | {r.change_s or '-'} | {r.bytes_per_ad} | "
                     f"{r.disk_bytes_per_ad or '-'} | {r.recall_at_10} | "
                     f"{r.p50_ms_b1} | {r.p99_ms_b1} | {r.p50_ms_b32} | {r.p99_ms_b32} | "
                     f"{'yes' if r.meets_targets else '-'} |")
    if report.encoding:
        lines += ["", "## Bulk encoding (end to end: decode, parts, words, ad tower)", "",
                  f"{json.dumps(report.encoding)}"]
    lines += ["", "## What `retrieve.kind: auto` picks", ""]
    lines += [f"- {int(size):,} ads: {c['kind']} {c.get('params', '')} ({c['why']})" for size, c in report.choice.items()]
    md = out_dir / "bench_index.md"
    md.write_text("\n".join(lines) + "\n")

    sizes = sorted({r.size for r in report.rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        for name in dict.fromkeys(r.index for r in report.rows):
            pts = [r for r in report.rows if r.size == size and r.index == name]
            if pts:
                ax.plot([r.p99_ms_b1 for r in pts], [r.recall_at_10 for r in pts], "o-",
                        label=f"{name} ({pts[0].bytes_per_ad:.0f} B/ad)")
        ax.axhline(TARGETS["recall@10"], color="grey", ls="--", lw=0.8)
        ax.axvline(TARGETS["p99_ms"], color="grey", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{size:,} ads")
        ax.set_xlabel("p99 latency, batch 1 (ms)")
        ax.set_ylabel("recall@10 vs exact")
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = out_dir / "bench_index.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return {"json": out_dir / "bench_index.json", "markdown": md, "plot": png}
