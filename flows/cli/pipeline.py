"""`alignsearch retrain|promote|rollback|run|schedule`: the Prefect flows from the command line,
and what they report (the registered version, the test metrics, the promotion or rollback
decision).

The flows load Prefect (and through their stages torch and MLflow), so each command imports
its flow when it runs: `alignsearch search` never pays for them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from components.config import Params
from components.data.format import DatasetFormatError
from components.data.validate import ValidationError
from components.outputs import redact_uri
from components.registry.tracking import tracking_uri
from components.registry.versions import CHAMPION, RegistryError, by_alias
from flows.cli.options import (
    PARAMS_FILE,
    ParamsOption,
    SetOption,
    console,
    err_console,
    load_config,
)
from flows.cli.search import search_table

# The test-split metrics `retrain` and `run` print per system (MLflow keys eval/<system>/test/<metric>).
HEADLINE = ("ndcg_at_10", "recall_at_10", "mrr_at_10", "auc", "image_only/auc", "title_overlap/auc")
# The metrics `promote` and `run` compare, challenger beside champion.
DECISION_METRICS = ("ndcg@10", "recall@10", "mrr@10", "auc", "image_only/auc", "title_overlap/auc")

PromoteDataOption = Annotated[Optional[Path], typer.Option("--data", help="Dataset to evaluate on (default: the one the challenger was trained on).")]  # noqa: UP045
LoopOption = Annotated[bool, typer.Option("--loop", help="Close the loop: ingest the logged searches and clicks into the next dataset version (traffic.dataset_dir) and train on it, warm-started from the champion.")]
ColdOption = Annotated[bool, typer.Option("--cold", help="With the loop: no warm start, train from the pretrained encoder with the learning-rate search (same as --set match.warm_start=false).")]
COLD = "match.warm_start=false"


def _overrides(set_: list[str] | None, cold: bool) -> list[str]:
    return [*(set_ or []), *([COLD] if cold else [])]


def _retrain(cfg: Params, loop: bool = False) -> dict:
    """Run the retraining flow; exit 1 with the reason (the validation report when that failed)."""
    from flows.retrain import RetrainAlreadyRunning, retrain_flow, retrain_lock  # Prefect

    try:
        with retrain_lock(Path(cfg.paths.flow_dir)):  # refuse before a flow run starts
            return retrain_flow(cfg.model_dump(mode="json", by_alias=True), loop=loop)
    except ValidationError as exc:
        err_console.print(f"[red]Dataset validation failed: nothing trained, nothing registered.[/red]\n{exc}",
                          soft_wrap=True)
    except (DatasetFormatError, FileNotFoundError, ValueError, RegistryError, RetrainAlreadyRunning) as exc:
        err_console.print(f"[red]Retraining failed, nothing registered:[/red] {redact_uri(str(exc))}", soft_wrap=True)
    raise typer.Exit(1)


def _metrics_table(title: str, metrics: dict[str, float]) -> Table:
    """Test-split metrics of every system the run evaluated (MLflow keys eval/<system>/test/<metric>)."""
    systems = sorted({k.split("/")[1] for k in metrics if k.startswith("eval/") and "/test/" in k})
    table = Table(title=title)
    table.add_column("system", no_wrap=True)
    for key in HEADLINE:
        label = key.replace("_at_", "@").replace("image_only/auc", "auc img-only").replace("title_overlap/auc",
                                                                                           "auc title-ovl")
        table.add_column(label, justify="right")
    for system in systems:
        row = [metrics.get(f"eval/{system}/test/{key}") for key in HEADLINE]
        table.add_row(system, *("-" if v is None else f"{v:.3f}" for v in row))
    return table


def _print_retrain(result: dict) -> None:
    state = "new version" if result["version_created"] else "identical model already registered"
    console.print(f"Registered [bold]{result['model_name']}[/bold] v{result['version']} ({state}); "
                  f"MLflow run {result['run_id']}; dataset {result['dataset_dir']} ({result['dataset_hash']})")
    console.print(f"Cached stages: {', '.join(result['cached_stages']) or 'none'}; took {result['seconds']:.0f} s")
    loop = result.get("loop") or {}
    if loop:
        tag = "alignsearch.loop"
        console.print(f"Loop: dataset {loop[f'{tag}.dataset_before']} -> {loop[f'{tag}.dataset_after']} "
                      f"({loop[f'{tag}.impressions']} searches, {loop[f'{tag}.clicks']} clicks, "
                      f"{loop[f'{tag}.new_queries']} new queries); matcher {loop[f'{tag}.warm_start']}",
                      soft_wrap=True)
    console.print(_metrics_table("Test split, this run (lexical and text_zero_shot are untrained references)",
                                 result["metrics"]))


def _print_decision(decision: dict) -> None:
    colour = {"promoted": "green", "kept": "yellow"}.get(decision["outcome"], "cyan")
    console.print(f"Promotion: [{colour}]{decision['outcome']}[/{colour}] - {decision['reason']}", soft_wrap=True)
    if decision.get("challenger_metrics"):
        table = Table(title="Challenger vs champion (current test split)")
        for column in ("metric", f"challenger v{decision['challenger_version']}",
                       f"champion v{decision['champion_version'] or '-'}"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for key in DECISION_METRICS:
            champion = decision["champion_metrics"].get(key)
            table.add_row(key, f"{decision['challenger_metrics'].get(key, float('nan')):.4f}",
                          "-" if champion is None else f"{champion:.4f}")
        console.print(table)


def _champion_version(cfg: Params) -> str | None:
    version = by_alias(cfg.registry.model_name, CHAMPION)
    return None if version is None else str(version.version)


def retrain(params: ParamsOption = PARAMS_FILE, set_: SetOption = None, loop: LoopOption = False,
            cold: ColdOption = False) -> None:
    """The retraining flow (Prefect): dataset -> validation -> features -> alignment -> matcher ->
    evaluation -> MLflow registration as `challenger`. Unchanged reruns come from the caches.
    `--loop`: ingest the logged events first and warm-start from the champion."""
    cfg = load_config(params, _overrides(set_, cold))
    result = _retrain(cfg, loop)
    _print_retrain(result)


def promote(
    metric: Annotated[Optional[str], typer.Option(help="Metric to compare (default: params promote.metric).")] = None,  # noqa: UP045
    min_delta: Annotated[Optional[float], typer.Option(help="Challenger must be better by at least this.")] = None,  # noqa: UP045
    data: PromoteDataOption = None,
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Evaluate challenger and champion on the current test split (default: of the dataset the
    challenger was trained on); promote the challenger to `champion` when it wins by min-delta
    and the guardrail holds. Running it twice is a no-op."""
    from flows.promote import promote_flow  # Prefect

    overrides = list(set_ or [])
    if metric is not None:
        overrides.append(f"promote.metric={metric}")
    if min_delta is not None:
        overrides.append(f"promote.min_delta={min_delta}")
    cfg = load_config(params, overrides)
    try:
        decision = promote_flow(cfg.model_dump(mode="json", by_alias=True), dataset_dir=str(data) if data else None)
    except ValidationError as exc:
        err_console.print(f"[red]Dataset validation failed ({data}): champion unchanged.[/red]\n{exc}",
                          soft_wrap=True)
        raise typer.Exit(1) from exc
    except (RegistryError, ValueError) as exc:
        err_console.print(f"[red]Promotion stopped, champion unchanged:[/red] {redact_uri(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from exc
    _print_decision(decision)


def _print_rollback(decision: dict) -> None:
    colour = {"rolled_back": "red", "kept": "green"}.get(decision["outcome"], "cyan")
    console.print(f"Rollback: [{colour}]{decision['outcome']}[/{colour}] - {decision['reason']}", soft_wrap=True,
                  highlight=False)
    if decision.get("champion_ctr"):
        table = Table(title="Live CTR@10, each version's own searches (not interleaved)")
        for column in ("", "version", "searches", "CTR@10", "window (UTC)"):
            table.add_column(column, justify="left" if column in ("", "window (UTC)") else "right")
        for role, ctr in (("champion", decision["champion_ctr"]), ("previous champion", decision["previous_ctr"])):
            table.add_row(role, f"v{ctr['version']}", str(ctr["searches"]), f"{ctr['ctr_at_10']:.4f}",
                          f"{ctr['start']} to {ctr['end']}")
        console.print(table)


def rollback(
    force: Annotated[bool, typer.Option("--force", help="Roll back whatever live traffic says (recorded as forced).")] = False,
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Move `champion` back to the version it replaced when its live CTR@10 over
    promote.rollback_window_days fell below that version's by more than
    promote.rollback_max_ctr_drop; the live catalogue moves with it, and the decision is
    recorded on the version rolled back from. No previous champion or too few searches: says
    so and changes nothing."""
    from flows.promote import rollback_flow  # Prefect

    cfg = load_config(params, set_)
    try:
        decision = rollback_flow(cfg.model_dump(mode="json", by_alias=True), force=force)
    except (RegistryError, ValueError) as exc:
        err_console.print(f"[red]Rollback stopped, champion unchanged:[/red] {redact_uri(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from exc
    _print_rollback(decision)


def run(params: ParamsOption = PARAMS_FILE, set_: SetOption = None, loop: LoopOption = False,
        cold: ColdOption = False) -> None:
    """The main job: retrain on the default dataset, promote, and say where to look. `--loop`:
    the scheduled job once (ingest the logged events, retrain warm from the champion, promote)."""
    from flows.promote import promote_flow  # Prefect

    started = time.perf_counter()
    cfg = load_config(params, _overrides(set_, cold))
    result = _retrain(cfg, loop)
    _print_retrain(result)
    decision = promote_flow(cfg.model_dump(mode="json", by_alias=True), dataset_dir=result["dataset_dir"])
    _print_decision(decision)
    console.rule("Where to look")
    console.print(f"MLflow UI:   make ui   (then http://127.0.0.1:5000; store {redact_uri(tracking_uri(cfg.registry))})")
    console.print(f"MLflow run:  experiment {cfg.registry.experiment!r}, run {result['run_id']} "
                  "(params, metrics, validation report, gallery, plots, model)")
    champion = _champion_version(cfg)
    console.print(f"Champion:    models:/{cfg.registry.model_name}@champion = v{champion or '-'}")
    console.print('Search:      alignsearch search "christmas tree"    |    HTTP: alignsearch serve')
    if champion:
        search_table(cfg, "christmas tree", 5, f"models:/{cfg.registry.model_name}@champion")
    console.print(f"Time: {time.perf_counter() - started:.0f} s")


def schedule(
    cron: Annotated[str, typer.Option(help="Cron expression, e.g. \"0 3 * * 1\" (Mondays 03:00).")],
    name: Annotated[str, typer.Option(help="Deployment name.")] = "alignsearch-retrain",
    timezone: Annotated[str, typer.Option(help="Time zone of the cron expression.")] = "UTC",
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
    loop: Annotated[bool, typer.Option("--loop/--no-loop", help="Each run ingests the logged searches and clicks "
                                       "first and warm-starts from the champion (--no-loop: retrain on the "
                                       "dataset as it is).")] = True,
    cold: ColdOption = False,
) -> None:
    """Serve the loop on a cron schedule: ingest -> validate -> retrain (warm from the champion) ->
    promote (needs a Prefect server: `prefect server start --host 127.0.0.1`, then
    PREFECT_API_URL=http://127.0.0.1:4200/api)."""
    from prefect.client.schemas.schedules import CronSchedule

    from flows.promote import retrain_and_promote_flow

    overrides = _overrides(set_, cold)
    cfg = load_config(params, overrides)
    if not os.environ.get("PREFECT_API_URL"):
        err_console.print("[red]Schedules need a running Prefect server[/red] (the temporary one cannot "
                          "schedule). Start one with `prefect server start --host 127.0.0.1` and set "
                          "PREFECT_API_URL=http://127.0.0.1:4200/api (see README, Schedules).", soft_wrap=True)
        raise typer.Exit(2)
    try:
        cron_schedule = CronSchedule(cron=cron, timezone=timezone)
    except ValueError as exc:
        err_console.print(f"[red]Invalid cron expression {cron!r}:[/red] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"Serving deployment {name!r} of alignsearch-retrain-and-promote on {cron!r} ({timezone}), "
                  f"loop {'on' if loop else 'off'}; Ctrl-C stops it.")
    del cfg  # validated now, read again by each run (so edits to the file apply)
    retrain_and_promote_flow.serve(name=name, schedules=[cron_schedule],
                                   parameters={"params_file": str(params.resolve()), "overrides": overrides,
                                               "loop": loop})
