"""Promotion between `challenger` and `champion` with real registered models: no champion,
worse (not better by min-delta), equal, better, a guardrail breach, and idempotence.
The rule itself (`compare`) is also checked on hand-made numbers."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from ops_helpers import as_flow_params, decision_records, ops_params

from components.catalogue.live import catalogue_carrier
from components.registry.config import PromoteConfig
from components.registry.promotion import compare, evaluate_version, promote, void_guardrail
from components.registry.tracking import configure_mlflow
from flows.promote import promote_flow
from flows.retrain import retrain_flow

NAME = "alignsearch"


G = "title_overlap/auc"  # the default guardrail metric


@pytest.mark.parametrize(("challenger", "champion", "rule", "expected"), [
    ({"ndcg@10": 0.5, G: 0.9}, None, {}, True),                                  # no champion yet
    ({"ndcg@10": 0.6, G: 0.9}, {"ndcg@10": 0.5, G: 0.9}, {}, True),              # better
    ({"ndcg@10": 0.5, G: 0.9}, {"ndcg@10": 0.5, G: 0.9}, {}, False),             # equal is not better
    ({"ndcg@10": 0.4, G: 0.9}, {"ndcg@10": 0.5, G: 0.9}, {}, False),             # worse
    ({"ndcg@10": 0.52, G: 0.9}, {"ndcg@10": 0.5, G: 0.9}, {"min_delta": 0.05}, False),  # better, not by enough
    ({"ndcg@10": 0.56, G: 0.9}, {"ndcg@10": 0.5, G: 0.9}, {"min_delta": 0.05}, True),
    ({"ndcg@10": 0.6, G: 0.90}, {"ndcg@10": 0.5, G: 0.95}, {}, False),
    ({"ndcg@10": 0.6, G: 0.945}, {"ndcg@10": 0.5, G: 0.95}, {}, True),
])
def test_rule(challenger, champion, rule, expected):
    promote, reason = compare(challenger, champion, PromoteConfig(**rule))
    assert promote is expected, reason


@pytest.mark.parametrize(("challenger", "champion", "who"), [
    ({"ndcg@10": 0.9}, {"ndcg@10": 0.5, G: 0.9}, "challenger"),   # much better, but the guardrail is unknown
    ({"ndcg@10": 0.9, G: 0.9}, {"ndcg@10": 0.5}, "champion"),
    ({"ndcg@10": 0.9}, None, "challenger"),                        # even the first promotion
])
def test_missing_guardrail_metric_refuses_and_names_it(challenger, champion, who):
    promote, reason = compare(challenger, champion, PromoteConfig())
    assert promote is False
    assert f"guardrail metric '{G}' is missing from the {who}'s metrics" in reason


def test_a_void_guardrail_lets_the_compared_metric_decide_and_says_why():
    void = "the test split's ads have no titles"
    promote, reason = compare({"ndcg@10": 0.6}, {"ndcg@10": 0.5}, PromoteConfig(), guardrail_void=void)
    assert promote and f"guardrail {G} void: {void}" in reason
    promote, reason = compare({"ndcg@10": 0.4}, {"ndcg@10": 0.5}, PromoteConfig(), guardrail_void=void)
    assert not promote and "needs to be better" in reason
    assert compare({"ndcg@10": 0.4}, None, PromoteConfig(), guardrail_void=void)[0]


def test_title_overlap_guardrail_is_void_only_on_a_title_less_split(synthetic_dataset_dir, tmp_path):
    import shutil

    import pandas as pd

    assert void_guardrail(PromoteConfig(), synthetic_dataset_dir) is None  # titled: it applies
    title_less = tmp_path / "title-less"
    shutil.copytree(synthetic_dataset_dir, title_less)
    ads = pd.read_parquet(title_less / "ads.parquet")
    ads["title"] = ""
    ads.to_parquet(title_less / "ads.parquet", index=False)
    assert "no titles" in void_guardrail(PromoteConfig(), title_less)
    # any other guardrail, or a misspelt one, is never voided: a missing metric still refuses
    assert void_guardrail(PromoteConfig(guardrail_metric="auc"), title_less) is None
    assert void_guardrail(PromoteConfig(guardrail_metric="title_overlp/auc"), title_less) is None


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(("challenger", "champion", "named"), [
    ({"ndcg@10": NAN, G: 0.9}, {"ndcg@10": 0.6, G: 0.9}, "challenger's ndcg@10"),  # NaN is not better
    ({"ndcg@10": NAN, G: 0.9}, None, "challenger's ndcg@10"),                     # not even the first
    ({"ndcg@10": 0.7, G: NAN}, {"ndcg@10": 0.6, G: 0.9}, f"challenger's {G}"),    # a NaN guardrail never holds
    ({"ndcg@10": 0.7, G: 0.9}, {"ndcg@10": NAN, G: 0.9}, "champion's ndcg@10"),   # nothing to be better than
    ({"ndcg@10": 0.7, G: 0.9}, {"ndcg@10": 0.6, G: NAN}, f"champion's {G}"),
    ({"ndcg@10": INF, G: 0.9}, {"ndcg@10": 0.6, G: 0.9}, "challenger's ndcg@10"),
])
def test_a_metric_that_is_not_a_number_refuses_and_is_named(challenger, champion, named):
    promote, reason = compare(challenger, champion, PromoteConfig())
    assert promote is False, reason
    assert named in reason and "not a finite number" in reason


def test_rule_needs_the_metric():
    with pytest.raises(ValueError, match="recall@10"):
        compare({"ndcg@10": 0.5}, None, PromoteConfig(metric="recall@10"))


def _state(client: MlflowClient) -> dict:
    """Aliases and every version's tags: what a promotion may change."""
    versions = client.search_model_versions(f"name = '{NAME}'")
    return {"aliases": dict(client.get_registered_model(NAME).aliases),
            "tags": {str(v.version): dict(v.tags) for v in versions}}


def _decisions(version) -> list[dict]:
    return decision_records(f"models:/{NAME}/{version}", "promotion")


def _promote(root, dataset_dir, *rule: str) -> dict:
    return promote_flow(as_flow_params(ops_params(root, dataset_dir, *rule)), dataset_dir=str(dataset_dir))


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

    # v2: ours trained with another seed and without the word channel, a genuinely different
    # model (the zero-shot matcher used to be v2; ours now beats it on every metric here)
    retrain_flow(as_flow_params(ops_params(root, synthetic_dataset_dir, "match.seed=1", "match.word_channel=false")))
    rule = PromoteConfig()
    metrics = {v: evaluate_version(f"models:/{NAME}/{v}", synthetic_dataset_dir, rule, root / "cache")
               for v in ("1", "2")}
    assert metrics["1"]["ndcg@10"] != metrics["2"]["ndcg@10"]
    better, worse = sorted(("1", "2"), key=lambda v: -metrics[v]["ndcg@10"])

    # not better by min-delta -> kept, recorded, champion untouched; asking again changes nothing
    client.set_registered_model_alias(NAME, "champion", worse)
    client.set_registered_model_alias(NAME, "challenger", better)
    kept = _promote(root, synthetic_dataset_dir, "promote.min_delta=0.9", "promote.guardrail_metric=ndcg@10")
    assert kept["outcome"] == "kept" and "needs to be better by >= 0.9" in kept["reason"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == worse
    assert kept["challenger_metrics"] == pytest.approx(metrics[better])
    assert kept["champion_metrics"] == pytest.approx(metrics[worse])
    assert any(d["rule"]["min_delta"] == 0.9 and d["outcome"] == "kept" for d in _decisions(better))
    before = _state(client)
    assert _promote(root, synthetic_dataset_dir, "promote.min_delta=0.9", "promote.guardrail_metric=ndcg@10")["outcome"] == "unchanged"
    assert _state(client) == before

    # guardrail: a metric on which the better model (by the compared metric) is worse may not drop.
    # Which metric pair flips order depends on the two tiny models, so find one.
    names = sorted(set(metrics["1"]) & set(metrics["2"]))
    flips = [(p, g) for p in names for g in names
             if p != g and (metrics["1"][p] - metrics["2"][p]) * (metrics["1"][g] - metrics["2"][g]) < 0]
    assert flips, "the two models are ordered alike on every metric"
    primary, guard = flips[0]
    high, low = sorted(("1", "2"), key=lambda v: -metrics[v][primary])
    client.set_registered_model_alias(NAME, "champion", low)
    client.set_registered_model_alias(NAME, "challenger", high)
    breach = _promote(root, synthetic_dataset_dir, f"promote.metric={primary}", f"promote.guardrail_metric={guard}",
                      "promote.guardrail_max_drop=0.0")
    assert breach["outcome"] == "kept" and f"guardrail {guard} dropped" in breach["reason"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == low
    client.set_registered_model_alias(NAME, "champion", worse)
    client.set_registered_model_alias(NAME, "challenger", better)

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


# --------------------------------------------------------------------------- absent vs error


def _outage(*_, **__):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

    raise MlflowException("registry unavailable", error_code=TEMPORARILY_UNAVAILABLE)


def test_absent_is_none_and_any_other_error_raises(tmp_path, monkeypatch):
    from components.registry.config import RegistryConfig
    from components.registry.versions import RegistryError, by_alias, find_by_key

    configure_mlflow(RegistryConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    assert by_alias(NAME, "champion") is None           # no such model
    assert find_by_key(NAME, "abc") is None
    MlflowClient().create_registered_model(NAME)
    assert by_alias(NAME, "champion") is None           # model without the alias
    monkeypatch.setattr(MlflowClient, "get_registered_model", _outage)
    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", _outage)
    monkeypatch.setattr(MlflowClient, "search_model_versions", _outage)
    with pytest.raises(RegistryError, match="TEMPORARILY_UNAVAILABLE.*nothing was changed"):
        by_alias(NAME, "champion")
    with pytest.raises(RegistryError, match="registry unavailable"):  # else registration would duplicate
        find_by_key(NAME, "abc")


@pytest.mark.slow
def test_registry_outage_stops_promotion_and_changes_nothing(trained_store, monkeypatch):
    """The champion lookup fails (not "absent"): no promotion, no record, no alias."""
    from components.registry.versions import RegistryError

    root, cfg, _ = trained_store
    configure_mlflow(cfg.registry)
    client = MlflowClient()
    before = _state(client)
    real_model, real_alias = MlflowClient.get_registered_model, MlflowClient.get_model_version_by_alias
    calls = []

    def flaky_model(self, name):  # the challenger's lookup works, the champion's fails
        calls.append(name)
        return real_model(self, name) if len(calls) == 1 else _outage()

    def flaky_alias(self, name, alias):
        return _outage() if alias == "champion" else real_alias(self, name, alias)

    monkeypatch.setattr(MlflowClient, "get_registered_model", flaky_model)
    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", flaky_alias)
    with pytest.raises(RegistryError, match="TEMPORARILY_UNAVAILABLE"):
        promote(cfg.registry, cfg.promote, dataset_dir=None, cache_dir=root / "cache",
            carry_catalogue=catalogue_carrier(cfg.registry, root / "cache"), validation=cfg.validation)
    monkeypatch.undo()
    assert _state(client) == before and "champion" not in before["aliases"]


@pytest.mark.slow
def test_registration_lookup_error_registers_nothing(trained_store, monkeypatch):
    from flows.retrain import retrain_flow as flow

    root, cfg, _ = trained_store
    configure_mlflow(cfg.registry)
    monkeypatch.setattr(MlflowClient, "search_model_versions", _outage)
    changed = ops_params(root, cfg.data.path, "match.max_steps=2")  # a new model key
    with pytest.raises(Exception, match="registry unavailable"):
        flow(as_flow_params(changed))
    monkeypatch.undo()
    assert [str(v.version) for v in MlflowClient().search_model_versions(f"name = '{NAME}'")] == ["1"]


# --------------------------------------------------------------------------- crashes, retries


@pytest.mark.slow
@pytest.mark.parametrize("crash_at", ["record", "alias"])
def test_rerun_after_a_crash_converges_to_one_champion_and_one_record(trained_store, monkeypatch, crash_at):

    root, cfg, _ = trained_store
    configure_mlflow(cfg.registry)
    client = MlflowClient()

    def crash(*_, **__):
        raise KeyboardInterrupt(f"killed while writing the {crash_at}")

    if crash_at == "record":
        monkeypatch.setattr(MlflowClient, "set_model_version_tag", crash)
    else:
        real = MlflowClient.set_registered_model_alias
        monkeypatch.setattr(MlflowClient, "set_registered_model_alias",
                            lambda self, name, alias, version: crash() if alias == "champion"
                            else real(self, name, alias, version))
    with pytest.raises(KeyboardInterrupt):
        promote(cfg.registry, cfg.promote, dataset_dir=None, cache_dir=root / "cache",
            carry_catalogue=catalogue_carrier(cfg.registry, root / "cache"), validation=cfg.validation)
    monkeypatch.undo()

    again = promote(cfg.registry, cfg.promote, dataset_dir=None, cache_dir=root / "cache",
            carry_catalogue=catalogue_carrier(cfg.registry, root / "cache"), validation=cfg.validation)
    assert again.outcome == "promoted"
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    [recorded] = _decisions(1)
    assert recorded["outcome"] == "promoted"
    assert client.get_model_version(NAME, "1").tags["alignsearch.promotion.key"] == recorded["key"]
    assert promote(cfg.registry, cfg.promote, dataset_dir=None, cache_dir=root / "cache",
            carry_catalogue=catalogue_carrier(cfg.registry, root / "cache"), validation=cfg.validation).outcome == "unchanged"
    assert len(_decisions(1)) == 1


@pytest.mark.slow
def test_a_crash_after_the_outcome_tag_never_completes_another_decision(trained_store, monkeypatch):
    """v1 is kept under rule A (its guardrail metric does not exist). Rule B promotes it, but the
    process dies right after writing outcome=promoted: the key tag must not still say A, or a
    rerun under A would "complete" a promotion that A refused."""
    root, cfg, _ = trained_store
    client = MlflowClient()
    rule_a = cfg.promote.model_copy(update={"guardrail_metric": "no_such_metric"})

    def run(rule):
        return promote(cfg.registry, rule, dataset_dir=None, cache_dir=root / "cache",
                       carry_catalogue=catalogue_carrier(cfg.registry, root / "cache"), validation=cfg.validation)

    assert run(rule_a).outcome == "kept"
    real = MlflowClient.set_model_version_tag

    def dies_after_the_outcome(self, name, version, key, value):
        real(self, name, version, key, value)
        if key == "alignsearch.promotion.outcome":
            raise KeyboardInterrupt("killed after writing the outcome")

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", dies_after_the_outcome)
    with pytest.raises(KeyboardInterrupt):
        run(cfg.promote)
    monkeypatch.undo()
    assert client.get_model_version(NAME, "1").tags["alignsearch.promotion.outcome"] == "promoted"

    again = run(rule_a)
    assert again.outcome == "kept", again.reason
    assert "champion" not in client.get_registered_model(NAME).aliases


CONCURRENT_PROMOTE = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from ops_helpers import ops_params
from components.catalogue.live import catalogue_carrier
from components.registry.promotion import promote
from components.registry.tracking import configure_mlflow
root, dataset, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[1]) / "go"
cfg = ops_params(root, dataset)
configure_mlflow(cfg.registry)
while not go.exists():  # both processes start promoting at the same moment
    time.sleep(0.05)
print(json.dumps({"outcome": promote(cfg.registry, cfg.promote, dataset_dir=None, cache_dir=root / "cache",
            carry_catalogue=catalogue_carrier(cfg.registry, root / "cache"), validation=cfg.validation).outcome}))
"""


@pytest.mark.slow
def test_two_promotions_at_once_leave_one_champion_and_one_promotion(trained_store, tmp_path):
    import subprocess
    import sys
    import time

    from ops_helpers import fresh_env

    root, cfg, _ = trained_store
    here = str(Path(__file__).parent)
    processes = [subprocess.Popen([sys.executable, "-c", CONCURRENT_PROMOTE, str(root), str(cfg.data.path), here],
                                  env=fresh_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    time.sleep(8)  # both have imported and configured MLflow
    (root / "go").touch()
    outcomes = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        outcomes.append(json.loads(out.strip().splitlines()[-1])["outcome"])
    assert sorted(outcomes) == ["promoted", "unchanged"]
    configure_mlflow(cfg.registry)
    assert str(MlflowClient().get_model_version_by_alias(NAME, "champion").version) == "1"
    assert len(_decisions(1)) == 1


# --------------------------------------------------------------------------- which dataset


@pytest.mark.slow
def test_promote_without_a_dataset_uses_the_one_the_challenger_was_trained_on(trained_store, tmp_path):
    """params name another dataset (as after `retrain --set data.source=synthetic`, then a plain
    `promote`): the challenger's own dataset is used, not params' data.out_dir."""
    root, cfg, _ = trained_store
    elsewhere = ops_params(root, cfg.data.path, "data.path=null", f"data.out_dir={tmp_path / 'nothing' / 'here'}")
    decision = promote_flow(as_flow_params(elsewhere))
    assert decision["outcome"] == "promoted", decision["reason"]
    from components.data.format import dataset_hash

    assert decision["dataset_hash"] == dataset_hash(cfg.data.path)


@pytest.mark.slow
def test_promote_on_other_data_validates_it_and_says_it_is_not_the_training_data(trained_store, tmp_path):
    """`promote --data DIR`: a DIR that breaks the dataset rules stops the promotion before
    anything is recorded; a valid DIR other than the challenger's training data (by DVC hash) is
    used, and the decision's reason says so."""
    import shutil

    import pandas as pd

    from components.data.format import dataset_hash
    from components.data.validate import ValidationError

    root, cfg, _ = trained_store
    client = MlflowClient()
    trained_on = client.get_model_version(NAME, "1").tags["dataset_hash"]
    broken, other = tmp_path / "broken", tmp_path / "other"
    for copy in (broken, other):
        shutil.copytree(cfg.data.path, copy)
    ads = pd.read_parquet(broken / "ads.parquet")
    ads.loc[1, "ad_id"] = ads.loc[0, "ad_id"]  # a duplicated id
    ads.to_parquet(broken / "ads.parquet", index=False)
    before = _state(client)
    with pytest.raises(ValidationError, match="ad_id"):
        promote_flow(as_flow_params(cfg), dataset_dir=str(broken))
    assert _state(client) == before

    ads = pd.read_parquet(other / "ads.parquet")
    ads.loc[0, "title"] = ads.loc[0, "title"] + " sale"  # still valid, other content
    ads.to_parquet(other / "ads.parquet", index=False)
    assert dataset_hash(other) != trained_on
    decision = promote_flow(as_flow_params(cfg), dataset_dir=str(other))
    assert decision["outcome"] == "promoted" and decision["dataset_hash"] == dataset_hash(other)
    assert f"not the dataset v1 was trained on ({trained_on})" in decision["reason"]
    assert "not the dataset v1 was trained on" in client.get_model_version(NAME, "1").tags[
        "alignsearch.promotion.reason"]
