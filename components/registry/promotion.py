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

What live traffic says (`promote.online`, docs/operations.md#promotion-listens-to-traffic): the
caller passes the online verdict of this challenger against this champion (`OnlineVerdict`,
computed from the traffic log by `components.traffic.verdict`, a layer above this one) and
`online_rule` combines it with the offline rule. The decision records both and why, and the
verdict is part of the decision's key, so a verdict that changes as traffic comes in decides
again. A version that was rolled back is never promoted again (register a new one).

Rollback (`rollback`): `champion` moves back to the version it replaced when its live CTR@10
fell below that version's by more than `promote.rollback_max_ctr_drop` (or when forced), with a
decision record, under the same lock and through the same catalogue carry as a promotion.
Every champion move writes `alignsearch.champion.previous` and `.since` on the new champion:
that is how a rollback knows where to go back to, and over which window each served.
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
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from components.data.config import ValidateConfig
from components.data.format import dataset_hash, read_dataset
from components.data.validate import validate_dataset
from components.evaluate.subsets import TITLE_OVERLAP
from components.registry.card import refresh_card
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
from components.search.interleave import contributor_label

log = logging.getLogger(__name__)

TAG = "alignsearch.promotion"
ONLINE_TAG = "alignsearch.online"  # the latest online verdict of a version (as challenger)
CHAMPION_TAG = "alignsearch.champion"  # .previous, .since: written when a version becomes champion
ROLLBACK_TAG = "alignsearch.rollback"  # on a version rolled back from
PROMOTED, KEPT, UNCHANGED, NO_CHALLENGER = "promoted", "kept", "unchanged", "no_challenger"
# A rollback's outcomes (KEPT too: the drop is within bounds).
ROLLED_BACK, NO_CHAMPION, NO_PREVIOUS, TOO_FEW_SEARCHES = "rolled_back", "no_champion", "no_previous", "too_few"

# The online verdicts (`OnlineVerdict.verdict`).
CHALLENGER_BETTER, CHAMPION_BETTER, NO_DIFFERENCE, TOO_FEW = (
    "challenger_better", "champion_better", "no_difference", "too_few")
# What the decision says of the online side besides a verdict.
ONLINE_OFF, ONLINE_NO_CHAMPION, ONLINE_MISSING = "off", "no_champion", "missing"
SIGN_TEST = ("two-sided exact binomial sign test (scipy.stats.binomtest, p = 0.5) over the interleaved "
             "impressions with a preference; ties left out")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class OnlineVerdict:
    """What interleaved traffic says of `challenger` against `champion` (contributor labels,
    "<model name>/<version>"): `components.traffic.verdict.online_verdict` computes it, promotion
    and the model card read it. Defined here, below the traffic layer, so promotion takes it as
    a value and never imports traffic."""

    challenger: str
    champion: str
    impressions: int  # interleaved impressions of the pair
    preferred: int  # of them, with a preference (not a tie)
    challenger_wins: int
    champion_wins: int
    p_value: float  # of SIGN_TEST; 1.0 when no impression has a preference
    alpha: float
    min_impressions: int
    verdict: str  # CHALLENGER_BETTER | CHAMPION_BETTER | NO_DIFFERENCE | TOO_FEW
    test: str = SIGN_TEST
    note: str = ""  # why there were no events to read (no traffic log, ...)
    start: str | None = None  # the events' time range, ISO 8601 UTC (None: the whole log)
    end: str | None = None

    @property
    def win_share(self) -> float:
        """The challenger's share of the impressions with a preference (NaN when none)."""
        return self.challenger_wins / self.preferred if self.preferred else math.nan

    def as_dict(self) -> dict:
        return {**asdict(self), "win_share": self.win_share}

    def summary(self) -> str:
        share = "-" if not self.preferred else f"{self.win_share:.1%}"
        text = (f"{self.impressions} interleaved impressions of {self.challenger} and {self.champion}, "
                f"{self.preferred} with a preference, challenger won {self.challenger_wins} ({share}), "
                f"p = {self.p_value:.3g}")
        return f"{text} ({self.note})" if self.note else text


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
    # Both verdicts: the offline rule's (promote?, why) and the online one (a verdict, or off,
    # no_champion, missing), with the verdict's numbers when there was one.
    offline_promote: bool | None = None
    offline_reason: str = ""
    online_status: str = ""
    online: dict = field(default_factory=dict)

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


def online_status(verdict: OnlineVerdict | None, rule: PromoteConfig, pair: tuple[str, str] | None
                  ) -> tuple[str, str]:
    """(status, why) of the online side for a challenger/champion `pair` of contributor labels
    (None: no champion): a verdict (CHALLENGER_BETTER, CHAMPION_BETTER, NO_DIFFERENCE), or off,
    no_champion, missing. Missing: no verdict given, one of another pair, or too few impressions."""
    if rule.online == "off":
        return ONLINE_OFF, "promote.online is off"
    if pair is None:
        return ONLINE_NO_CHAMPION, "no champion to compare with online"
    if verdict is None:
        return ONLINE_MISSING, "no online verdict was given"
    if (verdict.challenger, verdict.champion) != pair:
        return ONLINE_MISSING, (f"the online verdict compares {verdict.challenger} with {verdict.champion}, "
                                f"not {pair[0]} with {pair[1]}")
    if verdict.verdict == TOO_FEW:
        return ONLINE_MISSING, (f"{verdict.impressions} interleaved impressions, fewer than the "
                                f"{verdict.min_impressions} needed" + (f"; {verdict.note}" if verdict.note else ""))
    return verdict.verdict, verdict.summary()


def online_rule(offline: tuple[bool, str], status: tuple[str, str], rule: PromoteConfig) -> tuple[bool, str]:
    """The offline rule's (promote?, why) and the online side's (status, why) -> (promote?, why).

    - off, or no champion yet: the offline rule decides.
    - the challenger loses online significantly: not promoted, whatever the offline rule says.
    - it wins online: promoted when it also wins offline (the offline rule stays a gate).
    - no significant difference, or the verdict missing: `advisory` leaves it to the offline
      rule (and says the verdict was missing); `required` refuses without an online win."""
    offline_ok, offline_why = offline
    state, online_why = status
    if state in (ONLINE_OFF, ONLINE_NO_CHAMPION):
        return offline_ok, f"{offline_why}; online: {online_why}"
    if state == CHAMPION_BETTER:
        return False, (f"loses online ({online_why}): not promoted"
                       + (f" although it wins offline ({offline_why})" if offline_ok else f"; offline: {offline_why}"))
    if state == CHALLENGER_BETTER:
        if offline_ok:
            return True, f"wins offline and online: offline {offline_why}; online {online_why}"
        return False, f"wins online ({online_why}) but not offline: {offline_why}"
    what = ("online verdict missing" if state == ONLINE_MISSING
            else "no significant online difference") + f" ({online_why})"
    if rule.online == "required":
        return False, f"refused: promote.online is required and there is no online win: {what}; offline: {offline_why}"
    return offline_ok, f"{offline_why}; {what}: the offline rule decides"


def void_guardrail(rule: PromoteConfig, dataset_dir: Path) -> str | None:
    """Why the guardrail cannot be measured on the evaluation data, or None when it can: a
    title-overlap guardrail on a split whose ads have no titles (COCO-style) has no pairs to
    measure. Any other missing guardrail still refuses (e.g. a misspelt metric)."""
    if not rule.guardrail_metric.startswith(f"{TITLE_OVERLAP}/"):
        return None
    if read_dataset(dataset_dir).split(rule.split).title_less:
        return f"the {rule.split} split's ads have no titles, so no query overlaps a title"
    return None


def decision_key(challenger: str, champion: str | None, dataset_hash: str, rule: PromoteConfig,
                 online: str | None = None) -> str:
    """The key of a decision; `online` (the online status, when promote.online is not off) is
    part of it: asking again with the same verdict changes nothing, a new verdict decides again."""
    parts = [challenger, champion, dataset_hash, rule.model_dump()] + ([online] if online is not None else [])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


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


def _log_record(client, version, folder: str, file_name: str, payload: dict) -> None:
    """`payload` as JSON at `<folder>/<file_name>` among the version's logged model artifacts
    (or its run's, for a version registered from a run's artifact path)."""
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / folder).mkdir()
        (Path(scratch) / folder / file_name).write_text(json.dumps(payload, indent=2) + "\n")
        model_id = logged_model_id(version)
        if model_id:
            client.log_model_artifacts(model_id, scratch)
        elif version.run_id:
            client.log_artifacts(version.run_id, scratch)


def _set_tags(client, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def online_tags(verdict: OnlineVerdict, decided_at: str) -> dict[str, str]:
    """The `alignsearch.online.*` tags of a verdict (on the challenger's version)."""
    share = verdict.win_share
    return {f"{ONLINE_TAG}.verdict": verdict.verdict, f"{ONLINE_TAG}.champion": verdict.champion,
            f"{ONLINE_TAG}.impressions": str(verdict.impressions), f"{ONLINE_TAG}.preferred": str(verdict.preferred),
            f"{ONLINE_TAG}.challenger_wins": str(verdict.challenger_wins),
            f"{ONLINE_TAG}.champion_wins": str(verdict.champion_wins),
            f"{ONLINE_TAG}.win_share": "nan" if math.isnan(share) else f"{share:.4f}",
            f"{ONLINE_TAG}.p_value": f"{verdict.p_value:.4g}", f"{ONLINE_TAG}.alpha": f"{verdict.alpha:g}",
            f"{ONLINE_TAG}.min_impressions": str(verdict.min_impressions), f"{ONLINE_TAG}.test": verdict.test,
            f"{ONLINE_TAG}.window": f"{verdict.start or 'start of the log'} to {verdict.end or 'now'}",
            f"{ONLINE_TAG}.note": verdict.note or "-", f"{ONLINE_TAG}.decided_at": decided_at}


def record_online_verdict(name: str, version: str, verdict: OnlineVerdict) -> None:
    """The verdict as the `alignsearch.online.*` tags of `name` v`version` (the challenger), and
    its model card updated (`alignsearch traffic compare` and promotion write it)."""
    _set_tags(mlflow_client(), name, str(version), online_tags(verdict, _now()))
    refresh_card(name, str(version))


def _record(client, name: str, version, decision: Decision, online: OnlineVerdict | None) -> None:
    """The decision on the challenger version: the JSON artifact, then the tags: the previous
    decision's key removed first, this one's written last, so a key tag always belongs to the
    tags beside it (a crash in between leaves no key, and the next run decides again)."""
    _log_record(client, version, "promotion", f"decision-{decision.key}.json", asdict(decision))
    stale = [f"{TAG}.key"] + ([f"{CHAMPION_TAG}.restored_from"] if decision.promoted else [])
    for key in stale:  # a promotion makes it champion by its own right, not restored by a rollback
        if key in (version.tags or {}):
            try:
                client.delete_model_version_tag(name, str(version.version), key)
            except Exception as exc:
                if not is_absent(exc):
                    raise registry_error(f"clearing {key} of {name} v{version.version}", exc) from exc
    tags = {f"{TAG}.outcome": decision.outcome, f"{TAG}.reason": decision.reason[:5000],
            f"{TAG}.decided_at": decision.decided_at, f"{TAG}.champion_before": decision.champion_version or "none",
            f"{TAG}.offline": "wins" if decision.offline_promote else "loses",
            f"{TAG}.offline_reason": decision.offline_reason[:5000], f"{TAG}.online": decision.online_status,
            # the card's offline table: both versions on the same split at decision time
            f"{TAG}.metrics": json.dumps({"split": decision.rule.get("split"), "dataset_hash": decision.dataset_hash,
                                          "champion_version": decision.champion_version,
                                          "challenger": decision.challenger_metrics,
                                          "champion": decision.champion_metrics})[:5000]}
    if online is not None:
        tags.update(online_tags(online, decision.decided_at))
    if decision.promoted:
        tags.update({f"{CHAMPION_TAG}.previous": decision.champion_version or "none",
                     f"{CHAMPION_TAG}.since": decision.decided_at})
    _set_tags(client, name, str(version.version), {**tags, f"{TAG}.key": decision.key})


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
                           "the catalogue lock); the decision is recorded, running it again completes it")


PROMOTION_LOCK_TIMEOUT_S = 3600.0


def promote(registry: RegistryConfig, rule: PromoteConfig, *, dataset_dir: Path | None, cache_dir: Path,
            carry_catalogue: CarryCatalogue, validation: ValidateConfig,
            online: OnlineVerdict | None = None) -> Decision:
    """Compare `challenger` with `champion` on the current split and move `champion` if the
    rule says so. Idempotent and safe to retry or run concurrently (see module docstring).

    `dataset_dir` None: the dataset the challenger was trained on (its run records it). A
    dataset given that is not that one (by DVC hash) must pass `validation` first (the
    training data passed it in the challenger's run), and the decision's reason says which
    data it was.
    `carry_catalogue(champion, challenger, then=move)`: carries the champion's live catalogue
    over and moves the alias under the catalogue lock (the live catalogue's `catalogue_carrier`
    in the flows; required, so no caller forgets the champion's ads).
    `online`: the online verdict of this challenger against this champion (the flow computes
    it from the traffic log, `components.traffic.verdict.online_evidence`); `online_rule`
    combines it with the offline rule as `rule.online` says. None, or a verdict of another
    pair, counts as missing.
    """
    with store_lock(registry.model_name, PROMOTION, timeout_s=PROMOTION_LOCK_TIMEOUT_S):
        return _promote(registry, rule, dataset_dir=dataset_dir, cache_dir=cache_dir,
                        carry_catalogue=carry_catalogue, validation=validation, online=online)


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
             carry_catalogue: CarryCatalogue, validation: ValidateConfig, online: OnlineVerdict | None) -> Decision:
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
    tags = challenger.tags or {}
    if tags.get(f"{ROLLBACK_TAG}.outcome") == ROLLED_BACK:
        return Decision(UNCHANGED, f"v{challenger_version} was rolled back at {tags.get(f'{ROLLBACK_TAG}.decided_at')} "
                        f"({tags.get(f'{ROLLBACK_TAG}.reason', '')}); a rolled-back version is not promoted again "
                        "(register a new one)", challenger_version, champion_version)
    given = dataset_dir is not None
    if dataset_dir is None:
        dataset_dir = training_dataset_dir(challenger)
        if dataset_dir is None:
            raise ValueError(f"{name} v{challenger_version} does not record the dataset it was trained on; "
                             "pass the dataset to evaluate on (alignsearch promote --data DIR)")
        log.info("evaluating on the dataset v%s was trained on: %s", challenger_version, dataset_dir)
    dhash = dataset_hash(dataset_dir)
    other_data = _other_data(dataset_dir, dhash, challenger, validation) if given else None
    pair = (None if champion_version is None
            else (contributor_label(name, challenger_version), contributor_label(name, champion_version)))
    status = online_status(online, rule, pair)
    # the verdict this decision stands on: only one of this very pair, and only when the rule reads it
    online = online if rule.online != "off" and pair is not None and online is not None and (
        online.challenger, online.champion) == pair else None
    key = decision_key(challenger_version, champion_version, dhash, rule,
                       None if status[0] == ONLINE_OFF else status[0])
    if tags.get(f"{TAG}.key") == key:
        if tags.get(f"{TAG}.outcome") == PROMOTED:  # recorded, but the alias never moved (a crash between)
            _carry_and_move(client, name, carry_catalogue, champion_version, challenger_version)
            log.info("%s v%s: completed the recorded promotion (key %s)", name, challenger_version, key)
            refresh_card(name, challenger_version)
            return Decision(PROMOTED, f"completed the promotion recorded at {tags.get(f'{TAG}.decided_at')}: "
                            f"{tags.get(f'{TAG}.reason', '')}", challenger_version, champion_version,
                            key=key, dataset_hash=dhash)
        return Decision(UNCHANGED, f"already decided ({tags.get(f'{TAG}.outcome')}) for this champion, "
                        f"dataset, rule and online verdict", challenger_version, champion_version, key=key,
                        dataset_hash=dhash)
    started = time.perf_counter()
    challenger_metrics = evaluate_version(f"models:/{name}/{challenger_version}", dataset_dir, rule, cache_dir)
    champion_metrics = (evaluate_version(f"models:/{name}/{champion_version}", dataset_dir, rule, cache_dir)
                        if champion is not None else None)
    offline = compare(challenger_metrics, champion_metrics, rule, void_guardrail(rule, Path(dataset_dir)))
    if other_data:
        offline = (offline[0], f"{offline[1]}; {other_data}")
    promote_it, reason = online_rule(offline, status, rule)
    decision = Decision(PROMOTED if promote_it else KEPT, reason, challenger_version, champion_version,
                        challenger_metrics, champion_metrics or {}, rule.model_dump(), dhash, key, _now(),
                        offline_promote=offline[0], offline_reason=offline[1], online_status=status[0],
                        online=online.as_dict() if online is not None else {})
    _record(client, name, challenger, decision, online)  # first: a crash after it is completed by the next run
    if promote_it:
        _carry_and_move(client, name, carry_catalogue, champion_version, challenger_version)
    refresh_card(name, challenger_version)
    log.info("%s v%s: %s (%s) in %.1f s", name, challenger_version, decision.outcome, reason,
             time.perf_counter() - started)
    return decision


# --------------------------------------------------------------------------- rollback


@dataclass(frozen=True)
class LiveCtr:
    """A version's own searches (not interleaved) in a time window and their CTR@10 (the share
    with a click in the top 10; `components.traffic.report` defines it). NaN without searches."""

    version: str
    searches: int
    ctr_at_10: float
    start: str | None  # ISO 8601 UTC
    end: str | None


class MeasureCtr(Protocol):
    """A version's live CTR@10 between `start` and `end` (the flows read the traffic log:
    `components.traffic.verdict.live_ctr_reader`)."""

    def __call__(self, version: str, start: datetime, end: datetime) -> LiveCtr: ...


@dataclass
class RollbackDecision:
    outcome: str  # rolled_back | kept | too_few | no_previous | no_champion
    reason: str
    champion_version: str | None = None  # the champion before the decision
    previous_version: str | None = None  # the version it replaced: where a rollback goes
    forced: bool = False
    champion_ctr: dict = field(default_factory=dict)  # LiveCtr of each, as dicts
    previous_ctr: dict = field(default_factory=dict)
    rule: dict = field(default_factory=dict)
    decided_at: str | None = None

    @property
    def rolled_back(self) -> bool:
        return self.outcome == ROLLED_BACK


def _parse_time(text: str | None) -> datetime | None:
    if not text or text == "none":
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def champion_history(tags: dict[str, str]) -> tuple[str | None, datetime | None]:
    """(the version this one replaced as champion, when it became champion) from its tags:
    `alignsearch.champion.previous` / `.since`, written at every champion move; for a version
    promoted before those tags existed, its promotion record (`champion_before`, `decided_at`)."""
    previous = tags.get(f"{CHAMPION_TAG}.previous")
    since = tags.get(f"{CHAMPION_TAG}.since")
    if previous is None and tags.get(f"{TAG}.outcome") == PROMOTED:
        previous = tags.get(f"{TAG}.champion_before")
    if since is None and tags.get(f"{TAG}.outcome") == PROMOTED:
        since = tags.get(f"{TAG}.decided_at")
    return (None if previous in (None, "", "none") else previous), _parse_time(since)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rollback(registry: RegistryConfig, rule: PromoteConfig, *, measure_ctr: MeasureCtr,
             carry_catalogue: CarryCatalogue, force: bool = False, now: datetime | None = None) -> RollbackDecision:
    """Move `champion` back to the version it replaced when its live CTR@10 over the last
    `rule.rollback_window_days` (since it became champion at most) is below that version's
    (over the same length at the end of its own time as champion) by more than
    `rule.rollback_max_ctr_drop`; `force`: whatever the numbers say. Each side needs
    `rule.min_online_impressions` searches, or nothing changes (too_few).

    A rollback is recorded on the version rolled back from (`rollback/decision-<time>.json`
    and `alignsearch.rollback.*` tags) before the alias moves, with the live catalogue carried
    as in a promotion (`carry_catalogue(current, previous, then=move)`); a crash in between is
    completed by the next run. The version rolled back to gets `alignsearch.champion.since`.
    No champion, no previous champion recorded, too few searches, or CTR within bounds:
    nothing changes."""
    with store_lock(registry.model_name, PROMOTION, timeout_s=PROMOTION_LOCK_TIMEOUT_S):
        return _rollback(registry, rule, measure_ctr=measure_ctr, carry_catalogue=carry_catalogue, force=force,
                         now=now or datetime.now(UTC))


def _rollback(registry: RegistryConfig, rule: PromoteConfig, *, measure_ctr: MeasureCtr,
              carry_catalogue: CarryCatalogue, force: bool, now: datetime) -> RollbackDecision:
    client = mlflow_client()
    name = registry.model_name
    champion = by_alias(name, CHAMPION)
    if champion is None:
        return RollbackDecision(NO_CHAMPION, f"{name}@{CHAMPION} does not exist: nothing to roll back", forced=force)
    current = str(champion.version)
    tags = champion.tags or {}
    if tags.get(f"{ROLLBACK_TAG}.outcome") == ROLLED_BACK and tags.get(f"{ROLLBACK_TAG}.to"):
        target = tags[f"{ROLLBACK_TAG}.to"]  # recorded, but the alias never moved (a crash between)
        _finish_rollback(client, name, carry_catalogue, current, target, tags[f"{ROLLBACK_TAG}.decided_at"])
        return RollbackDecision(ROLLED_BACK, f"completed the rollback recorded at {tags[f'{ROLLBACK_TAG}.decided_at']}: "
                                f"{tags.get(f'{ROLLBACK_TAG}.reason', '')}", current, target, forced=force)
    previous, since = champion_history(tags)
    if previous is None:
        return RollbackDecision(NO_PREVIOUS, f"v{current} has no previous champion recorded (it was the first "
                                "champion, or the alias was set by hand): nothing to roll back to; nothing changed",
                                current, forced=force)
    try:
        previous_tags = client.get_model_version(name, previous).tags or {}
    except Exception as exc:
        if not is_absent(exc):
            raise registry_error(f"reading {name} v{previous}", exc) from exc
        return RollbackDecision(NO_PREVIOUS, f"v{current}'s previous champion v{previous} no longer exists; "
                                "nothing changed", current, previous, forced=force)
    window = timedelta(days=rule.rollback_window_days)
    if since is None and force:
        since = now  # the windows cannot be placed; forced, it goes back all the same
    if since is None:
        return RollbackDecision(TOO_FEW_SEARCHES, f"when v{current} became champion is not recorded, so v{previous}'s "
                                "time as champion is unknown; nothing changed", current, previous, forced=force)
    _, previous_since = champion_history(previous_tags)
    current_ctr = measure_ctr(current, max(since, now - window), now)
    previous_ctr = measure_ctr(previous, max(previous_since or since - window, since - window), since)
    ctrs = (f"CTR@10 v{current} {current_ctr.ctr_at_10:.4f} over {current_ctr.searches} searches "
            f"({current_ctr.start} to {current_ctr.end}) vs v{previous} {previous_ctr.ctr_at_10:.4f} over "
            f"{previous_ctr.searches} searches ({previous_ctr.start} to {previous_ctr.end})")
    decision = RollbackDecision(KEPT, "", current, previous, force, asdict(current_ctr), asdict(previous_ctr),
                                rule.model_dump(), _iso(now))
    drop = previous_ctr.ctr_at_10 - current_ctr.ctr_at_10
    few = min(current_ctr.searches, previous_ctr.searches) < rule.min_online_impressions
    if force:
        decision.outcome = ROLLED_BACK
        decision.reason = f"forced (--force), whatever live traffic says: {ctrs}"
    elif few:
        decision.outcome = TOO_FEW_SEARCHES
        decision.reason = (f"too few searches to judge (each side needs {rule.min_online_impressions}, "
                           f"promote.min_online_impressions): {ctrs}; nothing changed")
    elif drop > rule.rollback_max_ctr_drop:
        decision.outcome = ROLLED_BACK
        decision.reason = f"CTR@10 dropped {drop:.4f} (> {rule.rollback_max_ctr_drop}): {ctrs}"
    else:
        decision.reason = (f"CTR@10 drop {drop:+.4f} within {rule.rollback_max_ctr_drop}: {ctrs}; "
                           f"v{current} stays {CHAMPION}")
    if not decision.rolled_back:
        return decision
    _log_record(client, champion, "rollback", f"decision-{now.strftime('%Y%m%dT%H%M%S')}.json", asdict(decision))
    _set_tags(client, name, current, {
        f"{ROLLBACK_TAG}.reason": decision.reason[:5000], f"{ROLLBACK_TAG}.to": previous,
        f"{ROLLBACK_TAG}.forced": str(force).lower(), f"{ROLLBACK_TAG}.decided_at": decision.decided_at,
        f"{ROLLBACK_TAG}.outcome": ROLLED_BACK})  # last: it is what a rerun completes
    _finish_rollback(client, name, carry_catalogue, current, previous, decision.decided_at)
    log.info("%s: rolled back from v%s to v%s (%s)", name, current, previous, decision.reason)
    return decision


def _finish_rollback(client, name: str, carry_catalogue: CarryCatalogue, current: str, target: str,
                     decided_at: str) -> None:
    _carry_and_move(client, name, carry_catalogue, current, target)
    _set_tags(client, name, target, {f"{CHAMPION_TAG}.since": decided_at, f"{CHAMPION_TAG}.restored_from": current})
    for version in (current, target):
        refresh_card(name, version)
