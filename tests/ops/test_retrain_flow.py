"""The retraining flow end to end: registration with the alias, what the MLflow run holds,
cache hits on an unchanged rerun, and a broken dataset stopping at validation."""

from __future__ import annotations

import json
import shutil

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from ops_helpers import as_flow_params, ops_params

from components.data.format import dataset_hash, read_dataset
from components.data.validate import ValidationError
from components.registry.tracking import configure_mlflow
from flows.retrain import retrain_flow

pytestmark = pytest.mark.slow

STAGES = ["validate", "features", "align", "train_matcher", "evaluate"]


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out: set[str] = set()
    for item in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_flow_registers_a_challenger_with_a_complete_run(trained_store, synthetic_dataset_dir):
    root, cfg, result = trained_store
    configure_mlflow(cfg.registry)
    client = MlflowClient()
    assert result["version"] == "1" and result["version_created"]
    assert str(client.get_model_version_by_alias("alignsearch", "challenger").version) == "1"

    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.experiment_id == mlflow.get_experiment_by_name("alignsearch").experiment_id
    # params, dataset hash (the DVC directory hash), git commit
    assert run.data.params["match.lr"] == "0.0001" and run.data.params["align.max_iter"] == "20"
    assert run.data.tags["dataset_hash"] == dataset_hash(synthetic_dataset_dir)
    assert len(run.data.tags["git_commit"]) in (40, len("unknown"))
    # lineage where users look: the run page's Source and Datasets
    assert run.data.tags["mlflow.source.name"] == "flows/retrain.py:retrain_flow"
    if run.data.tags["git_commit"] != "unknown":
        assert run.data.tags["mlflow.source.git.commit"] == run.data.tags["git_commit"]
    [used] = run.inputs.dataset_inputs
    assert used.dataset.digest == dataset_hash(synthetic_dataset_dir)
    assert str(synthetic_dataset_dir.resolve()) in used.dataset.source
    input_tags = {t.key: t.value for t in used.tags}
    assert input_tags["mlflow.data.context"] == "training"
    counts = read_dataset(synthetic_dataset_dir).counts()
    assert input_tags["ads.train"] == str(counts["ads"]["train"]) and input_tags["qrels.test"] == str(counts["qrels"]["test"])
    # per-stage metrics and timings, evaluation, and Lightning's own curves in the same run
    metrics = run.data.metrics
    for key in ("test/ndcg_at_10", "test/auc", "test/image_only/auc", "eval/lexical/test/ndcg_at_10",
                "align/align_stage_seconds", "matcher/train_matcher_seconds", "features/seconds", "register/seconds"):
        assert key in metrics, key
    assert 0.0 <= metrics["test/ndcg_at_10"] <= 1.0
    # The alignment is fitted by L-BFGS (no Lightning curves): its word precision is logged instead.
    assert "align/visual_word_precision" in metrics and "align/visual_word_constant_precision" in metrics
    assert any(k.startswith("matcher-") for k in metrics), "Lightning (matcher) did not log into the flow's run"
    # reports a person looks at, and the model
    artifacts = _artifacts(client, result["run_id"])
    for path in ("validation/validation.md", "validation/validation.json", "gallery/alignment_gallery.png",
                 "plots/subsets_auc.png", "plots/subsets_ndcg.png", "evaluation/metrics.json", "params.json"):
        assert path in artifacts, path
    version = client.get_model_version("alignsearch", "1")
    assert version.run_id == result["run_id"] and version.tags["dataset_hash"] == dataset_hash(synthetic_dataset_dir)
    model = mlflow.models.get_model_info("models:/alignsearch@challenger")
    assert model.signature.inputs.input_names() == ["query", "k"]
    assert {"ad_id", "score", "visual_words", "matched_words"} <= set(model.signature.outputs.input_names())


def test_unchanged_rerun_hits_every_cache_and_registers_nothing_new(trained_store):
    root, cfg, first = trained_store
    second = retrain_flow(as_flow_params(cfg))
    assert second["cached_stages"] == STAGES
    assert second["version"] == first["version"] and not second["version_created"]
    assert second["metrics"]["test/ndcg_at_10"] == first["metrics"]["test/ndcg_at_10"]
    versions = MlflowClient().search_model_versions("name = 'alignsearch'")
    assert [str(v.version) for v in versions] == ["1"]


def test_changed_params_retrain_only_the_stages_downstream(trained_store, synthetic_dataset_dir):
    root, _, first = trained_store
    cfg = ops_params(root, synthetic_dataset_dir, "match.max_steps=2")
    result = retrain_flow(as_flow_params(cfg))
    assert result["cached_stages"] == ["validate", "features", "align"]
    assert result["version_created"] and result["version"] == "2"
    assert str(MlflowClient().get_model_version_by_alias("alignsearch", "challenger").version) == "2"


def test_broken_dataset_stops_at_validation_and_registers_nothing(trained_store, synthetic_dataset_dir, tmp_path):
    root, _, _ = trained_store
    broken = tmp_path / "broken"
    shutil.copytree(synthetic_dataset_dir, broken)
    ads = pd.read_parquet(broken / "ads.parquet")
    ads.loc[1, "ad_id"] = ads.loc[0, "ad_id"]  # a duplicated id
    ads.to_parquet(broken / "ads.parquet", index=False)
    client = MlflowClient()
    before = {str(v.version) for v in client.search_model_versions("name = 'alignsearch'")}
    challenger_before = str(client.get_model_version_by_alias("alignsearch", "challenger").version)
    stage_dirs_before = sorted((root / "flow" / "features").iterdir())

    with pytest.raises(ValidationError, match="ad_id"):
        retrain_flow(as_flow_params(ops_params(root, broken)))

    assert {str(v.version) for v in client.search_model_versions("name = 'alignsearch'")} == before
    assert str(client.get_model_version_by_alias("alignsearch", "challenger").version) == challenger_before
    experiment = mlflow.get_experiment_by_name("alignsearch")
    failed = client.search_runs([experiment.experiment_id], "attributes.status = 'FAILED'")
    assert len(failed) == 1
    assert "ValidationError" in failed[0].data.tags["alignsearch.failure"]
    assert "validation/validation.md" in _artifacts(client, failed[0].info.run_id)
    assert sorted((root / "flow" / "features").iterdir()) == stage_dirs_before  # no stage ran


def test_title_less_dataset_registers_whichever_of_ours_and_implicit_fusion_words_wins_on_valid(
        prefect_harness, synthetic_dataset_dir, tmp_path):
    """Without titles ours sees the image only through a few words: the flow also trains
    implicit_fusion_words (the alignment as a plug-in) and registers the better one on valid."""
    dataset_dir = tmp_path / "title-less"
    shutil.copytree(synthetic_dataset_dir, dataset_dir)
    ads = pd.read_parquet(dataset_dir / "ads.parquet")
    ads["title"] = ""
    ads.to_parquet(dataset_dir / "ads.parquet", index=False)
    cfg = ops_params(tmp_path / "store", dataset_dir)
    result = retrain_flow(as_flow_params(cfg))

    configure_mlflow(cfg.registry)
    run = MlflowClient().get_run(result["run_id"])
    choice = json.loads(run.data.tags["alignsearch.system_choice"])
    values = choice["valid ndcg@10"]
    assert set(values) == {"ours", "implicit_fusion_words"}
    winner = "implicit_fusion_words" if values["implicit_fusion_words"] > values["ours"] else "ours"
    assert choice["chosen"] == run.data.tags["alignsearch.system"] == result["system"] == winner
    # both were evaluated in the run; the registered pyfunc is the chosen system and answers
    for system in values:
        assert f"eval/{system}/valid/ndcg_at_10" in run.data.metrics
    assert "train_matcher/implicit_fusion_words/seconds" in run.data.metrics
    (tmp_path / "down").mkdir()  # not mlflow's default, a directory in /tmp that nobody removes
    model = mlflow.pyfunc.load_model(f"models:/alignsearch/{result['version']}", dst_path=str(tmp_path / "down"))
    assert model.unwrap_python_model().engine.meta["system"] == winner
    query = read_dataset(dataset_dir).split("test").queries["text"].iloc[0]
    hits = model.predict(pd.DataFrame({"query": [query], "k": [3]}))
    assert len(hits) == 3 and (hits["title"] == "").all()
