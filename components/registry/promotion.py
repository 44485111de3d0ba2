"""Promotion: move `champion` to the `challenger` version when, on the same current test split,
it is better by at least `min_delta` and no guardrail metric drops by more than allowed (a
guardrail metric that is missing refuses the promotion).

Every decision is recorded on the challenger version: a JSON artifact in its logged model
(`promotion/decision-<key>.json`) with both versions' metrics, the rule and the outcome, then
tags (`alignsearch.promotion.*`, the key last). A decision is keyed by (challenger, champion,
dataset hash, rule); asking again with the same key changes nothing.

Safe to retry and to run twice at once:
- the record is written before the alias moves, and a recorded "promoted" whose alias move
  never happened (a crash in between) is completed by the next run: one champion, one record;
- a registry error is never read as "no champion" (`versions.by_alias`): it stops the
  promotion before anything changed;
- promotions against one store take a lock (a file lock beside a sqlite store; against a
  tracking server, a lock model `<name>.promotion-lock` in its registry, whose creation is
  atomic in the server's database), and the alias moves only if `champion` is still the
  version the decision compared against.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from components.locks import file_lock
from components.registry.config import PromoteConfig, RegistryConfig
from components.registry.versions import (
    CHALLENGER,
    CHAMPION,
    RegistryError,
    by_alias,
    download_bundle,
    registry_error,
    training_dataset_dir,
)

log = logging.getLogger(__name__)

TAG = "alignsearch.promotion"
PROMOTED, KEPT, UNCHANGED, NO_CHALLENGER = "promoted", "kept", "unchanged", "no_challenger"


@dataclass
class Decision:
    outcome: str  # promoted | kept | unchanged | no_challenger
    reason: str
    challenger_version: str | None = None
    champion_version: str | None = None  # the champion before the decision
    challenger_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    rule: dict = field(default_factory=dict)
    dataset_hash: str | None = None
    key: str | None = None
    decided_at: str | None = None

    @property
    def promoted(self) -> bool:
        return self.outcome == PROMOTED


def compare(challenger: dict[str, float], champion: dict[str, float] | None, rule: PromoteConfig,
            guardrail_void: str | None = None) -> tuple[bool, str]:
    """The rule itself: (promote?, why). `champion` None means there is no champion yet.

    A guardrail metric missing from either side refuses, unless `guardrail_void` says why the
    evaluation data cannot have it (`void_guardrail`: a title-overlap guardrail on a dataset
    without titles); then the decision rests on `rule.metric` and the reason says so."""
    if rule.metric not in challenger:
        raise ValueError(f"challenger metrics lack {rule.metric!r} (have {sorted(challenger)})")
    guard = rule.guardrail_metric
    if guardrail_void is None:
        for who, metrics in (("challenger", challenger), ("champion", champion)):
            if metrics is not None and guard not in metrics:
                return False, (f"refused: guardrail metric {guard!r} is missing from the {who}'s metrics "
                               f"(have {sorted(metrics)}); the guardrail is never skipped")
    held = f"guardrail {guard} held" if guardrail_void is None else f"guardrail {guard} void: {guardrail_void}"
    if champion is None:
        return True, "no champion yet: the first valid challenger is promoted" + (
            f" ({held})" if guardrail_void else "")
    delta = challenger[rule.metric] - champion[rule.metric]
    if guardrail_void is None and champion[guard] - challenger[guard] > rule.guardrail_max_drop:
        guard_old, guard_new = champion[guard], challenger[guard]
        return False, (f"guardrail {guard} dropped {guard_old - guard_new:.4f} "
                       f"(> {rule.guardrail_max_drop}): {guard_old:.4f} -> {guard_new:.4f}")
    if delta <= 0 or delta < rule.min_delta:
        return False, (f"{rule.metric} {challenger[rule.metric]:.4f} vs champion {champion[rule.metric]:.4f} "
                       f"(delta {delta:+.4f}); needs to be better by >= {rule.min_delta}")
    return True, (f"{rule.metric} {challenger[rule.metric]:.4f} vs champion {champion[rule.metric]:.4f} "
                  f"(delta {delta:+.4f} >= {rule.min_delta}); {held}")


def void_guardrail(rule: PromoteConfig, dataset_dir: Path) -> str | None:
    """Why the guardrail cannot be measured on the evaluation data, or None when it can: a
    title-overlap guardrail on a split whose ads have no titles (COCO-style) has no pairs to
    measure. Any other missing guardrail still refuses (e.g. a misspelt metric)."""
    from components.data.format import read_dataset
    from components.evaluate.subsets import TITLE_OVERLAP

    if not rule.guardrail_metric.startswith(f"{TITLE_OVERLAP}/"):
        return None
    if read_dataset(dataset_dir).split(rule.split).title_less:
        return f"the {rule.split} split's ads have no titles, so no query overlaps a title"
    return None


def decision_key(challenger: str, champion: str | None, dataset_hash: str, rule: PromoteConfig) -> str:
    text = json.dumps([challenger, champion, dataset_hash, rule.model_dump()], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def evaluate_version(model_uri: str, dataset_dir: Path, rule: PromoteConfig, cache_dir: Path) -> dict[str, float]:
    """A registered version's metrics on `rule.split` of the dataset at `dataset_dir`."""
    from components.search.engine import SearchEngine

    with tempfile.TemporaryDirectory() as scratch:
        engine = SearchEngine(download_bundle(model_uri, Path(scratch)))
        return engine.evaluate(dataset_dir, rule.split, cache_dir=cache_dir, seed=rule.seed)


def logged_model_id(version) -> str | None:
    """The MLflow 3 logged model behind a registry version (its source is `models:/<model id>`)."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def _record(client, name: str, version, decision: Decision) -> None:
    """The decision on the challenger version: the JSON artifact, then the tags with the key
    last, so a record with a key tag is complete."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "promotion"
        folder.mkdir()
        (folder / f"decision-{decision.key}.json").write_text(json.dumps(asdict(decision), indent=2) + "\n")
        model_id = logged_model_id(version)
        if model_id:
            client.log_model_artifacts(model_id, scratch)
        elif version.run_id:  # a version registered from a run's artifact path
            client.log_artifacts(version.run_id, scratch)
    tags = {f"{TAG}.outcome": decision.outcome, f"{TAG}.reason": decision.reason[:5000],
            f"{TAG}.decided_at": decision.decided_at, f"{TAG}.champion_before": decision.champion_version or "none",
            f"{TAG}.key": decision.key}
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version.version), key, value)


def _move_champion(client, name: str, version: str, expected: str | None) -> None:
    """Compare-and-set: point `champion` at `version` only if it still points at `expected`."""
    current = by_alias(name, CHAMPION)
    current_version = None if current is None else str(current.version)
    if current_version != expected:
        raise RegistryError(f"{name}@{CHAMPION} moved to v{current_version} while this promotion compared "
                            f"against v{expected}; not moved. Run promote again.")
    try:
        client.set_registered_model_alias(name, CHAMPION, version)
    except Exception as exc:
        raise registry_error(f"moving {name}@{CHAMPION} to v{version} (the decision is recorded; "
                             "promote again completes it)", exc) from exc


LOCK_SUFFIX = ".promotion-lock"
LOCK_LEASE_S = 3600.0  # a lock model older than this is a dead holder's: taken over


@contextlib.contextmanager
def _registry_lock(name: str, timeout_s: float, lease_s: float = LOCK_LEASE_S):
    """Mutual exclusion through any registry server: creating a registered model is atomic
    (a unique name in the server's database), so whoever creates `<name>.promotion-lock`
    holds the lock, and deleting it releases it. Works across processes and machines."""
    import os
    import socket

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from components.registry.versions import is_absent

    client = MlflowClient()
    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": holder, "expires": f"{time.time() + lease_s:.0f}"},
                                           description=f"held while a promotion of {name} runs; deleted after")
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise registry_error(f"taking the promotion lock {lock}", exc) from exc
        try:
            held = client.get_registered_model(lock)
            if time.time() > float(held.tags.get("expires", "0")):
                log.warning("taking over the stale promotion lock %s (held by %s)", lock, held.tags.get("holder"))
                client.delete_registered_model(lock)
                continue
        except MlflowException as exc:
            if not is_absent(exc):  # released meanwhile: try again at once
                raise registry_error(f"reading the promotion lock {lock}", exc) from exc
            continue
        if time.monotonic() > deadline:
            raise RegistryError(f"another promotion ({held.tags.get('holder')}) holds {lock} for more than "
                                f"{timeout_s:.0f} s")
        log.info("another promotion is running (%s holds %s); waiting", held.tags.get("holder"), lock)
        time.sleep(0.5)
    try:
        yield
    finally:
        try:
            client.delete_registered_model(lock)
        except MlflowException as exc:
            if not is_absent(exc):
                raise registry_error(f"releasing the promotion lock {lock}", exc) from exc


def _carry_catalogue(registry: RegistryConfig, champion: str | None, challenger: str, cache_dir: Path) -> None:
    """Before `champion` moves: the champion's live catalogue (ads added or removed since it was
    registered) re-encoded by the challenger's model, so the new champion never serves ads
    encoded by another model (`components.catalogue.live.reindex`; a no-op while the champion
    serves only its own ads). A failure stops the promotion before the alias moves."""
    from components.catalogue.live import reindex

    reindex(registry.model_name, champion, challenger, cache_dir=cache_dir, experiment=registry.experiment)


@contextlib.contextmanager
def promotion_lock(timeout_s: float = 3600.0, name: str | None = None):
    """One promotion at a time per store. A local sqlite store: an exclusive file lock beside
    the database (works across processes). A registry server (or any other store) and a model
    `name`: the lock model in its registry (`_registry_lock`). The compare-and-set on the alias
    stays as the second line of defence."""
    import mlflow

    uri = mlflow.get_registry_uri() or ""
    if not uri.startswith("sqlite:///"):
        if name is None:
            yield
            return
        with _registry_lock(name, timeout_s):
            yield
        return
    path = Path(uri.removeprefix("sqlite:///") + ".promote.lock")
    with file_lock(path, timeout_s, lambda p: RegistryError(
            f"another promotion holds {p} for more than {timeout_s:.0f} s"), poll_s=0.5,
            on_wait=lambda p: log.info("another promotion is running (%s); waiting", p)):
        yield


def promote(registry: RegistryConfig, rule: PromoteConfig, *, dataset_dir: Path | None, cache_dir: Path) -> Decision:
    """Compare `challenger` with `champion` on the current split and move `champion` if the
    rule says so. Idempotent and safe to retry or run concurrently (see module docstring).

    `dataset_dir` None: the dataset the challenger was trained on (its run records it).
    """
    with promotion_lock(name=registry.model_name):
        return _promote(registry, rule, dataset_dir=dataset_dir, cache_dir=cache_dir)


def _promote(registry: RegistryConfig, rule: PromoteConfig, *, dataset_dir: Path | None, cache_dir: Path) -> Decision:
    from mlflow import MlflowClient

    from components.data.format import dataset_hash

    client = MlflowClient()
    name = registry.model_name
    challenger = by_alias(name, CHALLENGER)
    if challenger is None:
        return Decision(NO_CHALLENGER, f"{name}@{CHALLENGER} does not exist: nothing to promote")
    champion = by_alias(name, CHAMPION)
    challenger_version = str(challenger.version)
    champion_version = str(champion.version) if champion is not None else None
    if champion_version == challenger_version:
        return Decision(UNCHANGED, f"version {challenger_version} is already {CHAMPION}",
                        challenger_version, champion_version)
    if dataset_dir is None:
        dataset_dir = training_dataset_dir(challenger)
        if dataset_dir is None:
            raise ValueError(f"{name} v{challenger_version} does not record the dataset it was trained on; "
                             "pass the dataset to evaluate on (alignsearch promote --data DIR)")
        log.info("evaluating on the dataset v%s was trained on: %s", challenger_version, dataset_dir)
    dhash = dataset_hash(dataset_dir)
    key = decision_key(challenger_version, champion_version, dhash, rule)
    tags = challenger.tags or {}
    if tags.get(f"{TAG}.key") == key:
        if tags.get(f"{TAG}.outcome") == PROMOTED:  # recorded, but the alias never moved (a crash between)
            _carry_catalogue(registry, champion_version, challenger_version, cache_dir)
            _move_champion(client, name, challenger_version, expected=champion_version)
            log.info("%s v%s: completed the recorded promotion (key %s)", name, challenger_version, key)
            return Decision(PROMOTED, f"completed the promotion recorded at {tags.get(f'{TAG}.decided_at')}: "
                            f"{tags.get(f'{TAG}.reason', '')}", challenger_version, champion_version,
                            key=key, dataset_hash=dhash)
        return Decision(UNCHANGED, f"already decided ({tags.get(f'{TAG}.outcome')}) for this champion, "
                        f"dataset and rule", challenger_version, champion_version, key=key, dataset_hash=dhash)
    started = time.perf_counter()
    challenger_metrics = evaluate_version(f"models:/{name}/{challenger_version}", dataset_dir, rule, cache_dir)
    champion_metrics = (evaluate_version(f"models:/{name}/{champion_version}", dataset_dir, rule, cache_dir)
                        if champion is not None else None)
    promote_it, reason = compare(challenger_metrics, champion_metrics, rule, void_guardrail(rule, Path(dataset_dir)))
    decision = Decision(PROMOTED if promote_it else KEPT, reason, challenger_version, champion_version,
                        challenger_metrics, champion_metrics or {}, rule.model_dump(), dhash, key,
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _record(client, name, challenger, decision)  # first: a crash after it is completed by the next run
    if promote_it:
        _carry_catalogue(registry, champion_version, challenger_version, cache_dir)
        _move_champion(client, name, challenger_version, expected=champion_version)
    log.info("%s v%s: %s (%s) in %.1f s", name, challenger_version, decision.outcome, reason,
             time.perf_counter() - started)
    return decision
