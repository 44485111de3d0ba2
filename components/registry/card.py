"""The model card: a short description on every registered version (the MLflow UI shows it on
the version's page), rebuilt from what the registry holds about the version each time
something is decided about it: registration, an online comparison, promotion, rollback
(docs/operations.md#the-model-card).

`render_card` is a plain function of `CardFacts` (markdown out); `card_facts` reads the facts
from the registry (the version's tags, its run's metrics); `write_card` does both and sets the
description. The card only reads tags other code writes (`alignsearch.promotion.*`,
`alignsearch.online.*`, `alignsearch.rollback.*`, `alignsearch.loop.*`, `dataset_hash`), so it
never disagrees with them.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

from components.registry.tracking import client as mlflow_client
from components.registry.tracking import metric_key
from components.registry.versions import CHAMPION, aliases, is_absent, registry_error

log = logging.getLogger(__name__)

# The offline metrics a card shows (the test split's, as the evaluate stage names them).
CARD_METRICS = ("ndcg@10", "recall@10", "mrr@10", "auc", "image_only/auc", "title_overlap/auc")
KNOWN_LIMITS = (
    "Offline metrics come from the dataset's test split: judged (query, ad) pairs, not live traffic.",
    "Image side: ImageNet-pretrained part features; the image encoder is not trained on ads.",
    "Clicks are position-biased: learned from with estimated inverse-propensity weights (clipped), "
    "not unbiased labels.",
    "The online verdict counts only interleaved searches (a share of traffic) and compares two "
    "versions, not absolute quality.",
)
MAX_CHARS = 5000  # MLflow keeps a version's description in 5,000 characters
REGISTERED_BESIDE_TAG = "alignsearch.card.champion_at_registration"


@dataclass
class CardFacts:
    name: str
    version: str
    system: str | None = None
    dataset_hash: str | None = None
    dataset_dir: str | None = None
    loop: dict[str, str] = field(default_factory=dict)  # alignsearch.loop.* tags, prefix dropped
    metrics: dict[str, float] = field(default_factory=dict)  # this version's offline metrics
    champion_version: str | None = None  # the champion they are shown beside
    champion_metrics: dict[str, float] = field(default_factory=dict)
    metrics_source: str = ""  # where the two columns come from
    online: dict[str, str] = field(default_factory=dict)  # alignsearch.online.* tags, prefix dropped
    promotion: dict[str, str] = field(default_factory=dict)  # alignsearch.promotion.*
    rollback: dict[str, str] = field(default_factory=dict)  # alignsearch.rollback.*
    champion: dict[str, str] = field(default_factory=dict)  # alignsearch.champion.*
    is_champion: bool = False


def _number(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _cut(text: str, limit: int = 700) -> str:
    return text if len(text) <= limit else text[:limit] + " …"


def _data_lines(f: CardFacts) -> list[str]:
    dataset = f"dataset `{f.dataset_hash}`" if f.dataset_hash else "dataset not recorded"
    lines = [f"- **Data**: {dataset}" + (f" ({f.dataset_dir})" if f.dataset_dir else "")]
    if f.loop.get("") == "on":
        lines.append(f"- **Learned from traffic**: {f.loop.get('clicks', '0')} clicks on {f.loop.get('impressions', '0')} "
                     f"searches taken in by this run's ingest; the dataset holds {f.loop.get('positives', '0')} "
                     f"click positives, {f.loop.get('negatives', '0')} skip negatives and "
                     f"{f.loop.get('new_queries', '0')} new queries beyond the base dataset "
                     f"`{f.loop.get('base_dataset', '?')}`. Matcher: {f.loop.get('warm_start', 'not recorded')}.")
    else:
        lines.append("- **Learned from traffic**: no logged clicks (trained on the dataset as built).")
    return lines


def _metrics_lines(f: CardFacts) -> list[str]:
    if not f.metrics:
        return ["No offline metrics recorded."]
    beside = f.champion_version is not None and f.champion_version != f.version
    header = f"| metric | v{f.version} |" + (f" champion v{f.champion_version} |" if beside else "")
    lines = [f"**Offline** ({f.metrics_source})", "", header, "|---|---|" + ("---|" if beside else "")]
    for metric in CARD_METRICS:
        if metric not in f.metrics and metric not in f.champion_metrics:
            continue
        row = f"| {metric} | {_number(f.metrics.get(metric))} |"
        lines.append(row + (f" {_number(f.champion_metrics.get(metric))} |" if beside else ""))
    return lines


def _online_lines(f: CardFacts) -> list[str]:
    o = f.online
    if not o.get("verdict"):
        return ["**Online**: no online verdict yet (no interleaved comparison recorded)."]
    share = o.get("win_share", "nan")
    share = "-" if share == "nan" else f"{float(share):.1%}"
    return [f"**Online** (against {o.get('champion', '?')}, {o.get('decided_at', '?')}): **{o['verdict']}**: "
            f"{o.get('impressions', '?')} interleaved impressions, {o.get('preferred', '?')} with a preference, "
            f"challenger won {o.get('challenger_wins', '?')} ({share}), p = {o.get('p_value', '?')} "
            f"(alpha {o.get('alpha', '?')}; {o.get('test', 'sign test')})."]


def _decision_lines(f: CardFacts) -> list[str]:
    lines = []
    if f.promotion.get("outcome"):
        lines.append(f"- **Promotion** ({f.promotion.get('decided_at', '?')}): {f.promotion['outcome']}: "
                     f"{_cut(f.promotion.get('reason', ''))}")
    if f.rollback.get("outcome"):
        lines.append(f"- **Rolled back** to v{f.rollback.get('to', '?')} ({f.rollback.get('decided_at', '?')}"
                     f"{', forced' if f.rollback.get('forced') == 'true' else ''}): {_cut(f.rollback.get('reason', ''))}")
    if f.is_champion:
        since = f"- **Champion** since {f.champion.get('since', 'a time not recorded')}"
        if f.champion.get("restored_from"):
            lines.append(f"{since}, again: the rollback of v{f.champion['restored_from']} restored it.")
        elif f.champion.get("previous", "none") != "none":
            lines.append(f"{since}, replacing v{f.champion['previous']}.")
        else:
            lines.append(f"{since}.")
    return lines


def render_card(f: CardFacts) -> str:
    """The card as markdown, at most MAX_CHARS characters (a long reason is cut, not the limits)."""
    head = f"### {f.name} v{f.version}" + (f" · system `{f.system}`" if f.system else "")
    sections = [[head], _data_lines(f), _metrics_lines(f), _online_lines(f), _decision_lines(f)]
    body = "\n\n".join("\n".join(lines) for lines in sections if lines)
    limits = "\n\n**Known limits**\n" + "\n".join(f"- {item}" for item in KNOWN_LIMITS)
    if len(body) + len(limits) > MAX_CHARS:
        body = body[:MAX_CHARS - len(limits) - 2] + " …"
    return body + limits


def _prefixed(tags: dict[str, str], prefix: str) -> dict[str, str]:
    """Tags under `prefix` with it dropped (`prefix` itself reads as the key "")."""
    return {key[len(prefix) + 1:] if key != prefix else "": value for key, value in tags.items()
            if key == prefix or key.startswith(prefix + ".")}


def _run_test_metrics(run) -> dict[str, float]:
    """The registered system's test-split metrics its run logged (`test/<metric>`)."""
    metrics = run.data.metrics if run is not None else {}
    return {m: float(metrics[f"test/{metric_key(m)}"]) for m in CARD_METRICS if f"test/{metric_key(m)}" in metrics}


def _version(client, name: str, version: str):
    try:
        return client.get_model_version(name, version)
    except Exception as exc:
        if is_absent(exc):
            return None
        raise registry_error(f"reading {name} v{version}", exc) from exc


def _run(client, run_id: str | None):
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception as exc:
        if is_absent(exc):
            return None
        raise registry_error(f"reading run {run_id}", exc) from exc


def card_facts(name: str, version: str) -> CardFacts:
    """What the registry says about `name` v`version`. Offline metrics: both versions' on one
    split as the latest promotion decision measured them, else this version's test metrics
    from its run beside those of the champion at its registration (each on its own dataset)."""
    client = mlflow_client()
    found = _version(client, name, version)
    if found is None:
        raise LookupError(f"{name} v{version}: no such registered version")
    tags = dict(found.tags or {})
    run = _run(client, found.run_id)
    run_tags = run.data.tags if run is not None else {}
    run_params = run.data.params if run is not None else {}
    facts = CardFacts(name, str(version), system=run_tags.get("alignsearch.system") or run_params.get("registry.system"),
                      dataset_hash=tags.get("dataset_hash"), dataset_dir=tags.get("dataset_dir"),
                      loop=_prefixed(tags, "alignsearch.loop"), online=_prefixed(tags, "alignsearch.online"),
                      promotion=_prefixed(tags, "alignsearch.promotion"),
                      rollback=_prefixed(tags, "alignsearch.rollback"), champion=_prefixed(tags, "alignsearch.champion"),
                      is_champion=aliases(name).get(CHAMPION) == str(version))
    decided = json.loads(tags["alignsearch.promotion.metrics"]) if tags.get("alignsearch.promotion.metrics") else None
    if decided and decided.get("challenger"):
        facts.metrics = decided["challenger"]
        facts.champion_version = decided.get("champion_version")
        facts.champion_metrics = decided.get("champion") or {}
        facts.metrics_source = (f"{decided.get('split')} split of dataset `{decided.get('dataset_hash')}`, both "
                                f"measured at the promotion decision of {facts.promotion.get('decided_at', '?')}")
        return facts
    facts.metrics = _run_test_metrics(run)
    beside = tags.get(REGISTERED_BESIDE_TAG)
    if beside and beside not in ("none", str(version)):
        other = _version(client, name, beside)
        facts.champion_version = beside
        facts.champion_metrics = _run_test_metrics(_run(client, other.run_id)) if other is not None else {}
        same = other is not None and (other.tags or {}).get("dataset_hash") == facts.dataset_hash
        facts.metrics_source = ("at registration; test split, each version's from its own training run" +
                                ("" if same else " (different datasets: not directly comparable)"))
    else:
        facts.metrics_source = "at registration; test split, from its training run (no champion then)"
    return facts


def write_card(name: str, version: str) -> str:
    """Rebuild `name` v`version`'s card from the registry and set it as its description."""
    text = render_card(card_facts(name, version))
    try:
        mlflow_client().update_model_version(name, str(version), description=text)
    except Exception as exc:
        raise registry_error(f"writing the model card of {name} v{version}", exc) from exc
    return text


def write_registration_card(name: str, version: str) -> str:
    """At registration: remember which version was champion then (the card's offline metrics
    stand beside its), then write the card."""
    champion = aliases(name).get(CHAMPION)
    try:
        mlflow_client().set_model_version_tag(name, str(version), REGISTERED_BESIDE_TAG, champion or "none")
    except Exception as exc:
        raise registry_error(f"tagging {name} v{version}", exc) from exc
    return write_card(name, version)


def refresh_card(name: str, version: str, *, registration: bool = False) -> str | None:
    """`write_card` (`write_registration_card` when `registration`) for the callers that decide
    something: a card describes, so a failure to write it is logged, never raised, and never
    undoes or stops the registration or decision it describes. Returns the card or None."""
    try:
        return (write_registration_card if registration else write_card)(name, str(version))
    except Exception as exc:  # noqa: BLE001
        log.warning("model card of %s v%s not written: %s: %s", name, version, type(exc).__name__, exc)
        return None
