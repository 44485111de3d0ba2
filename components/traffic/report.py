"""`traffic report`: how the served models do with people, per model version, catalogue version
and day, computed from the traffic log; logged to MLflow with a plot over time
(docs/traffic.md#the-traffic-report).

`compute_report` is a plain function of the events (a DataFrame out); `training_vocabularies`
finds what each model version was trained on (query drift); `log_report` writes the table and
the plot and records them as one run of the monitoring experiment.

Conventions (each metric once, here):
- A search is one impression; its clicks are the clicks whose request id is its event id, counted
  on the search's day (UTC), whenever they came.
- ctr@1 / ctr@10: the share of searches with a click at position 1 / at positions 1-10.
- clicks_per_search: clicks / searches. abandonment: the share of searches with no click.
- mrr_clicked: the mean reciprocal rank (1/position) of a search's first click, over the
  searches WITH a click only (an abandoned search has no first click; abandonment counts them).
- latency_p50_ms / latency_p99_ms: percentiles (linear interpolation, numpy's default) of the
  searches' `took_ms`; empty (NaN) where the log has no times (imports, older logs).
- query_drift: the share of searches whose query has at least one content word (the tokeniser of
  components/text: lower-case words of 3+ letters, stop words dropped) outside the words of the
  training split's query texts and ad titles of the dataset the model version was trained on;
  NaN where that dataset is unknown, and hashed queries (traffic.redact_queries: hash) left out.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from components.data.format import ADS_FILE, QUERIES_FILE, DatasetFormatError
from components.figures import new_figure, save_figure
from components.registry.tracking import client, metric_key, source_tags
from components.registry.versions import is_absent, registry_error, training_dataset_dir
from components.text.vocabulary import content_words
from components.traffic.events import Events

log = logging.getLogger(__name__)

KEYS = ("model_name", "model_version", "catalogue_version", "date")
METRICS = ("searches", "clicks", "ctr@1", "ctr@10", "clicks_per_search", "mrr_clicked", "abandonment",
           "latency_p50_ms", "latency_p99_ms", "query_drift")
UNKNOWN = "-"  # a key the log does not have (an imported search without a model version)
HASHED_QUERY = "sha256:"  # the prefix traffic.redact_queries=hash writes

TABLE_FILE = "traffic_report.csv"  # per model version, catalogue version and day
BY_VERSION_FILE = "traffic_by_version.csv"  # per model version and day: what the plot and metrics show
PLOT_FILE = "traffic_report.png"

ModelVersion = tuple[str, str]  # (model name, version) as the log names them


# --- the numbers -------------------------------------------------------------------------------

def _per_search(events: Events) -> pd.DataFrame:
    """One row per search: its keys, clicks, first click position, latency and query."""
    searches = events.impressions
    frame = pd.DataFrame({
        "event_id": searches["event_id"].astype(str),
        "model_name": searches["model_name"].fillna(UNKNOWN).astype(str),
        "model_version": searches["model_version"].fillna(UNKNOWN).astype(str),
        "catalogue_version": searches["catalogue_version"].fillna(UNKNOWN).astype(str),
        "date": pd.to_datetime(searches["time"], utc=True).dt.strftime("%Y-%m-%d"),
        "query": searches["query"].astype(str),
        "took_ms": pd.to_numeric(searches["took_ms"], errors="coerce") if "took_ms" in searches.columns
        else np.nan,
    })
    clicks = events.clicks
    per_request = (clicks.groupby(clicks["request_id"].astype(str))["position"].agg(["count", "min"])
                   if len(clicks) else pd.DataFrame(columns=["count", "min"]))
    frame["clicks"] = frame["event_id"].map(per_request["count"]).fillna(0).astype(int)
    frame["first_click"] = frame["event_id"].map(per_request["min"]).astype(float)
    return frame


def _drift(queries: pd.Series, vocabulary: frozenset[str] | None) -> pd.Series:
    if vocabulary is None:
        return pd.Series(np.nan, index=queries.index)
    return queries.map(lambda q: np.nan if q.startswith(HASHED_QUERY)
                       else float(any(w not in vocabulary for w in content_words(q))))


def _percentile(values: pd.Series, q: float) -> float:
    values = values.dropna()
    return float(np.percentile(values, q)) if len(values) else np.nan


def compute_report(events: Events, vocabularies: Mapping[ModelVersion, frozenset[str] | None] | None = None, *,
                   per_catalogue: bool = True, model_name: str | None = None) -> pd.DataFrame:
    """The metrics (METRICS, conventions in the module doc) per model name, model version,
    catalogue version (unless `per_catalogue` is False) and UTC day of the search, sorted by
    those. `vocabularies`: the training words of each (model name, version), for query drift
    (missing or None: drift is NaN). `model_name`: only that model's searches."""
    keys = [k for k in KEYS if per_catalogue or k != "catalogue_version"]
    if model_name is not None:
        events = dataclasses.replace(events, impressions=events.impressions[
            events.impressions["model_name"] == model_name])
    if events.impressions.empty:
        return pd.DataFrame(columns=[*keys, *METRICS])
    frame = _per_search(events)
    vocabularies = vocabularies or {}
    frame["drift"] = np.nan
    for (name, version), part in frame.groupby(["model_name", "model_version"]):
        frame.loc[part.index, "drift"] = _drift(part["query"], vocabularies.get((name, version)))
    rows = []
    for key, part in frame.groupby(keys, sort=False):
        clicked = part["clicks"] > 0
        first = part.loc[clicked, "first_click"]
        rows.append({
            **dict(zip(keys, key, strict=True)),
            "searches": len(part),
            "clicks": int(part["clicks"].sum()),
            "ctr@1": float((part["first_click"] == 1).mean()),
            "ctr@10": float((part["first_click"] <= 10).mean()),
            "clicks_per_search": float(part["clicks"].mean()),
            "mrr_clicked": float((1.0 / first).mean()) if len(first) else np.nan,
            "abandonment": float((~clicked).mean()),
            "latency_p50_ms": _percentile(part["took_ms"], 50),
            "latency_p99_ms": _percentile(part["took_ms"], 99),
            "query_drift": float(part["drift"].mean()) if part["drift"].notna().any() else np.nan,
        })
    report = pd.DataFrame(rows)
    order = pd.to_numeric(report["model_version"], errors="coerce")
    return (report.assign(_version=order).sort_values(["model_name", "_version", "model_version", *keys[2:]])
            .drop(columns="_version").reset_index(drop=True))


# --- the training words of a model version ---------------------------------------------------

def training_vocabulary(dataset_dir: Path) -> frozenset[str]:
    """The content words of the training split's query texts and ad titles of a dataset."""
    words: set[str] = set()
    for file_name, column in ((QUERIES_FILE, "text"), (ADS_FILE, "title")):
        path = Path(dataset_dir) / file_name
        if not path.is_file():
            raise DatasetFormatError(f"{path}: file not found (query drift reads the training words from it)")
        table = pd.read_parquet(path)
        if column not in table.columns:  # a title-less dataset (COCO-style) has no titles
            continue
        for text in table.loc[table["split"] == "train", column].dropna().astype(str):
            words.update(content_words(text))
    return frozenset(words)


def dataset_dir_of(model_name: str, version: str) -> Path | None:
    """The dataset a registered version was trained on (its recorded `dataset_dir`), from the
    configured MLflow registry; None when the version or the record is not there."""
    if not version.isdigit():
        return None
    try:
        found = client().get_model_version(model_name, version)
    except Exception as exc:
        if is_absent(exc):
            return None
        raise registry_error(f"reading {model_name} v{version}", exc) from exc
    return training_dataset_dir(found)


def training_vocabularies(versions: Iterable[ModelVersion], *, dataset_dir_of=dataset_dir_of
                          ) -> dict[ModelVersion, frozenset[str] | None]:
    """The training words of each (model name, version): None when its dataset is unknown or
    not on this machine (its drift is then NaN, and the log says why)."""
    out: dict[ModelVersion, frozenset[str] | None] = {}
    read: dict[Path, frozenset[str]] = {}
    for name, version in dict.fromkeys(versions):
        dataset_dir = dataset_dir_of(name, version) if UNKNOWN not in (name, version) else None
        if dataset_dir is None or not Path(dataset_dir).is_dir():
            log.info("%s v%s: training dataset %s; no query drift for it", name, version,
                        "not recorded" if dataset_dir is None else f"{dataset_dir} not found")
            out[(name, version)] = None
            continue
        if dataset_dir not in read:
            read[dataset_dir] = training_vocabulary(dataset_dir)
        out[(name, version)] = read[dataset_dir]
    return out


def model_versions(events: Events) -> list[ModelVersion]:
    """The (model name, version) pairs the searches name, as the report keys them."""
    searches = events.impressions
    pairs = zip(searches["model_name"].fillna(UNKNOWN).astype(str),
                searches["model_version"].fillna(UNKNOWN).astype(str), strict=True)
    return list(dict.fromkeys(pairs))


# --- files and plot ---------------------------------------------------------------------------

def _label(name: str, version: str) -> str:
    return f"{name} v{version}"


def plot_report(by_version: pd.DataFrame, out_path: Path) -> Path:
    """Searches, CTR@10, abandonment and latency (p50 solid, p99 dashed) per UTC day, one line per
    model version (the `per_catalogue=False` report)."""
    from matplotlib.dates import AutoDateLocator, DateFormatter, DayLocator
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(12.0, 7.5)
    axes = fig.subplots(2, 2, sharex=True).ravel()
    panels = (("searches", "searches per day", None), ("ctr@10", "CTR@10 (share of searches with a click in the top 10)", (0, 1)),
              ("abandonment", "abandonment (share of searches with no click)", (0, 1)),
              ("latency_p50_ms", "latency (ms): p50 solid ●, p99 dashed ▲", None))
    frame = by_version.assign(day=pd.to_datetime(by_version["date"]))
    for i, ((name, version), part) in enumerate(frame.groupby(["model_name", "model_version"], sort=False)):
        part = part.sort_values("day")
        colour = f"C{i % 10}"
        for ax, (metric, _, _) in zip(axes, panels, strict=True):
            ax.plot(part["day"], part[metric], marker="o", color=colour, linewidth=1.8, label=_label(name, version))
        axes[3].plot(part["day"], part["latency_p99_ms"], marker="^", linestyle="--", color=colour, linewidth=1.2)
    days = frame["day"].drop_duplicates()
    for ax, (_, title, limits) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=11)
        if limits is not None:  # a little room, so a point at 0 or 1 is not cut in half
            ax.set_ylim(limits[0] - 0.03, limits[1] + 0.03)
        ax.grid(True, alpha=0.3)
        # Whole days on the axis (a report of two days would otherwise get hourly ticks).
        ax.xaxis.set_major_locator(DayLocator() if len(days) <= 14 else AutoDateLocator())
        ax.xaxis.set_major_formatter(DateFormatter("%b %d"))
        if len(days):
            ax.set_xlim(days.min() - pd.Timedelta(hours=12), days.max() + pd.Timedelta(hours=12))
    for ax in (axes[0], axes[3]):  # counts and times from 0: a flat line is not a wild swing
        ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1] * 1.05, 1.0))
    axes[0].yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(title="model version", fontsize=9)
    if len(frame):
        fig.suptitle(f"Traffic per day (UTC), {frame['date'].min()} to {frame['date'].max()}", fontsize=13)
    return save_figure(fig, out_path)


def write_report(table: pd.DataFrame, by_version: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """The table (per catalogue version), the per-version table and the plot under `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / TABLE_FILE, index=False)
    by_version.to_csv(out_dir / BY_VERSION_FILE, index=False)
    return {"table": out_dir / TABLE_FILE, "by_version": out_dir / BY_VERSION_FILE,
            "plot": plot_report(by_version, out_dir / PLOT_FILE)}


# --- MLflow --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ReportRun:
    run_id: str
    experiment_id: str
    files: dict[str, Path]


def experiment_id_for(mlflow_client, name: str, beside: str | None) -> str:
    """The monitoring experiment's id, created on first use; its artifacts go under those of the
    experiment `beside` (the project's) when that one keeps them on local disk."""
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None  # a server decides
    main = mlflow_client.get_experiment_by_name(beside) if beside else None
    if main is not None and main.artifact_location.startswith("file:"):
        location = main.artifact_location.rstrip("/") + "/monitoring"
    return mlflow_client.create_experiment(name, artifact_location=location)


def _metric_name(name: str, version: str, metric: str) -> str:
    # MLflow takes letters, digits, _ - . / and spaces in a metric name.
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", f"{name}/v{version}/{metric_key(metric)}")


def _day_ms(date: str) -> int:
    return int(dt.datetime.fromisoformat(date).replace(tzinfo=dt.UTC).timestamp() * 1000)


def log_report(table: pd.DataFrame, by_version: pd.DataFrame, *, experiment: str, out_dir: Path,
               beside_experiment: str | None = None, params: Mapping[str, str] | None = None) -> ReportRun:
    """One run in `experiment` (MLflow must point at the store: `configure_mlflow`): tags with the
    model names and versions, per model version the metrics of each day (`<model>/v<N>/ctr_at_10`,
    timestamp = the day's 00:00 UTC, step = days since the report's first day), and the tables
    and plot (written to `out_dir` first) as artifacts. Returns the run."""
    from mlflow.entities import Metric, Param

    files = write_report(table, by_version, out_dir)
    mlflow_client = client()
    experiment_id = experiment_id_for(mlflow_client, experiment, beside_experiment)
    pairs = list(dict.fromkeys(zip(by_version["model_name"], by_version["model_version"], strict=True)))
    names = sorted({name for name, _ in pairs})
    tags = {**source_tags("alignsearch traffic report"),
            "alignsearch.report": "traffic",
            "model_name": ",".join(names),
            "model_version": ",".join(dict.fromkeys(version for _, version in pairs)),
            "model_versions": ", ".join(_label(n, v) for n, v in pairs),
            "searches": str(int(by_version["searches"].sum()))}
    first_day = by_version["date"].min() if len(by_version) else None
    run_name = f"traffic {first_day} to {by_version['date'].max()}" if first_day else "traffic (no searches)"
    run = mlflow_client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        metrics = []
        for row in by_version.to_dict(orient="records"):
            step = (dt.date.fromisoformat(row["date"]) - dt.date.fromisoformat(first_day)).days
            for metric in METRICS:
                value = row[metric]
                if value is not None and not pd.isna(value):
                    metrics.append(Metric(_metric_name(row["model_name"], row["model_version"], metric),
                                          float(value), _day_ms(row["date"]), step))
        for start in range(0, len(metrics), 1000):  # MLflow takes 1,000 at a time
            mlflow_client.log_batch(run_id, metrics=metrics[start:start + 1000])
        if params:
            mlflow_client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        for path in files.values():
            mlflow_client.log_artifact(run_id, str(path))
    except BaseException:
        mlflow_client.set_terminated(run_id, "FAILED")
        raise
    mlflow_client.set_terminated(run_id)
    return ReportRun(run_id=run_id, experiment_id=experiment_id, files=files)
