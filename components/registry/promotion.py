"""Promotion: move `champion` to the `challenger` version when, on the same current test split,
it is better by at least `min_delta` and no guardrail metric drops by more than allowed (a
guardrail metric that is missing refuses the promotion).

Every decision is recorded on the challenger version: a JSON artifact in its logged model
(`promotion/decision-<key>.json`) with both versions' metrics, the rule and the outcome, then
tags (`alignsearch.promotion.*`: the previous key removed first, the new key last). A decision
is keyed by (challenger, champion, dataset hash, rule); asking again with the same key changes
nothing. A metric the rule reads that is not a finite number refuses.

Safe to retry and to run twice at once:
- the record is written before the alias moves, and a recorded "promoted" whose alias move
  never happened (a crash in between) is completed by the next run: one champion, one record;
- a registry error is never read as "no champion" (`versions.by_alias`): it stops the
  promotion before anything changed;
- promotions against one store take a lock (`components.registry.lock`), and the alias moves
  only if `champion` is still the version the decision compared against.

The alias moves inside the caller's `carry_catalogue(champion, challenger, then=move)` (the
flows pass the live catalogue's re-indexing): it makes the champion's live catalogue the
challenger's and calls `then` under the catalogue lock, which every catalogue change takes
too, so the new champion never serves ads another model encoded and no ad added meanwhile
is left behind on the old one; a failure there stops the promotion before anything moved.
The evaluation runs outside that lock (catalogue changes go on meanwhile).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from components.data.config import ValidateConfig
from components.data.format import dataset_hash, read_dataset
from components.data.validate import validate_dataset
from components.evaluate.subsets import TITLE_OVERLAP
from components.registry.config import PromoteConfig, RegistryConfig
from components.registry.lock import PROMOTION, store_lock
from components.registry.models import open_model
from components.registry.tracking import client as mlflow_client
from components.registry.versions import (
    CHALLENGER,
    CHAMPION,
    RegistryError,
    by_alias,
    is_absent,
    registry_error,
    training_dataset_dir,
)
from components.search.engine import SearchEngine

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
    """The rule itself: (promote?, why). `champion` None means there is no champion yet. A
    metric the rule reads that is not a finite number (NaN, inf) on either side refuses, by name.

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
    # NaN compares false with everything: a NaN challenger would be "not worse" and a NaN
    # guardrail "not dropped". A metric the rule reads must be a finite number on both sides.
    for who, metrics in (("challenger", challenger), ("champion", champion)):
        for name in (rule.metric, guard if guardrail_void is None else None):
            if metrics is not None and name in metrics and not math.isfinite(metrics[name]):
                return False, (f"refused: the {who}'s {name} is {metrics[name]} (not a finite number); "
                               "the evaluation failed to measure it")
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
    engine = SearchEngine(open_model(model_uri, cache_dir).bundle_dir)
    return engine.evaluate(dataset_dir, rule.split, cache_dir=cache_dir, seed=rule.seed)


def logged_model_id(version) -> str | None:
    """The MLflow 3 logged model behind a registry version (its source is `models:/<model id>`)."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source.removeprefix("models:/") if source.startswith("models:/m-") else None


def _record(client, name: str, version, decision: Decision) -> None:
    """The decision on the challenger version: the JSON artifact, then the tags: the previous
    decision's key removed first, this one's written last, so a key tag always belongs to the
    tags beside it (a crash in between leaves no key, and the next run decides again)."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "promotion"
        folder.mkdir()
        (folder / f"decision-{decision.key}.json").write_text(json.dumps(asdict(decision), indent=2) + "\n")
        model_id = logged_model_id(version)
        if model_id:
            client.log_model_artifacts(model_id, scratch)
        elif version.run_id:  # a version registered from a run's artifact path
            client.log_artifacts(version.run_id, scratch)
    if (version.tags or {}).get(f"{TAG}.key"):
        try:
            client.delete_model_version_tag(name, str(version.version), f"{TAG}.key")
        except Exception as exc:
            if not is_absent(exc):
                raise registry_error(f"clearing the previous decision of {name} v{version.version}", exc) from exc
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


class CarryCatalogue(Protocol):
    """Makes the live catalogue of `champion` (None: there is none) the catalogue of
    `challenger`, and calls `then` (the alias move) under the catalogue lock once it has."""

    def __call__(self, champion: str | None, challenger: str, *, then: Callable[[], None]) -> object: ...


def _carry_and_move(client, name: str, carry_catalogue: CarryCatalogue, champion: str | None,
                    challenger: str) -> None:
    moved: list[str] = []

    def move() -> None:
        _move_champion(client, name, challenger, expected=champion)
        moved.append(challenger)

    carry_catalogue(champion, challenger, then=move)
    if not moved:
        raise RuntimeError(f"carry_catalogue returned without moving {name}@{CHAMPION} (it must call `then` under "
                           "the catalogue lock); the decision is recorded, promote again completes it")


PROMOTION_LOCK_TIMEOUT_S = 3600.0


def promote(registry: RegistryConfig, rule: PromoteConfig, *, dataset_dir: Path | None, cache_dir: Path,
            carry_catalogue: CarryCatalogue, validation: ValidateConfig) -> Decision:
    """Compare `challenger` with `champion` on the current split and move `champion` if the
    rule says so. Idempotent and safe to retry or run concurrently (see module docstring).

    `dataset_dir` None: the dataset the challenger was trained on (its run records it). A
    dataset given that is not that one (by DVC hash) must pass `validation` first (the
    training data passed it in the challenger's run), and the decision's reason says which
    data it was.
    `carry_catalogue(champion, challenger, then=move)`: carries the champion's live catalogue
    over and moves the alias under the catalogue lock (the live catalogue's `catalogue_carrier`
    in the flows; required, so no caller forgets the champion's ads).
    """
    with store_lock(registry.model_name, PROMOTION, timeout_s=PROMOTION_LOCK_TIMEOUT_S):
        return _promote(registry, rule, dataset_dir=dataset_dir, cache_dir=cache_dir,
                        carry_catalogue=carry_catalogue, validation=validation)


def _other_data(dataset_dir: Path, dhash: str, challenger, validation: ValidateConfig) -> str | None:
    """None when `dataset_dir` is the data the challenger was trained on (same DVC hash as its
    `dataset_hash` tag); else validate it (`ValidationError` stops the promotion) and say what
    it is, for the log and the decision's reason."""
    trained_on = (challenger.tags or {}).get("dataset_hash")
    if trained_on == dhash:
        return None
    validate_dataset(Path(dataset_dir), validation).raise_if_failed()
    note = (f"evaluated on {dataset_dir} (dataset {dhash}), not the dataset v{challenger.version} was trained on "
            f"({trained_on or 'not recorded'})")
    log.warning("%s", note)
    return note


def _promote(registry: RegistryConfig, rule: PromoteConfig, *, dataset_dir: Path | None, cache_dir: Path,
             carry_catalogue: CarryCatalogue, validation: ValidateConfig) -> Decision:
    client = mlflow_client()
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
    given = dataset_dir is not None
    if dataset_dir is None:
        dataset_dir = training_dataset_dir(challenger)
        if dataset_dir is None:
            raise ValueError(f"{name} v{challenger_version} does not record the dataset it was trained on; "
                             "pass the dataset to evaluate on (alignsearch promote --data DIR)")
        log.info("evaluating on the dataset v%s was trained on: %s", challenger_version, dataset_dir)
    dhash = dataset_hash(dataset_dir)
    other_data = _other_data(dataset_dir, dhash, challenger, validation) if given else None
    key = decision_key(challenger_version, champion_version, dhash, rule)
    tags = challenger.tags or {}
    if tags.get(f"{TAG}.key") == key:
        if tags.get(f"{TAG}.outcome") == PROMOTED:  # recorded, but the alias never moved (a crash between)
            _carry_and_move(client, name, carry_catalogue, champion_version, challenger_version)
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
    if other_data:
        reason = f"{reason}; {other_data}"
    decision = Decision(PROMOTED if promote_it else KEPT, reason, challenger_version, champion_version,
                        challenger_metrics, champion_metrics or {}, rule.model_dump(), dhash, key,
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _record(client, name, challenger, decision)  # first: a crash after it is completed by the next run
    if promote_it:
        _carry_and_move(client, name, carry_catalogue, champion_version, challenger_version)
    log.info("%s v%s: %s (%s) in %.1f s", name, challenger_version, decision.outcome, reason,
             time.perf_counter() - started)
    return decision
