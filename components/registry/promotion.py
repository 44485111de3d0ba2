"""Promotion: move `champion` to the `challenger` version when, on the same current test split,
it is better by at least `min_delta` and no guardrail metric drops by more than allowed.

Every decision is recorded on the challenger version: tags (`alignsearch.promotion.*`) and a
JSON artifact in its logged model (`promotion/decision-<key>.json`) with both versions'
metrics, the rule and the outcome. A decision is keyed by (challenger, champion, dataset
hash, rule); asking again with the same key changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from components.registry.config import PromoteConfig, RegistryConfig
from components.registry.versions import CHALLENGER, CHAMPION, by_alias, download_bundle

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


def compare(challenger: dict[str, float], champion: dict[str, float] | None, rule: PromoteConfig) -> tuple[bool, str]:
    """The rule itself: (promote?, why). `champion` None means there is no champion yet."""
    if rule.metric not in challenger:
        raise ValueError(f"challenger metrics lack {rule.metric!r} (have {sorted(challenger)})")
    if champion is None:
        return True, "no champion yet: the first valid challenger is promoted"
    delta = challenger[rule.metric] - champion[rule.metric]
    guard_old, guard_new = champion.get(rule.guardrail_metric), challenger.get(rule.guardrail_metric)
    if guard_old is not None and guard_new is not None and guard_old - guard_new > rule.guardrail_max_drop:
        return False, (f"guardrail {rule.guardrail_metric} dropped {guard_old - guard_new:.4f} "
                       f"(> {rule.guardrail_max_drop}): {guard_old:.4f} -> {guard_new:.4f}")
    if delta <= 0 or delta < rule.min_delta:
        return False, (f"{rule.metric} {challenger[rule.metric]:.4f} vs champion {champion[rule.metric]:.4f} "
                       f"(delta {delta:+.4f}); needs to be better by >= {rule.min_delta}")
    return True, (f"{rule.metric} {challenger[rule.metric]:.4f} vs champion {champion[rule.metric]:.4f} "
                  f"(delta {delta:+.4f} >= {rule.min_delta}); guardrail {rule.guardrail_metric} held")


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
    tags = {f"{TAG}.outcome": decision.outcome, f"{TAG}.key": decision.key, f"{TAG}.reason": decision.reason[:5000],
            f"{TAG}.decided_at": decision.decided_at,
            f"{TAG}.champion_before": decision.champion_version or "none"}
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version.version), key, value)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "promotion"
        folder.mkdir()
        (folder / f"decision-{decision.key}.json").write_text(json.dumps(asdict(decision), indent=2) + "\n")
        model_id = logged_model_id(version)
        if model_id:
            client.log_model_artifacts(model_id, scratch)
        elif version.run_id:  # a version registered from a run's artifact path
            client.log_artifacts(version.run_id, scratch)


def promote(registry: RegistryConfig, rule: PromoteConfig, *, dataset_dir: Path, cache_dir: Path) -> Decision:
    """Compare `challenger` with `champion` on the current split and move `champion` if the
    rule says so. Idempotent (see module docstring)."""
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
    dhash = dataset_hash(dataset_dir)
    key = decision_key(challenger_version, champion_version, dhash, rule)
    recorded = (challenger.tags or {}).get(f"{TAG}.key")
    if recorded == key:
        return Decision(UNCHANGED, f"already decided ({challenger.tags.get(f'{TAG}.outcome')}) for this champion, "
                        f"dataset and rule", challenger_version, champion_version, key=key, dataset_hash=dhash)
    started = time.perf_counter()
    challenger_metrics = evaluate_version(f"models:/{name}/{challenger_version}", dataset_dir, rule, cache_dir)
    champion_metrics = (evaluate_version(f"models:/{name}/{champion_version}", dataset_dir, rule, cache_dir)
                        if champion is not None else None)
    promote_it, reason = compare(challenger_metrics, champion_metrics, rule)
    decision = Decision(PROMOTED if promote_it else KEPT, reason, challenger_version, champion_version,
                        challenger_metrics, champion_metrics or {}, rule.model_dump(), dhash, key,
                        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    if promote_it:
        client.set_registered_model_alias(name, CHAMPION, challenger_version)
    _record(client, name, challenger, decision)
    log.info("%s v%s: %s (%s) in %.1f s", name, challenger_version, decision.outcome, reason,
             time.perf_counter() - started)
    return decision
