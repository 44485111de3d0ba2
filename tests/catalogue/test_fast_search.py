"""A one-off search loads only what a query needs: the query tower alone (torch, or its ONNX
export) gives the scorer's query vectors; after the first search of a version, `alignsearch
search` answers without importing MLflow, PyTorch Lightning, torch or transformers; `--url`
asks a running service."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import URI, LiveServer
from typer.testing import CliRunner

from components.catalogue import live
from components.registry.models import open_model
from flows.cli import app

pytestmark = pytest.mark.slow

QUERIES = ["heart", "Star  BOX", "bell and leaf", "zenko", "árbol 🎄", "?!"]

CHILD = """
import sys
from flows.cli import app
sys.argv = ["alignsearch", *sys.argv[1:]]
try:
    app()
except SystemExit as exc:
    code = exc.code
print("IMPORTED", *(name in sys.modules for name in ("mlflow", "pytorch_lightning", "great_expectations", "torch",
                                                     "transformers")))
"""


def test_the_query_tower_alone_equals_the_scorer(store):
    """The cached bundle carries the ONNX export (made when the cache was filled); it and the
    light torch tower both give the full scorer's query vectors, word channel included."""
    from components.match.data import QuerySide
    from components.match.scorers import load_scorer
    from components.search.query import QueryTower

    root, cfg = store
    ref = open_model(URI, cfg.data.cache_dir)
    onnx = QueryTower.load(ref.bundle_dir / "scorer")
    light = QueryTower.load(ref.bundle_dir / "scorer", onnx=False)
    assert (onnx.source, light.source) == ("onnx", "light")
    scorer = load_scorer(ref.bundle_dir / "scorer")
    assert scorer.net.word_channel is not None  # ours: the word channel's query side too
    full = scorer.encode_queries(QuerySide([str(i) for i in range(len(QUERIES))], QUERIES))
    np.testing.assert_allclose(light.encode(QUERIES), full, atol=1e-5)
    np.testing.assert_allclose(onnx.encode(QUERIES), full, atol=1e-5)
    assert onnx.encode([]).shape == (0, full.shape[1])


def test_second_search_imports_no_mlflow_and_url_asks_the_service(store, tmp_path):
    root, cfg = store
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True)))
    args = ["search", "heart", "-k", "3", "--model-uri", URI, "--params", str(params)]
    first = CliRunner().invoke(app, args)  # fills the local cache through MLflow
    assert first.exit_code == 0 and "catalogue v0" in first.output, first.output

    child = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=300,
                           env={**__import__("os").environ, "COLUMNS": "200"})
    assert child.returncode == 0, child.stderr[-3000:]
    assert "catalogue v0" in child.stdout and "syn:" in child.stdout, child.stdout
    assert "IMPORTED False False False False False" in child.stdout, child.stdout  # nor torch, transformers

    with LiveServer(cfg) as server:
        asked = CliRunner().invoke(app, ["search", "heart", "-k", "3", "--url", server.url, "--params", str(params)],
                                   env={"COLUMNS": "200"})
        assert asked.exit_code == 0, asked.output
        assert "model v1, catalogue v0" in asked.output and "syn:" in asked.output
    down = CliRunner().invoke(app, ["search", "heart", "--url", server.url, "--params", str(params)])
    assert down.exit_code == 1 and "Cannot reach" in down.output


def test_index_kinds_agree_with_exact_search_on_real_embeddings(store, synthetic_dataset_dir):
    """HNSW, IVF (default settings) and pq against flat, on the trained model's own ad vectors and
    query vectors (at 120 ads IVF visits every list it can have, and pq re-ranks a quarter of
    the ads; the scale is bench-index's job). pq whitens by the moments the bundle's index keeps
    (the model's training queries)."""
    import pandas as pd

    from components.retrieve.config import IndexConfig
    from components.retrieve.index import AdIndex

    root, cfg = store
    engine, _ = live.open_engine(URI, cache_dir=cfg.data.cache_dir)
    ids = engine.catalogue.ads["ad_id"].tolist()
    texts = pd.read_parquet(synthetic_dataset_dir / "queries.parquet")["text"].astype(str).unique().tolist()
    queries = engine.query_tower.encode(texts + [f"{a} {b}" for a, b in zip(texts, texts[1:], strict=False)])
    _, exact = AdIndex.build(ids, engine.catalogue.embeddings, IndexConfig(kind="flat")).search(queries, 10)
    moments = engine.catalogue.index.query_moments
    assert moments is not None and moments.shape == (queries.shape[1],) * 2
    for cfg in (IndexConfig(kind="hnsw"), IndexConfig(kind="ivf"), IndexConfig(kind="pq", pq_rerank=30)):
        kind = cfg.kind
        _, found = AdIndex.build(ids, engine.catalogue.embeddings, cfg, query_moments=moments).search(queries, 10)
        recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact, strict=True)])
        assert recall >= 0.95, (kind, recall)
