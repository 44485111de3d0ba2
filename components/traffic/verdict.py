"""The online verdict: does live traffic prefer the challenger or the champion? Computed from the
interleaved searches of the traffic log (`interleaving.impression_preferences`), recorded on the
challenger's registered version and as a run of the monitoring experiment, and handed to
promotion as a value (docs/traffic.md#comparing-two-models-online).

The test: of the interleaved impressions of the pair, those with a preference (one model's
team got more clicks) are coin flips under "no difference"; a two-sided exact binomial sign
test (scipy.stats.binomtest, p = 0.5) over them gives the p-value. Ties (no click, or as many
for each) say nothing and are left out, as in Chapelle et al. (TOIS 2012). The verdict:
- too_few: fewer interleaved impressions than `min_impressions` (whatever the p-value);
- challenger_better / champion_better: p < alpha, the side with more wins;
- no_difference: otherwise (also when no impression has a preference).

Also here, for rollback: a model version's own live CTR@10 in a time window (`live_ctr`, over
`report.compute_report`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

from components.registry.config import PromoteConfig, RegistryConfig
from components.registry.promotion import (
    CHALLENGER_BETTER,
    CHAMPION_BETTER,
    NO_DIFFERENCE,
    TOO_FEW,
    LiveCtr,
    MeasureCtr,
    OnlineVerdict,
)
from components.registry.tracking import client, source_tags, sqlite_path
from components.registry.versions import CHALLENGER, CHAMPION, by_alias
from components.search.interleave import contributor_label
from components.traffic.config import TrafficConfig
from components.traffic.events import Events, open_store
from components.traffic.interleaving import PREFERENCE_COLUMNS, impression_preferences
from components.traffic.report import compute_report, experiment_id_for

log = logging.getLogger(__name__)

DEFAULT_MIN_IMPRESSIONS = PromoteConfig().min_online_impressions
PREFERENCES_FILE = "online_preferences.csv"
VERDICT_FILE = "online_verdict.json"


def _iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def verdict_of(preferences: pd.DataFrame, challenger_label: str, champion_label: str, alpha: float, *,
               min_impressions: int = DEFAULT_MIN_IMPRESSIONS, note: str = "", start: dt.datetime | None = None,
               end: dt.datetime | None = None) -> OnlineVerdict:
    """The verdict from `impression_preferences`' rows (one per interleaved impression)."""
    from scipy.stats import binomtest

    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    wins = preferences["preference"].value_counts()
    challenger_wins, champion_wins = int(wins.get("challenger", 0)), int(wins.get("champion", 0))
    preferred = challenger_wins + champion_wins
    p_value = float(binomtest(challenger_wins, preferred, 0.5, alternative="two-sided").pvalue) if preferred else 1.0
    if len(preferences) < min_impressions:
        verdict = TOO_FEW
    elif p_value < alpha:
        verdict = CHALLENGER_BETTER if challenger_wins > champion_wins else CHAMPION_BETTER
    else:
        verdict = NO_DIFFERENCE
    return OnlineVerdict(challenger_label, champion_label, int(len(preferences)), preferred, challenger_wins,
                         champion_wins, p_value, alpha, min_impressions, verdict, note=note, start=_iso(start),
                         end=_iso(end))


def online_verdict(events: Events, challenger_label: str, champion_label: str, alpha: float, *,
                   min_impressions: int = DEFAULT_MIN_IMPRESSIONS, start: dt.datetime | None = None,
                   end: dt.datetime | None = None) -> OnlineVerdict:
    """The online verdict of `challenger_label` against `champion_label` (contributor labels,
    "<model name>/<version>") over the interleaved impressions in `events` (see the module doc
    for the test and the rule). `start`/`end` only say which window `events` cover."""
    preferences = impression_preferences(events, challenger_label, champion_label)
    return verdict_of(preferences, challenger_label, champion_label, alpha, min_impressions=min_impressions,
                      start=start, end=end)


def read_log(traffic: TrafficConfig, *, start: dt.datetime | None = None) -> tuple[Events | None, str]:
    """The traffic log's events since `start` (None: all it holds), or (None, why) when there is
    no log: a SQLite log that does not exist is not created by reading it."""
    db = sqlite_path(traffic.store_uri)
    if db is not None and not db.is_file():
        return None, f"no traffic log at {db}"
    with open_store(traffic) as store:
        return store.read(start=start), ""


def compare_logged(traffic: TrafficConfig, challenger_label: str, champion_label: str, rule: PromoteConfig, *,
                   days: float | None = None) -> tuple[OnlineVerdict, pd.DataFrame]:
    """The verdict of a pair over the traffic log (the last `days`, else all of it), with the
    per-impression preferences it counts (`rule`: alpha and the impressions needed)."""
    end = dt.datetime.now(dt.UTC)
    start = None if days is None else end - dt.timedelta(days=days)
    events, why = read_log(traffic, start=start)
    preferences = (impression_preferences(events, challenger_label, champion_label) if events is not None
                   else pd.DataFrame({column: [] for column in PREFERENCE_COLUMNS}))
    verdict = verdict_of(preferences, challenger_label, champion_label, rule.online_alpha,
                         min_impressions=rule.min_online_impressions, note=why, start=start, end=end)
    return verdict, preferences


def online_evidence(registry: RegistryConfig, rule: PromoteConfig, traffic: TrafficConfig, *,
                    days: float | None = None) -> OnlineVerdict | None:
    """The online verdict of `challenger` against `champion` as the registry names them now, from
    the traffic log (the last `days`, else all of it), for `promote(online=...)`. None when
    promote.online is off or there is no pair to compare (no challenger, no champion, or one
    version holds both aliases)."""
    if rule.online == "off":
        return None
    challenger, champion = by_alias(registry.model_name, CHALLENGER), by_alias(registry.model_name, CHAMPION)
    if challenger is None or champion is None or str(challenger.version) == str(champion.version):
        return None
    verdict, _ = compare_logged(traffic, contributor_label(registry.model_name, challenger.version),
                                contributor_label(registry.model_name, champion.version), rule, days=days)
    return verdict


def log_verdict(verdict: OnlineVerdict, preferences: pd.DataFrame | None, *, experiment: str,
                beside_experiment: str | None = None, params: Mapping[str, str] | None = None) -> str:
    """One run in the monitoring `experiment` (MLflow must point at the store): tags naming the
    pair and the verdict, metrics (impressions, preferred, wins, win_share, p_value), the
    verdict as JSON and the per-impression preferences as CSV. Returns the run id. (The tags on
    the challenger's version: `promotion.record_online_verdict`.)"""
    from mlflow.entities import Metric, Param

    mlflow_client = client()
    experiment_id = experiment_id_for(mlflow_client, experiment, beside_experiment)
    model_name = verdict.challenger.rsplit("/", 1)[0]
    tags = {**source_tags("alignsearch traffic compare"), "alignsearch.report": "online_compare",
            "model_name": model_name, "challenger": verdict.challenger, "champion": verdict.champion,
            "alignsearch.online.verdict": verdict.verdict}
    run = mlflow_client.create_run(experiment_id, run_name=f"online {verdict.challenger} vs {verdict.champion}",
                                   tags=tags)
    run_id = run.info.run_id
    try:
        now = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
        values = {"impressions": verdict.impressions, "preferred": verdict.preferred,
                  "challenger_wins": verdict.challenger_wins, "champion_wins": verdict.champion_wins,
                  "win_share": verdict.win_share, "p_value": verdict.p_value}
        mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in values.items()
                                                 if not math.isnan(float(v))],
                                params=[Param(k, str(v)) for k, v in {
                                    "alpha": verdict.alpha, "min_impressions": verdict.min_impressions,
                                    "test": verdict.test, **(params or {})}.items()])
        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / VERDICT_FILE).write_text(json.dumps(verdict.as_dict(), indent=2) + "\n")
            if preferences is not None:
                preferences.to_csv(Path(scratch) / PREFERENCES_FILE, index=False)
            mlflow_client.log_artifacts(run_id, scratch)
    except BaseException:
        mlflow_client.set_terminated(run_id, "FAILED")
        raise
    mlflow_client.set_terminated(run_id)
    return run_id


def live_ctr(events: Events, model_name: str, version: str, start: dt.datetime, end: dt.datetime) -> LiveCtr:
    """`model_name` v`version`'s own searches with start <= time < end (interleaved ones left
    out: half their results are another model's) and their CTR@10 (`report.compute_report`'s:
    the share of searches with a click in the top 10; NaN without searches)."""
    searches = events.impressions
    times = pd.to_datetime(searches["time"], utc=True)
    own = searches[(searches["model_name"].astype(str) == model_name)
                   & (searches["model_version"].astype(str) == str(version))
                   & searches["contributors"].map(lambda c: c is None or (isinstance(c, float) and math.isnan(c)))
                   & (times >= pd.Timestamp(start)) & (times < pd.Timestamp(end))]
    report = compute_report(dataclasses.replace(events, impressions=own), per_catalogue=False)
    count = int(report["searches"].sum()) if len(report) else 0
    ctr = float((report["ctr@10"] * report["searches"]).sum() / count) if count else math.nan
    return LiveCtr(str(version), count, ctr, _iso(start), _iso(end))


def live_ctr_reader(traffic: TrafficConfig, model_name: str) -> MeasureCtr:
    """What `promotion.rollback` measures with: a version's live CTR@10 from the traffic log
    (no log: no searches)."""

    def measure(version: str, start: dt.datetime, end: dt.datetime) -> LiveCtr:
        events, why = read_log(traffic, start=start)
        if events is None:
            log.info("%s v%s: %s; no live CTR", model_name, version, why)
            return LiveCtr(str(version), 0, math.nan, _iso(start), _iso(end))
        return live_ctr(events, model_name, version, start, end)

    return measure
