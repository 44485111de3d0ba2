"""The loop on a schedule (issue 20, item 4): the scheduled job (`retrain_and_promote_flow` with
`loop=True`) ingests the logged searches and clicks into the next dataset version, validates,
retrains warm from the champion, registers with the loop's tags, and promotes; with no new
events every stage is a cache hit and nothing is registered; with no champion it trains cold
and says why.

Real Prefect flow runs (a throwaway Prefect server), a real MLflow store and a real traffic log
(SQLite) in a temporary directory, the tiny synthetic dataset of tests/conftest.py, events
written into the log as the service writes them (`EventStore.append`)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from mlflow import MlflowClient

from components.config import Params, load_params
from components.data.format import dataset_hash, read_dataset
from components.registry.tracking import configure_mlflow
from components.traffic.events import Click, Hit, Impression, new_id, open_store
from flows.promote import promote_flow, retrain_and_promote_flow
from flows.retrain import WARM_FROM_TAG, _warm_source, retrain_flow

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES = ["validate", "features", "align", "train_matcher", "evaluate"]
TAG = "alignsearch.loop"
# Tiny training; the loop's own runs leave the rate open (a cold run would search lr_grid), so a
# warm run's rate can only be the champion's.
TINY = ["align.max_iter=20", "match.max_steps=4", "match.eval_every=2", "benchmark.gallery_size=4",
        "match.warm_start_steps=3"]
CHAMPION_LR = 1e-4


@pytest.fixture(scope="module", autouse=True)
def prefect_harness(tmp_path_factory):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-results")
    with prefect_test_harness(server_startup_timeout=60), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        yield


def _overrides(root: Path, dataset_dir: Path, *more: str) -> list[str]:
    """Every output of the flows (stages, MLflow store, caches, traffic log, live dataset) under `root`."""
    return [f"data.path={dataset_dir}", f"data.cache_dir={root / 'cache'}", f"paths.flow_dir={root / 'flow'}",
            f"registry.tracking_uri=sqlite:///{root / 'mlruns' / 'mlflow.db'}",
            f"registry.artifact_location={root / 'mlruns' / 'artifacts'}",
            f"traffic.store_uri=sqlite:///{root / 'traffic.db'}", f"traffic.dataset_dir={root / 'live'}",
            *TINY, *more]


def _params(overrides: list[str]) -> dict:
    return load_params(None, overrides).model_dump(mode="json", by_alias=True)


def _cold_store(root: Path, dataset_dir: Path, *, promote: bool) -> list[str]:
    """A store with v1 trained cold at CHAMPION_LR on the base dataset (promoted to champion if
    asked); returns the overrides of the loop runs on it."""
    overrides = _overrides(root, dataset_dir)
    first = retrain_flow(_params([*overrides, f"match.lr={CHAMPION_LR}"]))
    assert first["version"] == "1" and not first["loop"]
    if promote:
        assert promote_flow(_params(overrides))["outcome"] == "promoted"
    return [*overrides, "match.lr=null"]


def _log_traffic(cfg: Params, dataset_dir: Path) -> dict[str, int]:
    """Searches and clicks as the service logs them: each training query searched once, its
    relevant ad clicked at position 2 below a skipped one; three new query texts, each showing
    an ad of every split and clicked on all three (the one of the query's own split counts)."""
    dataset = read_dataset(dataset_dir)
    ads = dataset.ads.set_index("ad_id")["split"]
    by_split = {s: list(ads[ads == s].index) for s in ("train", "valid", "test")}
    queries = dataset.queries[dataset.queries["split"] == "train"].head(12)
    qrels = dataset.qrels[dataset.qrels["relevance"] > 0]
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    events: list = []
    clicks = 0
    for i, (query_id, text) in enumerate(zip(queries["query_id"], queries["text"], strict=True)):
        relevant = qrels.loc[qrels["query_id"] == query_id, "ad_id"].iloc[0]
        other = next(a for a in by_split["train"] if a not in set(qrels.loc[qrels["query_id"] == query_id, "ad_id"]))
        shown = (other, relevant, *[a for a in by_split["train"][:3] if a not in (other, relevant)])
        event = Impression(new_id(), text, len(shown), tuple(Hit(a, p, 1.0 / p) for p, a in enumerate(shown, 1)),
                           "alignsearch", "1", source="api", time=now + dt.timedelta(seconds=i))
        events += [event, Click(new_id(), event.event_id, relevant, 2, time=event.time + dt.timedelta(seconds=1))]
        clicks += 1
    for j in range(3):
        shown = (by_split["train"][j], by_split["valid"][j], by_split["test"][j])
        event = Impression(new_id(), f"striped balloon number {j}", 3,
                           tuple(Hit(a, p, 1.0 / p) for p, a in enumerate(shown, 1)), "alignsearch", "1",
                           time=now + dt.timedelta(seconds=30 + j))
        events.append(event)
        for p, a in enumerate(shown, 1):
            events.append(Click(new_id(), event.event_id, a, p, time=event.time + dt.timedelta(seconds=p)))
            clicks += 1
    with open_store(cfg.traffic) as store:
        store.append(events)
    return {"impressions": len(queries) + 3, "clicks": clicks}


def _versions(client: MlflowClient) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions("name = 'alignsearch'"))


def test_the_scheduled_loop_ingests_trains_warm_registers_then_caches(synthetic_dataset_dir, tmp_path):
    overrides = _cold_store(tmp_path, synthetic_dataset_dir, promote=True)
    cfg = load_params(None, overrides)
    client = MlflowClient()
    champion_run = client.get_model_version("alignsearch", "1").run_id
    logged = _log_traffic(cfg, synthetic_dataset_dir)

    out = retrain_and_promote_flow(str(REPO_ROOT / "params.yaml"), overrides, loop=True)
    retrained = out["retrain"]
    live = tmp_path / "live"
    assert retrained["dataset_dir"] == str(live.resolve())
    assert retrained["version"] == "2" and retrained["version_created"]
    base_hash, live_hash = dataset_hash(synthetic_dataset_dir), dataset_hash(live)
    assert retrained["dataset_hash"] == live_hash != base_hash
    new_queries = len(read_dataset(live).queries) - len(read_dataset(synthetic_dataset_dir).queries)
    assert new_queries > 0

    run = client.get_run(retrained["run_id"])
    version = client.get_model_version("alignsearch", "2")
    for tags in (run.data.tags, version.tags):  # where a person looks: the run and the version
        assert tags[TAG] == "on" and tags[f"{TAG}.changed"] == "true"
        assert tags[f"{TAG}.dataset_before"] == base_hash  # the first ingest starts from the base
        assert tags[f"{TAG}.champion_dataset"] == base_hash
        assert tags[f"{TAG}.dataset_after"] == live_hash == tags["dataset_hash"]
        assert tags[f"{TAG}.impressions"] == str(logged["impressions"])
        assert tags[f"{TAG}.clicks"] == str(logged["clicks"])
        assert tags[f"{TAG}.new_queries"] == str(new_queries)
        assert int(tags[f"{TAG}.positives"]) > 0 and int(tags[f"{TAG}.negatives"]) > 0
        assert tags[f"{TAG}.warm_start"].startswith(f"warm: alignsearch v1 (run {champion_run})")
        assert tags[WARM_FROM_TAG] == "1"
    assert run.data.metrics["loop/impressions"] == logged["impressions"]
    # warm: the champion's rate (this run's params leave it to a search), warm_start_steps steps
    assert run.data.metrics["matcher/lr"] == CHAMPION_LR and run.data.metrics["matcher/steps"] == 3
    assert run.data.params["match.lr"] == "null"
    assert out["promotion"]["challenger_version"] == "2"

    # Nothing new in the log: same dataset version, every stage from the cache, nothing registered;
    # whichever version is champion (the promotion's, then the other one).
    promoted = str(client.get_model_version_by_alias("alignsearch", "champion").version)
    for champion in (promoted, "1" if promoted == "2" else "2"):
        client.set_registered_model_alias("alignsearch", "champion", champion)
        again = retrain_and_promote_flow(str(REPO_ROOT / "params.yaml"), overrides, loop=True)["retrain"]
        assert again["cached_stages"] == STAGES, champion
        assert again["version"] == "2" and not again["version_created"]
        assert again["dataset_hash"] == live_hash
        assert again["loop"][f"{TAG}.changed"] == "false" and again["loop"][f"{TAG}.impressions"] == "0"
        assert again["loop"][WARM_FROM_TAG] == "1"  # v2 trained on this version started from v1
        assert _versions(client) == ["1", "2"]


def test_with_no_champion_the_loop_trains_cold_and_says_why(synthetic_dataset_dir, tmp_path):
    overrides = _cold_store(tmp_path, synthetic_dataset_dir, promote=False)
    cfg = load_params(None, [*overrides, f"match.lr={CHAMPION_LR}"])
    logged = _log_traffic(cfg, synthetic_dataset_dir)

    result = retrain_flow(cfg.model_dump(mode="json", by_alias=True), loop=True)
    configure_mlflow(cfg.registry)
    client = MlflowClient()
    run = client.get_run(result["run_id"])
    assert result["version"] == "2" and result["version_created"]
    assert result["cached_stages"] == []  # a new dataset version: every stage ran
    assert run.data.tags[f"{TAG}.warm_start"] == "cold: no alignsearch@champion to start from"
    assert run.data.tags[f"{TAG}.champion_dataset"] == "none"
    assert run.data.tags[f"{TAG}.impressions"] == str(logged["impressions"])
    assert client.get_model_version("alignsearch", "2").tags[WARM_FROM_TAG] == "cold"
    assert run.data.metrics["matcher/steps"] == 4  # the full budget: max_steps, not warm_start_steps


def test_where_a_loop_run_starts():
    """`_warm_source`: the champion, unless a cold run is asked for or there is none; on the
    dataset version the champion was trained on, the champion's own start (nothing new)."""
    cfg = load_params(None, [])
    champion = {"version": "3", "run_id": "r3", "dataset_hash": "h-old", "warm_from": "2"}
    assert _warm_source(cfg, champion, "h-new") == ("3", "alignsearch@champion")
    assert _warm_source(cfg, {**champion, "dataset_hash": "h-new"}, "h-new")[0] == "2"
    cold, why = _warm_source(cfg, {**champion, "dataset_hash": "h-new", "warm_from": "cold"}, "h-new")
    assert cold is None and "trained cold on this dataset version" in why
    assert _warm_source(cfg, {}, "h-new") == (None, "no alignsearch@champion to start from")
    asked = load_params(None, ["match.warm_start=false"])
    assert _warm_source(asked, champion, "h-new") == (None, "match.warm_start is false (a cold run was asked for)")
