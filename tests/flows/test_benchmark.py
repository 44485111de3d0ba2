"""`alignsearch benchmark --quick` end to end on a tiny synthetic dataset, and the claim checks."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from components.evaluate.benchmark import check_claims, summarise
from flows.cli import app

pytestmark = pytest.mark.slow


def test_quick_benchmark_writes_rows_table_and_plots(synthetic_dataset_dir, tmp_path):
    out = tmp_path / "bench"
    result = CliRunner().invoke(app, [
        "benchmark", "--data", str(synthetic_dataset_dir), "--out", str(out), "--quick",
        "--ablations", "ours_random_words",
        "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "match.max_steps=6",
        "--set", "benchmark.quick_max_steps=6",
        "--set", "benchmark.gallery_size=4",
    ])
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "benchmark.json").read_text())
    rows = pd.DataFrame(payload["rows"])
    assert set(rows.columns) >= {"system", "fraction", "seed", "subset", "metric", "value"}
    expected = {"lexical", "text_zero_shot", "text_only", "implicit_fusion", "late_fusion", "ours",
                "ours_random_words"}
    assert expected <= set(rows.system)
    assert {"all", "image_only", "title_overlap"} <= set(rows.subset)
    assert {"auc", "ndcg@10", "recall@10", "mrr@10"} <= set(rows.metric)
    planted = rows[(rows.system == "ours") & (rows.metric == "alignment_precision@1")]
    assert len(planted) == 1 and 0.0 <= planted.value.iloc[0] <= 1.0
    ranking = rows[rows.metric.isin(["auc", "ndcg@10"])]
    assert ranking.value.between(0, 1).all()
    table = (out / "benchmark.md").read_text()
    assert "| ours |" in table and "## Claims" in table
    for plot in ("data_efficiency.png", "subsets_auc.png", "alignment_gallery.png"):
        with Image.open(out / plot) as image:
            assert image.width > 400 and image.height > 200
    assert not (out / "work").exists()  # trained weights are scratch


def test_claims_are_checked_against_the_summary():
    rows = []
    for system, image_only, overlap in (("ours", 0.90, 0.80), ("implicit_fusion", 0.85, 0.80),
                                        ("late_fusion", 0.88, 0.70), ("text_only", 0.60, 0.81)):
        for seed in (0, 1):
            rows += [
                {"system": system, "fraction": 1.0, "seed": seed, "subset": "image_only", "metric": "auc", "value": image_only},
                {"system": system, "fraction": 1.0, "seed": seed, "subset": "title_overlap", "metric": "auc", "value": overlap},
            ]
    checks = {c["claim"]: c for c in check_claims(summarise(rows))}
    assert checks["ours beats implicit_fusion on image-only auc by >= 0.026"]["passed"]
    assert not checks["ours beats late_fusion on image-only auc by >= 0.026"]["passed"]  # 0.02 < 0.026
    assert checks["ours beats text_only on image-only auc by >= 0.026"]["passed"]
    assert not checks["ours not worse than text_only on title-overlap auc"]["passed"]
