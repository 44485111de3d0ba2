"""The model card: every registered version's MLflow description, written at registration and
rewritten at promotion and at an online comparison. The markdown itself is checked from
hand-made facts (`render_card`); the written cards on a real store trained by the real flow."""

from __future__ import annotations

import datetime as dt

import mlflow
import pytest
from mlflow import MlflowClient
from ops_helpers import as_flow_params
from two_versions import NAME, log_interleaved
from typer.testing import CliRunner

from components.registry.card import KNOWN_LIMITS, MAX_CHARS, CardFacts, render_card


def facts(**changes) -> CardFacts:
    base = CardFacts(NAME, "3", system="ours", dataset_hash="62e16532", dataset_dir="data/live",
                     metrics={"ndcg@10": 0.5123, "auc": 0.9}, champion_version="2",
                     champion_metrics={"ndcg@10": 0.4987, "auc": 0.91}, metrics_source="at registration")
    for key, value in changes.items():
        setattr(base, key, value)
    return base


def test_the_card_names_data_system_metrics_beside_the_champion_and_limits():
    card = render_card(facts())
    assert card.startswith("### alignsearch v3 · system `ours`")
    assert "dataset `62e16532` (data/live)" in card
    assert "no logged clicks" in card
    assert "| metric | v3 | champion v2 |" in card and "| ndcg@10 | 0.5123 | 0.4987 |" in card
    assert "| auc | 0.9000 | 0.9100 |" in card and "recall@10" not in card  # only metrics either side has
    assert "no online verdict yet" in card
    assert all(limit in card for limit in KNOWN_LIMITS)


def test_the_card_says_how_many_clicks_it_learned_from_and_the_online_verdict():
    loop = {"": "on", "clicks": "120", "impressions": "300", "positives": "95", "negatives": "410",
            "new_queries": "3", "base_dataset": "0c1df038", "warm_start": "warm: alignsearch v2"}
    online = {"verdict": "challenger_better", "champion": "alignsearch/2", "impressions": "412", "preferred": "180",
              "challenger_wins": "110", "win_share": "0.6111", "p_value": "0.003", "alpha": "0.05",
              "test": "two-sided binomial sign test", "decided_at": "2026-12-05T12:00:00Z"}
    card = render_card(facts(loop=loop, online=online))
    assert "120 clicks on 300 searches" in card and "95 click positives" in card and "warm: alignsearch v2" in card
    assert "**challenger_better**" in card and "412 interleaved impressions" in card and "(61.1%)" in card
    assert "p = 0.003" in card and "sign test" in card


def test_a_long_reason_is_cut_and_the_card_fits_mlflow():
    card = render_card(facts(promotion={"outcome": "kept", "reason": "x" * 20_000, "decided_at": "now"},
                             rollback={"outcome": "rolled_back", "to": "2", "reason": "y" * 20_000}))
    assert len(card) <= MAX_CHARS
    assert card.endswith(KNOWN_LIMITS[-1])


@pytest.mark.slow
def test_cards_are_written_at_registration_promotion_and_comparison(trained_store, tmp_path):
    from flows.cli import app
    from flows.promote import promote_flow

    root, cfg, result = trained_store
    client = MlflowClient()
    # registration (the session's retraining flow): data, system, test metrics, no champion then
    v1 = client.get_model_version(NAME, "1")
    card = v1.description
    assert card.startswith(f"### {NAME} v1 · system `ours`")
    assert f"dataset `{v1.tags['dataset_hash']}`" in card
    ndcg = client.get_run(v1.run_id).data.metrics["test/ndcg_at_10"]
    assert f"| ndcg@10 | {ndcg:.4f} |" in card and "no champion then" in card
    assert "no logged clicks" in card and "no online verdict yet" in card and KNOWN_LIMITS[0] in card
    assert v1.tags["alignsearch.card.champion_at_registration"] == "none"

    # promotion: the decision and the metrics it measured
    decision = promote_flow(as_flow_params(cfg))
    assert decision["outcome"] == "promoted", decision["reason"]
    card = client.get_model_version(NAME, "1").description
    assert "**Promotion**" in card and "promoted" in card and "**Champion** since" in card
    measured = decision["challenger_metrics"]["ndcg@10"]
    assert f"| ndcg@10 | {measured:.4f} |" in card and "promotion decision" in card

    # v2 (the same model registered again, challenger) compared online: its card gets the verdict
    copy = mlflow.register_model(f"models:/{NAME}/1", NAME)
    client.set_registered_model_alias(NAME, "challenger", copy.version)
    traffic = tmp_path / "traffic.db"
    log_interleaved(f"sqlite:///{traffic}", str(copy.version), "1", wins=20, losses=60, ties=20,
                    start=dt.datetime.now(dt.UTC) - dt.timedelta(hours=3))
    sets = [f"registry.tracking_uri=sqlite:///{root / 'mlruns' / 'mlflow.db'}",
            f"registry.artifact_location={root / 'mlruns' / 'artifacts'}", f"traffic.store_uri=sqlite:///{traffic}",
            "promote.min_online_impressions=100"]
    compared = CliRunner().invoke(app, ["traffic", "compare", *[a for s in sets for a in ("--set", s)]])
    assert compared.exit_code == 0, compared.output
    card = client.get_model_version(NAME, str(copy.version)).description
    assert "**champion_better**" in card and f"against {NAME}/1" in card and "100 interleaved impressions" in card
