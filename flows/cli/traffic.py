"""`alignsearch traffic import|report|compare|ingest|simulate|prune|export`: the traffic log
(docs/traffic.md) from the command line: a team's own events in, how the models do with
people, which of two models people prefer, the next dataset version, simulated users,
retention, and Parquet exports."""

from __future__ import annotations

import datetime as dt
import enum
import math
from pathlib import Path
from typing import Annotated, Optional, get_args

import typer
from rich import box
from rich.table import Table

from components.outputs import redact_uri
from components.traffic.events import open_store, utc_now
from components.traffic.importer import (
    FileFormat,
    ImportFileError,
    format_import_report,
    import_events,
    known_ad_ids,
)
from flows.cli.options import (
    PARAMS_FILE,
    ParamsOption,
    SetOption,
    console,
    err_console,
    load_config,
)

traffic_app = typer.Typer(help="The traffic log: import a team's events, report how the models do, ingest "
                          "searches and clicks into the next dataset version, prune, export.", no_args_is_help=True)

ImportFormat = enum.Enum("ImportFormat", {name: name for name in get_args(FileFormat)}, type=str)

BaseDataOption = Annotated[Optional[Path], typer.Option(  # noqa: UP045 - Typer needs Optional here
    "--data", help="The base dataset (default: the one the flow trains on: params data.path, else data/<data.source>).")]


def _base_dataset(cfg, data: Path | None) -> Path:
    """`--data`, else the dataset the flow trains on."""
    if data is not None:
        return Path(data)
    from flows.retrain import flow_dataset_dir  # Prefect: only when it is needed

    return flow_dataset_dir(cfg.data)


def _when(text: str | None, option: str) -> dt.datetime | None:
    """An ISO 8601 date or time from the command line, in UTC (UTC when it has no zone)."""
    if text is None:
        return None
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        err_console.print(f"[red]{option} {text!r}: not an ISO 8601 date or time (e.g. 2025-03-01 or "
                          "2025-03-01T12:00:00+02:00)[/red]")
        raise typer.Exit(2) from exc
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


@traffic_app.command("import")
def traffic_import(
    file: Annotated[Path, typer.Argument(help="Impressions and clicks: one row per ad shown or clicked "
                                         "(docs/traffic.md#importing-a-teams-own-logs).")],
    data: BaseDataOption = None,
    fmt: Annotated[Optional[ImportFormat], typer.Option("--format", help="File format (default: by extension).")] = None,  # noqa: UP045
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Import a team's impressions and clicks (CSV, Parquet, JSON lines) into the traffic log.

    Great Expectations checks every rule first; any failed rule names the rows, and nothing is
    imported (exit 1). Events the log holds already are skipped: importing a file twice adds nothing."""
    cfg = load_config(params, set_)
    dataset_dir = _base_dataset(cfg, data)
    ad_ids = known_ad_ids(dataset_dir)
    try:
        with open_store(cfg.traffic) as store:
            result = import_events(file, store, cfg.traffic, ad_ids=ad_ids, fmt=fmt.value if fmt else None,
                                   ads_source=str(dataset_dir / "ads.parquet"))
    except ImportFileError as exc:
        err_console.print(f"[red]Refused, nothing imported:[/red] {exc}", soft_wrap=True, markup=False)
        raise typer.Exit(1) from exc
    (console if result.success else err_console).print(format_import_report(result), markup=False, soft_wrap=True)
    if not result.success:
        raise typer.Exit(1)


def _cell(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


REPORT_COLUMNS = (("searches", "searches"), ("clicks", "clicks"), ("ctr@1", "CTR@1"), ("ctr@10", "CTR@10"),
                  ("clicks_per_search", "clicks per search"), ("mrr_clicked", "MRR of the first click*"),
                  ("abandonment", "abandonment"), ("latency_p50_ms", "latency p50 ms"),
                  ("latency_p99_ms", "latency p99 ms"), ("query_drift", "query drift"))


def _report_table(title: str, report) -> Table:
    # One column per model version, catalogue version and day, one row per metric: a week of
    # one model fits a terminal, where a row per day with twelve columns did not.
    table = Table(title=title, caption="* MRR of the first click, over searches with a click; drift: share of "
                  "queries with a word outside the training words; - : no data", box=box.SIMPLE_HEAD)
    table.add_column("")
    rows = report.to_dict(orient="records")
    for row in rows:
        table.add_column(f"{row['model_name']} v{row['model_version']}\n{row['catalogue_version']} · "
                         f"{str(row['date'])[5:10]}", justify="right")
    for column, header in REPORT_COLUMNS:
        table.add_row(header, *(_cell(row[column]) for row in rows))
    return table


@traffic_app.command("report")
def traffic_report(
    model: Annotated[Optional[str], typer.Option("--model", help="Only this registered model's searches (default: all).")] = None,  # noqa: UP045
    days: Annotated[int, typer.Option("--days", min=1, help="The last N days (UTC) of searches.")] = 7,
    out: Annotated[Optional[Path], typer.Option("--out", help="Where the tables and plot go (default: params paths.reports_dir/traffic).")] = None,  # noqa: UP045
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """How the models do with people, per model version, catalogue version and day; to MLflow.

    Searches, CTR@1, CTR@10, clicks per search, MRR of the first click, abandonment, latency
    p50/p99 and query drift, printed and logged to MLflow (experiment
    traffic.monitoring_experiment) with the table and a plot over time."""
    from components.registry.tracking import configure_mlflow  # MLflow: when a report runs
    from components.traffic.report import (
        compute_report,
        log_report,
        model_versions,
        training_vocabularies,
    )

    cfg = load_config(params, set_)
    end = utc_now()
    start = end - dt.timedelta(days=days)
    with open_store(cfg.traffic) as store:
        events = store.read(start=start)
    table_title = f"Traffic {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC" + (f", model {model}" if model else "")
    if model is not None:
        events.impressions = events.impressions[events.impressions["model_name"] == model]
    if events.impressions.empty:
        console.print(f"{table_title}: no searches logged; nothing reported.", soft_wrap=True)
        return
    configure_mlflow(cfg.registry)
    vocabularies = training_vocabularies(model_versions(events))
    table = compute_report(events, vocabularies)
    by_version = compute_report(events, vocabularies, per_catalogue=False)
    out_dir = out or Path(cfg.paths.reports_dir) / "traffic"
    run = log_report(table, by_version, experiment=cfg.traffic.monitoring_experiment, out_dir=out_dir,
                     beside_experiment=cfg.registry.experiment,
                     params={"days": str(days), "start": start.isoformat(timespec="seconds"),
                             "end": end.isoformat(timespec="seconds"), "model": model or "all",
                             "store_uri": redact_uri(cfg.traffic.store_uri)})
    console.print(_report_table(table_title, table))
    unknown = [f"{name} v{version}" for (name, version), words in vocabularies.items() if words is None]
    if unknown:
        console.print(f"No query drift for {', '.join(unknown)}: training dataset not recorded or not on this machine.",
                      soft_wrap=True)
    console.print(f"MLflow: run {run.run_id} in experiment {cfg.traffic.monitoring_experiment!r}; "
                  f"plot {run.files['plot']}, table {run.files['table']}", soft_wrap=True)


@traffic_app.command("compare")
def traffic_compare(
    challenger: Annotated[Optional[str], typer.Option("--challenger", help="Model URI (default: models:/<registry.model_name>@challenger).")] = None,  # noqa: UP045
    champion: Annotated[Optional[str], typer.Option("--champion", help="Model URI (default: models:/<registry.model_name>@champion).")] = None,  # noqa: UP045
    days: Annotated[Optional[float], typer.Option("--days", min=0, help="Only the last N days of searches (default: the whole log).")] = None,  # noqa: UP045
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """The online verdict: which of two models people prefer on interleaved searches.

    Interleaved impressions of the pair, those with a preference, each model's wins, the
    challenger's win share and the p-value of a two-sided binomial sign test over the
    impressions with a preference (ties left out); verdict challenger_better, champion_better,
    no_difference or too_few (fewer than promote.min_online_impressions). Recorded on the
    challenger's registered version (tags alignsearch.online.*, its model card) and as a run of
    the monitoring experiment."""
    from components.registry.promotion import record_online_verdict
    from components.registry.tracking import configure_mlflow
    from components.registry.versions import describe
    from components.search.interleave import contributor_label
    from components.traffic.verdict import compare_logged, log_verdict

    cfg = load_config(params, set_)
    configure_mlflow(cfg.registry)
    found = {}
    for role, uri in (("challenger", challenger), ("champion", champion)):
        uri = uri or f"models:/{cfg.registry.model_name}@{role}"
        found[role] = describe(uri)
        if not found[role]:
            err_console.print(f"[red]--{role} {uri}: no such registered model version[/red]", soft_wrap=True)
            raise typer.Exit(2)
    labels = [contributor_label(found[role]["name"], found[role]["version"]) for role in ("challenger", "champion")]
    if labels[0] == labels[1]:
        err_console.print(f"[red]challenger and champion are the same version ({labels[0]}): nothing to compare[/red]",
                          soft_wrap=True)
        raise typer.Exit(2)
    verdict, preferences = compare_logged(cfg.traffic, *labels, cfg.promote, days=days)
    record_online_verdict(found["challenger"]["name"], found["challenger"]["version"], verdict)
    run_id = log_verdict(verdict, preferences, experiment=cfg.traffic.monitoring_experiment,
                         beside_experiment=cfg.registry.experiment,
                         params={"days": "all" if days is None else f"{days:g}",
                                 "store_uri": redact_uri(cfg.traffic.store_uri)})
    table = Table(title=f"Online: {verdict.challenger} (challenger) vs {verdict.champion} (champion), "
                  + ("the whole log" if days is None else f"the last {days:g} days"), box=box.SIMPLE_HEAD)
    table.add_column("")
    table.add_column("", justify="right")
    for label, value in (("interleaved impressions", str(verdict.impressions)),
                         ("with a preference", str(verdict.preferred)),
                         ("challenger wins", str(verdict.challenger_wins)),
                         ("champion wins", str(verdict.champion_wins)),
                         ("challenger win share", _cell(verdict.win_share)),
                         ("p-value, two-sided binomial sign test", f"{verdict.p_value:.3g}"),
                         ("verdict", verdict.verdict)):
        table.add_row(label, value)
    console.print(table)
    console.print(f"alpha {verdict.alpha:g}; a verdict needs {verdict.min_impressions} interleaved impressions "
                  "(promote.online_alpha, promote.min_online_impressions)" + (f"; {verdict.note}" if verdict.note else ""),
                  soft_wrap=True)
    console.print(f"Recorded on {found['challenger']['name']} v{found['challenger']['version']} (tags "
                  f"alignsearch.online.*, model card); MLflow run {run_id} in experiment "
                  f"{cfg.traffic.monitoring_experiment!r}", soft_wrap=True)


@traffic_app.command("ingest")
def traffic_ingest(
    data: BaseDataOption = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="The dataset it writes (default: params traffic.dataset_dir).")] = None,  # noqa: UP045
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Searches and clicks logged since the last ingest into the next dataset version.

    New queries, clicked ads as positives (weighted for position bias), skipped ads as
    negatives, written to traffic.dataset_dir. Nothing new: nothing is written."""
    from components.traffic.ingest import ingest

    cfg = load_config(params, set_)
    base_dir = _base_dataset(cfg, data)
    out_dir = out or Path(cfg.traffic.dataset_dir)
    try:
        with open_store(cfg.traffic) as store:
            result = ingest(base_dir, out_dir, store, cfg.traffic)
    except ValueError as exc:
        err_console.print(f"[red]Ingest refused:[/red] {exc}", soft_wrap=True, markup=False)
        raise typer.Exit(1) from exc
    summary = result.as_dict()
    table = Table(title=f"Ingest of {base_dir} -> {result.dataset_dir}: "
                  + ("new version" if result.changed else "nothing new, unchanged"))
    table.add_column("")
    table.add_column("", justify="right")
    for key, value in summary.items():
        if key != "dataset_dir":
            table.add_row(key, str(value))
    console.print(table)


@traffic_app.command("simulate")
def traffic_simulate(
    url: Annotated[str, typer.Option("--url", help="The running service, e.g. http://127.0.0.1:8080.")],
    data: BaseDataOption = None,
    searches: Annotated[Optional[int], typer.Option("--searches", help="Searches to issue (default: params traffic.simulator.num_searches).")] = None,  # noqa: UP045
    split: Annotated[Optional[str], typer.Option("--split", help="Whose queries the users type (default: params traffic.simulator.split).")] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed of the users (default: params traffic.simulator.seed).")] = None,  # noqa: UP045
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Simulated users search a running service over HTTP and click relevant ads (qrels) with a
    known position bias and some noise (docs/traffic.md#simulated-users): a demo, a load, or the
    loop's clicks without real people. The service logs them as it logs anyone's."""
    import os

    from components.data.format import read_dataset
    from components.search.config import API_KEY_ENV
    from components.traffic.simulator import run_users

    cfg = load_config(params, set_)
    changes = {key: value for key, value in (("num_searches", searches), ("split", split), ("seed", seed))
               if value is not None}
    try:
        sim = cfg.traffic.simulator.model_validate({**cfg.traffic.simulator.model_dump(), **changes})
    except ValueError as exc:
        err_console.print(f"[red]Invalid simulator settings:[/red] {exc}", soft_wrap=True, markup=False)
        raise typer.Exit(2) from exc
    dataset = read_dataset(_base_dataset(cfg, data))
    headers = {"X-API-Key": os.environ[API_KEY_ENV]} if os.environ.get(API_KEY_ENV) else {}
    result = run_users(url, dataset.queries, dataset.qrels, sim, headers=headers)
    console.print(f"{result.searches} searches answered, {result.clicks_acknowledged} of {result.clicks_sent} "
                  f"clicks acknowledged ({sim.split} queries, seed {sim.seed})"
                  + (f"; errors: {dict(result.errors)}" if result.num_errors else ""))
    if result.num_errors:
        raise typer.Exit(1)


@traffic_app.command("prune")
def traffic_prune(
    days: Annotated[Optional[float], typer.Option("--days", min=0, help="Delete events older than this (default: params traffic.retention_days).")] = None,  # noqa: UP045
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Retention: delete searches (with their clicks) and clicks older than traffic.retention_days."""
    cfg = load_config(params, set_)
    days = days if days is not None else cfg.traffic.retention_days
    if days is None:
        console.print("traffic.retention_days is null: events are kept; nothing deleted.", soft_wrap=True)
        return
    with open_store(cfg.traffic) as store:
        deleted = store.delete_older_than(days)
        held = store.counts()
    console.print(f"Deleted {deleted.impressions} searches and {deleted.clicks} clicks older than {days:g} days; "
                  f"the log holds {held.impressions} searches and {held.clicks} clicks.", soft_wrap=True)


@traffic_app.command("export")
def traffic_export(
    dest: Annotated[str, typer.Argument(help="A directory, or a pyarrow filesystem URI such as "
                                        "s3://bucket/traffic?endpoint_override=127.0.0.1:9000&scheme=http.")],
    start: Annotated[Optional[str], typer.Option("--start", help="From this date or time, ISO 8601 (UTC without a zone; default: --days before --end).")] = None,  # noqa: UP045
    end: Annotated[Optional[str], typer.Option("--end", help="Up to (not including) this date or time (default: now).")] = None,  # noqa: UP045
    days: Annotated[float, typer.Option("--days", min=0, help="Without --start: this many days before --end.")] = 7.0,
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Export the events of a time range as Parquet, partitioned by table and UTC day."""
    cfg = load_config(params, set_)
    end_time = _when(end, "--end") or utc_now()
    start_time = _when(start, "--start") or end_time - dt.timedelta(days=days)
    if start_time >= end_time:
        err_console.print(f"[red]--start {start_time.isoformat()} is not before --end {end_time.isoformat()}[/red]")
        raise typer.Exit(2)
    with open_store(cfg.traffic) as store:
        written = store.export_parquet(dest if "://" in dest else Path(dest), start_time, end_time)
    console.print(f"Exported {start_time.isoformat(timespec='seconds')} to {end_time.isoformat(timespec='seconds')}: "
                  f"{len(written)} files under {redact_uri(dest)}", soft_wrap=True)
