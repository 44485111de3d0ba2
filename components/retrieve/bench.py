"""How the ad index behaves at catalogue scale (`alignsearch bench-index`): flat, HNSW and IVF-PQ at
10k / 100k / 1M ads: build time, bytes per ad, query latency p50/p99 at batch 1 and 32, and
recall@10 against exact search.

The embeddings have the distribution of real ones:
- the base set is real: a model version's catalogue embeddings (its ads through its ad tower)
  and real queries through its query tower;
- past the base set, ads are drawn from a model fitted to it (`EmbeddingModel`): PCA to
  `pca_dim` components, a Gaussian mixture (full covariances, `components` of them) in that
  space, and per-dimension Gaussian noise with the variance PCA left out; each draw is
  L2-normalised like a real ad embedding. The base ads are included as they are.
Recall is measured on real queries against that corpus; flat search is the ground truth.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# (name, faiss index_factory string, search parameter sweeps). `{nlist}` scales with the size.
# `{pq}`: PQ sub-quantizers, the largest divisor of the dimension <= 96 (8-bit codes: bytes).
# Not here: OPQ (its training took 445 s at 10k) and PCA front-ends (PCA centres the vectors,
# which breaks inner-product ranking: recall@10 0.05 measured).
ANN_CONFIGS: list[tuple[str, str, dict]] = [
    ("hnsw32", "HNSW32,Flat", {"efSearch": [64, 256, 512]}),
    ("ivfpq", "IVF{nlist},PQ{pq}", {"nprobe": [16, 64, 256]}),
]
TARGETS = {"recall@10": 0.95, "p99_ms": 20.0, "bytes_per_ad": 200.0}


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


@dataclass
class EmbeddingModel:
    """PCA + Gaussian mixture + residual noise fitted to real ad embeddings."""

    mean: np.ndarray
    components: np.ndarray  # (p, dim) PCA axes
    residual_sd: np.ndarray  # (dim,) per-dimension sd PCA does not explain
    gmm: object

    @classmethod
    def fit(cls, x: np.ndarray, pca_dim: int = 64, components: int = 16, seed: int = 0) -> EmbeddingModel:
        from sklearn.decomposition import PCA
        from sklearn.mixture import GaussianMixture

        pca_dim = min(pca_dim, x.shape[0] - 1, x.shape[1])
        pca = PCA(n_components=pca_dim, random_state=seed).fit(x)
        z = pca.transform(x)
        residual = x - pca.inverse_transform(z)
        gmm = GaussianMixture(n_components=min(components, x.shape[0] // 20 or 1), covariance_type="full",
                              reg_covar=1e-5, random_state=seed).fit(z)
        return cls(pca.mean_.astype(np.float32), pca.components_.astype(np.float32),
                   residual.std(axis=0).astype(np.float32), gmm)

    def sample(self, n: int, seed: int = 0, chunk: int = 100_000) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.mean.shape[0]), np.float32)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            self.gmm.random_state = int(rng.integers(2**31))
            z, _ = self.gmm.sample(m)
            x = self.mean + z.astype(np.float32) @ self.components
            x += rng.standard_normal(x.shape, dtype=np.float32) * self.residual_sd
            out[start:start + m] = _normalised(x)
        return out


def corpus(base: np.ndarray, model: EmbeddingModel, size: int, seed: int = 0) -> np.ndarray:
    """`size` ads: the real base set, then draws from the fitted model."""
    base = _normalised(base)
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
                 configs=ANN_CONFIGS, skip: set[str] = frozenset(), seed: int = 0, progress=None) -> list[Row]:
    """Every index kind on corpus `x` (normalised, N x dim): one row per (config, search parameter)."""
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
        pq = max(m for m in range(1, 97) if dim % m == 0)
        spec = factory.format(nlist=nlist, pq=pq)
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
    for row in rows:
        row.meets_targets = (row.recall_at_10 >= TARGETS["recall@10"] and row.p99_ms_b1 < TARGETS["p99_ms"]
                             and row.bytes_per_ad < TARGETS["bytes_per_ad"])
    return rows


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
             "| ads | index | params | build s | bytes/ad | recall@10 | p50 ms b1 | p99 ms b1 | p50 ms b32 | p99 ms b32 | targets |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report.rows:
        lines.append(f"| {r.size:,} | {r.index} | {r.params} | {r.build_s} | {r.bytes_per_ad} | {r.recall_at_10} | "
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


def load_choice(path: Path) -> dict:
    return json.loads(Path(path).read_text()).get("choice", {}) if Path(path).is_file() else {}
