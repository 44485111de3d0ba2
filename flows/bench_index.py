"""`alignsearch bench-index`: the ad index at 10k / 100k / 1M ads (flat, HNSW, IVF-PQ, pq) on
embeddings with the distribution of a real model's, and bulk encoding throughput of new ads
end to end. Writes reports/bench-index/bench_index.{json,md,png}. See components/retrieve/bench.py
for how the corpus is made."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from components.catalogue.encode import encode_ads
from components.catalogue.live import open_engine
from components.config import load_params
from components.registry.tracking import configure_mlflow
from components.retrieve.bench import (
    BenchReport,
    EmbeddingModel,
    choose,
    corpus,
    measure_size,
    write_report,
)
from flows.runtime import setup_runtime

log = logging.getLogger(__name__)


def real_embeddings(model_uri: str, dataset_dir: Path, cache_dir: Path, num_queries: int = 500):
    """(ad vectors, query vectors, query moments, engine, info): the version's live catalogue,
    up to `num_queries` of the dataset's non-training queries through its query tower (recall and
    latency are measured on them), and the second moments of its training queries' vectors
    (what a pq index whitens by, as `build_bundle` computes them)."""
    engine, ref = open_engine(model_uri, cache_dir=cache_dir)
    catalogue = engine.catalogue
    if catalogue.index.query_moments is None:
        raise ValueError(f"{ref.name} v{ref.version}: its index was built before the index kept query moments "
                         "(or ranked by cosine); register a new version (alignsearch run) to measure pq")
    queries = pd.read_parquet(Path(dataset_dir) / "queries.parquet")
    texts = queries.loc[queries["split"] != "train", "text"].astype(str).drop_duplicates()
    texts = texts.sample(n=min(num_queries, len(texts)), random_state=0).tolist()
    vectors = np.ascontiguousarray(engine.query_tower.encode(texts), dtype=np.float32)
    info = {"model": f"{ref.name} v{ref.version}", "catalogue": catalogue.label, "ads": len(catalogue),
            "queries": len(texts), "dim": int(catalogue.embeddings.shape[1]), "dataset": str(dataset_dir),
            "query_moments": "training queries of the model's dataset (build_bundle)"}
    return catalogue.embeddings, vectors, catalogue.index.query_moments, engine, info


def encoding_throughput(engine, dataset_dir: Path, num_ads: int) -> dict:
    """Encode `num_ads` ads of the dataset with an empty feature cache (decode, parts, words, ad
    tower all run): ads/s, seconds per step, and what a 100k-ad catalogue would take."""
    import torch

    ads = pd.read_parquet(Path(dataset_dir) / "ads.parquet").head(num_ads)
    with tempfile.TemporaryDirectory() as scratch:
        encoded = encode_ads(engine, ads, Path(dataset_dir), cache_dir=Path(scratch), progress=True)
    rate = encoded.ads_per_second
    return {"ads": len(ads), "seconds": round(encoded.seconds, 2), "ads_per_second": round(rate, 2),
            "step_seconds": encoded.step_seconds, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch_threads": torch.get_num_threads(),
            "estimated_100k_catalogue_minutes": round(100_000 / rate / 60, 1) if rate else None}


def skipped_at(skip: set[str], size: int) -> set[str]:
    """The configs `skip` leaves out at `size`: "name" everywhere, "name@size" at that size only."""
    return {n for n in skip if "@" not in n} | {n.partition("@")[0] for n in skip if n.partition("@")[2] == str(size)}


def bench_index(model_uri: str, dataset_dir: Path, cache_dir: Path, out_dir: Path, *, sizes: list[int],
                encode_ads: int = 200, threads: int = 1, skip: set[str] = frozenset(), console=None) -> dict:
    import faiss


    faiss.omp_set_num_threads(threads)
    base, queries, moments, engine, info = real_embeddings(model_uri, dataset_dir, cache_dir)
    started = time.perf_counter()
    model = EmbeddingModel.fit(base, pca_dim=64, components=16, seed=0)
    generator = {"kind": "PCA over all components; a Gaussian mixture (full covariance) over the leading ones, "
                          "independent Gaussians with the fitted variances over the rest",
                 "mixture_dim": model.mixture_dim, "pca_components": int(model.components.shape[0]),
                 "mixture_components": int(model.gmm.n_components),
                 "fitted_on_ads": len(base), "fit_seconds": round(time.perf_counter() - started, 2)}

    def show(row) -> None:
        if console is not None:
            console.print(f"  {row.size:>9,} {row.index:<16} {row.params:<13} build {row.build_s:>8.2f} s  "
                          f"{row.bytes_per_ad:>8.1f} B/ad  recall@10 {row.recall_at_10:.4f}  "
                          f"p50/p99 b1 {row.p50_ms_b1:.2f}/{row.p99_ms_b1:.2f} ms  b32 {row.p50_ms_b32:.2f}/"
                          f"{row.p99_ms_b32:.2f} ms", markup=False)

    rows = []
    for size in sizes:
        if console is not None:
            console.print(f"[bold]{size:,} ads[/bold]")
        x = corpus(base, model, size, seed=size)
        rows += measure_size(x, queries, query_moments=moments, skip=skipped_at(skip, size), progress=show)
        del x
        write_report(BenchReport(rows, info, generator, threads, {}, choose(rows)), out_dir)  # a long run keeps what it has
    encoding = encoding_throughput(engine, dataset_dir, encode_ads) if encode_ads else {}
    report = BenchReport(rows, info, generator, threads, encoding, choose(rows))
    paths = write_report(report, out_dir)
    return {"report": report, "paths": paths}


if __name__ == "__main__":  # a local run: the default champion, small sizes
    from rich.console import Console


    setup_runtime()
    cfg = load_params(Path("params.yaml"), [])
    configure_mlflow(cfg.registry)
    bench_index(cfg.serve.model_uri, cfg.data.out_dir, cfg.data.cache_dir, Path("reports/bench-index"),
                sizes=[10_000], console=Console())
