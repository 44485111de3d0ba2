"""The model stages as DVC runs them (features -> align -> train_matcher -> evaluate), through
the CLI on a tiny synthetic dataset with a shrunken config."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from components.align.model import read_words_shown
from components.align.stage import gallery_items, load_visual_words
from components.data.format import read_dataset
from components.vision.parts import PartsFeatures
from flows.cli import app

pytestmark = pytest.mark.slow


def test_stages_chain_through_the_cli(synthetic_dataset_dir, tmp_path):
    runner = CliRunner()
    common = ["--data", str(synthetic_dataset_dir),
              "--set", f"data.cache_dir={tmp_path / 'cache'}",
              "--set", f"paths.features_dir={tmp_path / 'features'}",
              "--set", f"paths.align_dir={tmp_path / 'align'}",
              "--set", f"paths.matcher_dir={tmp_path / 'matcher'}",
              "--set", f"paths.reports_dir={tmp_path / 'reports'}",
              "--set", "align.max_iter=20", "--set", "match.max_steps=4", "--set", "match.eval_every=2",
              "--set", "match.lr=0.0001"]
    for command in (["features"], ["align", "train"], ["train-matcher", "--system", "ours"], ["evaluate"]):
        result = runner.invoke(app, command + common)
        assert result.exit_code == 0, f"{command}: {result.output}"
    assert (tmp_path / "features" / "parts.npz").is_file()
    assert (tmp_path / "align" / "words.parquet").is_file()
    assert (tmp_path / "align" / "alignment_gallery.png").is_file()
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert {"ours", "lexical", "text_zero_shot"} <= set(metrics)
    for system in metrics.values():
        assert {"valid", "test"} <= set(system)
        assert {"auc", "ndcg@10", "recall@10", "mrr@10"} <= set(system["test"])
    shown = runner.invoke(app, ["align", "show", "--data", str(synthetic_dataset_dir), "--align",
                                str(tmp_path / "align"), "--limit", "3"])
    assert shown.exit_code == 0 and "Visual words" in shown.output
    every = runner.invoke(app, ["align", "show", "--data", str(synthetic_dataset_dir), "--align",
                                str(tmp_path / "align"), "--limit", "3", "--all-words"])
    assert every.exit_code == 0, every.output

    # A person judges the first align.words_shown words; the matcher read the whole kept list.
    words_shown = read_words_shown(tmp_path / "align" / "model")
    assert words_shown == 3
    dataset = read_dataset(synthetic_dataset_dir)
    words = load_visual_words(tmp_path / "align" / "words.parquet")
    features = PartsFeatures.load(tmp_path / "features" / "parts.npz")
    items = gallery_items(dataset, "test", words, features, 4, words_shown)
    test_ads = dataset.split("test").ads["ad_id"].head(4).tolist()
    assert [[w.word for w in item.words] for item in items] == [[w.word for w in words[a][:3]] for a in test_ads]
    assert any(len(words[a]) > 3 for a in test_ads)
