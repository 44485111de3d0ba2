"""Promotion between `challenger` and `champion` with real registered models: no champion,
worse (not better by min-delta), equal, better, a guardrail breach, and idempotence.
The rule itself (`compare`) is also checked on hand-made numbers."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from ops_helpers import as_flow_params, ops_params

from components.registry.config import PromoteConfig
from components.registry.promotion import compare, evaluate_version
from components.registry.tracking import configure_mlflow
from flows.promote import promote_flow
from flows.retrain import retrain_flow

NAME = "alignsearch"


@pytest.mark.parametrize(("challenger", "champion", "rule", "expected"), [
    ({"ndcg@10": 0.5}, None, {}, True),                                   # no champion yet
    ({"ndcg@10": 0.6}, {"ndcg@10": 0.5}, {}, True),                       # better
    ({"ndcg@10": 0.5}, {"ndcg@10": 0.5}, {}, False),                      # equal is not better
    ({"ndcg@10": 0.4}, {"ndcg@10": 0.5}, {}, False),                      # worse
    ({"ndcg@10": 0.52}, {"ndcg@10": 0.5}, {"min_delta": 0.05}, False),    # better, not by enough
    ({"ndcg@10": 0.56}, {"ndcg@10": 0.5}, {"min_delta": 0.05}, True),
    ({"ndcg@10": 0.6, "title_overlap/auc": 0.90}, {"ndcg@10": 0.5, "title_overlap/auc": 0.95}, {}, False),
    ({"ndcg@10": 0.6, "title_overlap/auc": 0.945}, {"ndcg@10": 0.5, "title_overlap/auc": 0.95}, {}, True),
])
def test_rule(challenger, champion, rule, expected):
    promote, reason = compare(challenger, champion, PromoteConfig(**rule))
    assert promote is expected, reason


def test_rule_needs_the_metric():
    with pytest.raises(ValueError, match="recall@10"):
        compare({"ndcg@10": 0.5}, None, PromoteConfig(metric="recall@10"))


def _state(client: MlflowClient) -> dict:
    """Aliases and every version's tags: what a promotion may change."""
    versions = client.search_model_versions(f"name = '{NAME}'")
    return {"aliases": dict(client.get_registered_model(NAME).aliases),
            "tags": {str(v.version): dict(v.tags) for v in versions}}


def _decisions(version) -> list[dict]:
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}"))
    return [json.loads(p.read_text()) for p in sorted((local / "promotion").glob("decision-*.json"))] \
        if (local / "promotion").is_dir() else []


def _promote(root, dataset_dir, *rule: str) -> dict:
    return promote_flow(as_flow_params(ops_params(root, dataset_dir, *rule)))


@pytest.mark.slow
def test_promotion_cases(prefect_harness, synthetic_dataset_dir, tmp_path):
    root = tmp_path
    cfg = ops_params(root, synthetic_dataset_dir)
    configure_mlflow(cfg.registry)
    client = MlflowClient()

    assert _promote(root, synthetic_dataset_dir)["outcome"] == "no_challenger"

    # v1 (ours): no champion yet -> promoted
    retrain_flow(as_flow_params(cfg))
    first = _promote(root, synthetic_dataset_dir)
    assert first["outcome"] == "promoted" and first["champion_version"] is None
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert client.get_model_version(NAME, "1").tags["alignsearch.promotion.outcome"] == "promoted"
    [recorded] = _decisions(1)
    assert recorded["outcome"] == "promoted" and recorded["challenger_metrics"]["ndcg@10"] > 0

    # run twice: nothing changes
    before = _state(client)
    assert _promote(root, synthetic_dataset_dir)["outcome"] == "unchanged"
    assert _state(client) == before

    # v2: the zero-shot matcher, a genuinely different model
    retrain_flow(as_flow_params(ops_params(root, synthetic_dataset_dir, "registry.system=text_zero_shot")))
    rule = PromoteConfig()
    metrics = {v: evaluate_version(f"models:/{NAME}/{v}", synthetic_dataset_dir, rule, root / "cache")
               for v in ("1", "2")}
    assert metrics["1"]["ndcg@10"] != metrics["2"]["ndcg@10"]
    better, worse = sorted(("1", "2"), key=lambda v: -metrics[v]["ndcg@10"])

    # not better by min-delta -> kept, recorded, champion untouched; asking again changes nothing
    client.set_registered_model_alias(NAME, "champion", worse)
    client.set_registered_model_alias(NAME, "challenger", better)
    kept = _promote(root, synthetic_dataset_dir, "promote.min_delta=0.9")
    assert kept["outcome"] == "kept" and "needs to be better by >= 0.9" in kept["reason"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == worse
    assert kept["challenger_metrics"] == pytest.approx(metrics[better])
    assert kept["champion_metrics"] == pytest.approx(metrics[worse])
    assert any(d["rule"]["min_delta"] == 0.9 and d["outcome"] == "kept" for d in _decisions(better))
    before = _state(client)
    assert _promote(root, synthetic_dataset_dir, "promote.min_delta=0.9")["outcome"] == "unchanged"
    assert _state(client) == before

    # guardrail: a metric on which the better model is worse may not drop
    guard = min((k for k in metrics[better] if k != "ndcg@10"),
                key=lambda k: metrics[better][k] - metrics[worse][k])
    assert metrics[better][guard] < metrics[worse][guard], "the two models differ on no secondary metric"
    breach = _promote(root, synthetic_dataset_dir, f"promote.guardrail_metric={guard}",
                      "promote.guardrail_max_drop=0.0")
    assert breach["outcome"] == "kept" and f"guardrail {guard} dropped" in breach["reason"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == worse

    # better, guardrail on the compared metric itself -> promoted
    promoted = _promote(root, synthetic_dataset_dir, "promote.guardrail_metric=ndcg@10")
    assert promoted["outcome"] == "promoted" and promoted["champion_version"] == worse
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == better

    # equal: the champion's own model registered again as the challenger
    copy = mlflow.register_model(f"models:/{NAME}/{better}", NAME)
    client.set_registered_model_alias(NAME, "challenger", copy.version)
    equal = _promote(root, synthetic_dataset_dir)
    assert equal["outcome"] == "kept" and "delta +0.0000" in equal["reason"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == better
