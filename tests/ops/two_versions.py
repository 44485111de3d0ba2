"""Two registered versions that differ offline, and interleaved searches of them, for the tests of
promotion with traffic and of rollback (importable: the tests' directory is on sys.path).

`build_two_versions` adds to a copy of the session's trained store (v1) a v2 trained with
another seed and without the word channel, and says which ranks the test split better;
`copy_store` gives a test its own copy; `log_interleaved` and `log_searches` write hand-made
events whose counts are known into a traffic log."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

from ops_helpers import as_flow_params, ops_params, relocate_store

from components.traffic.events import Click, EventStore, Hit, Impression, new_id

NAME = "alignsearch"
ADS = ("a1", "a2", "a3", "a4")


def _forget_artifact_repos() -> None:
    # MLflow caches artifact repositories by run / model id for the process; copies of a store
    # share those ids, so a test would otherwise write into another copy's files.
    from mlflow.tracking._tracking_service import utils as mlflow_service_utils

    mlflow_service_utils._artifact_repos_cache.clear()


def copy_store(source: Path, root: Path, dataset_dir: Path) -> None:
    """`source` (a store root) copied to `root`, self-contained, and MLflow pointed at it."""
    from components.registry.tracking import configure_mlflow

    shutil.copytree(source, root, dirs_exist_ok=True)
    relocate_store(root, source)
    _forget_artifact_repos()
    configure_mlflow(ops_params(root, dataset_dir).registry)


def build_two_versions(template: Path, dataset_dir: Path, root: Path) -> tuple[str, str]:
    """The session's store copied to `root` plus v2 (another seed, no word channel); returns
    (worse, better) by test ndcg@10. No alias is `champion`."""
    from components.registry.config import PromoteConfig
    from components.registry.promotion import evaluate_version
    from flows.retrain import retrain_flow

    copy_store(template, root, dataset_dir)
    retrain_flow(as_flow_params(ops_params(root, dataset_dir, "match.seed=1", "match.word_channel=false")))
    rule = PromoteConfig(guardrail_metric="ndcg@10")
    ndcg = {v: evaluate_version(f"models:/{NAME}/{v}", dataset_dir, rule, root / "cache")["ndcg@10"]
            for v in ("1", "2")}
    assert ndcg["1"] != ndcg["2"], ndcg
    worse, better = sorted(ndcg, key=ndcg.get)
    _forget_artifact_repos()
    return worse, better


def _search(version: str, time: dt.datetime, contributors: tuple[str, ...] | None) -> Impression:
    hits = tuple(Hit(ad, i, 1.0 - 0.1 * i) for i, ad in enumerate(ADS, start=1))
    return Impression(new_id(), "red car", len(ADS), hits, NAME, version, "v0", time=time, contributors=contributors)


def _click(search: Impression, position: int) -> Click:
    return Click(new_id(), search.event_id, ADS[position - 1], position, time=search.time + dt.timedelta(seconds=1))


def log_interleaved(store_uri: str, challenger: str, champion: str, *, wins: int, losses: int, ties: int,
                    start: dt.datetime) -> None:
    """Interleaved searches of the two versions (positions 1, 3 the challenger's, 2, 4 the
    champion's), one a minute from `start`: `wins` with a click on a challenger hit, `losses`
    on a champion hit, `ties` without a click."""
    labels = (f"{NAME}/{challenger}", f"{NAME}/{champion}")
    events = []
    for n, kind in enumerate(["win"] * wins + ["loss"] * losses + ["tie"] * ties):
        search = _search(champion, start + dt.timedelta(minutes=n), labels * 2)
        events.append(search)
        if kind != "tie":
            events.append(_click(search, 1 if kind == "win" else 2))
    with EventStore(store_uri) as store:
        store.append(events)


def log_searches(store_uri: str, version: str, *, searches: int, clicked: int, start: dt.datetime,
                 end: dt.datetime) -> None:
    """`searches` of `version` alone (not interleaved), spread evenly over [start, end), the
    first `clicked` of them with a click at position 3: a CTR@10 of clicked / searches."""
    step = (end - start) / (searches + 1)
    events = []
    for n in range(searches):
        search = _search(version, start + step * (n + 1), None)
        events.append(search)
        if n < clicked:
            events.append(_click(search, 3))
    with EventStore(store_uri) as store:
        store.append(events)
