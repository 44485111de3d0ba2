"""The `alignsearch` command line: thin Typer wrappers around component stage functions."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from flows.runtime import setup_runtime
from flows.team import team_app


class _Commands(typer.core.TyperGroup):
    """The command group: a dataset (or file) that is missing or malformed is a usage error with
    one line saying what is wrong, from every command, never a traceback."""

    def invoke(self, ctx):
        from components.data.format import DatasetFormatError

        try:
            return super().invoke(ctx)
        except (DatasetFormatError, FileNotFoundError, NotADirectoryError) as exc:
            message = str(exc) if isinstance(exc, DatasetFormatError) or not getattr(exc, "filename", None) \
                else f"{exc.filename}: {exc.strerror}"
            if isinstance(exc, FileNotFoundError) and "not found" not in message and "No such" not in message:
                message += ": file not found"
            err_console.print(f"[red]Error:[/red] {message}", soft_wrap=True)
            raise typer.Exit(2) from exc


app = typer.Typer(
    cls=_Commands,
    name="alignsearch",
    help="Cross-modal sponsored search: align ad image parts to words without labels, "
    "then match queries to ads in language space (Align before Search, arXiv 2309.16141).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Build, validate and version datasets in the interchange format.", no_args_is_help=True)
app.add_typer(data_app, name="data")
align_app = typer.Typer(help="The label-free alignment of image parts to words.", no_args_is_help=True)
app.add_typer(align_app, name="align")
app.add_typer(team_app, name="team")

# No emoji codes: query ids such as "q:train:..." would render ":train:" as a picture.
console = Console(emoji=False, highlight=False)
err_console = Console(stderr=True, emoji=False, highlight=False)

ParamsOption = Annotated[
    Path, typer.Option("--params", help="Parameter file (every tunable number).", show_default=True)
]
SetOption = Annotated[
    Optional[list[str]],  # noqa: UP045 - Typer needs Optional here
    typer.Option("--set", help="Override a parameter, e.g. --set data.max_ads=500 (repeatable)."),
]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    setup_runtime(verbose=verbose)


def _load(params: Path, overrides: list[str] | None):
    from components.config import load_params

    try:
        return load_params(params, overrides)
    except ValueError as exc:  # pydantic.ValidationError is a ValueError
        err_console.print(f"[red]Invalid parameters ({params}):[/red]\n{exc}")
        raise typer.Exit(2) from exc


DataOptionLate = Annotated[Optional[Path], typer.Option("--data", help="Dataset to evaluate on (default: the one the challenger was trained on).")]  # noqa: UP045


def _counts_table(title: str, counts: dict[str, dict[str, int]]) -> Table:
    table = Table(title=title)
    for column in ("table", "train", "valid", "test", "total"):
        table.add_column(column, justify="left" if column == "table" else "right")
    for name, per_split in counts.items():
        table.add_row(name, *(str(per_split.get(s, 0)) for s in ("train", "valid", "test", "total")))
    return table


@data_app.command("build")
def data_build(
    source: Annotated[Optional[str], typer.Option(help="openclipart | synthetic | coco (default: params data.source).")] = None,  # noqa: UP045
    out: Annotated[Optional[Path], typer.Option(help="Output directory (default: params data.out_dir).")] = None,  # noqa: UP045
    max_ads: Annotated[Optional[int], typer.Option(help="Keep at most this many ads (seeded).")] = None,  # noqa: UP045
    svg_root: Annotated[Optional[Path], typer.Option(help="openclipart: folder of the clip-art SVGs.")] = None,  # noqa: UP045
    captions: Annotated[Optional[Path], typer.Option(help="coco: captions JSON file.")] = None,  # noqa: UP045
    images: Annotated[Optional[Path], typer.Option(help="coco: folder of the images.")] = None,  # noqa: UP045
    seed: Annotated[Optional[int], typer.Option(help="Seed of sampling and splits.")] = None,  # noqa: UP045
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Build a dataset (openclipart, synthetic or coco) in the interchange format."""
    from components.data.build import build_dataset

    overrides = list(set_ or [])
    for key, value in (("source", source), ("out_dir", out), ("max_ads", max_ads), ("svg_root", svg_root),
                       ("seed", seed), ("coco.captions", captions), ("coco.images", images)):
        if value is not None:
            overrides.append(f"data.{key}={value}")
    cfg = _load(params, overrides).data
    try:
        result = build_dataset(cfg)
    except (FileNotFoundError, ValueError) as exc:
        err_console.print(f"[red]Build failed:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(_counts_table(f"{cfg.source} dataset in {result.out_dir} ({result.seconds:.1f} s)", result.counts))
    console.print(f"Summary: {result.out_dir / 'README.txt'}")


@data_app.command("validate")
def data_validate(
    dataset_dir: Annotated[Path, typer.Argument(help="Dataset directory in the interchange format.")],
    report_dir: Annotated[Optional[Path], typer.Option(help="Where reports go (default: params validate.report_dir).")] = None,  # noqa: UP045
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Validate a dataset with Great Expectations; exit non-zero and name each failed rule."""
    from components.data.format import DatasetFormatError
    from components.data.validate import format_report, validate_dataset

    cfg = _load(params, set_).validation
    try:
        result = validate_dataset(dataset_dir, cfg, report_dir=report_dir or cfg.report_dir)
    except DatasetFormatError as exc:
        err_console.print(f"[red]Invalid dataset:[/red] {exc}")
        raise typer.Exit(1) from exc
    (console if result.success else err_console).print(format_report(result), markup=False, soft_wrap=True)
    if not result.success:
        raise typer.Exit(1)


@data_app.command("hash")
def data_hash(dataset_dir: Annotated[Path, typer.Argument(help="Dataset directory.")]) -> None:
    """Print the dataset's content hash (the same as DVC's directory hash)."""
    from components.data.format import dataset_hash

    console.print(dataset_hash(dataset_dir))


def _retrain(cfg) -> dict:
    """Run the retraining flow; exit 1 with the reason (the validation report when that failed)."""
    from components.data.format import DatasetFormatError
    from components.data.validate import ValidationError
    from components.registry.versions import RegistryError
    from flows.retrain import RetrainAlreadyRunning, retrain_flow, retrain_lock

    try:
        with retrain_lock(Path(cfg.paths.flow_dir)):  # refuse before a flow run starts
            return retrain_flow(cfg.model_dump(mode="json", by_alias=True))
    except ValidationError as exc:
        err_console.print(f"[red]Dataset validation failed: nothing trained, nothing registered.[/red]\n{exc}",
                          soft_wrap=True)
    except (DatasetFormatError, FileNotFoundError, ValueError, RegistryError, RetrainAlreadyRunning) as exc:
        err_console.print(f"[red]Retraining failed, nothing registered:[/red] {exc}", soft_wrap=True)
    raise typer.Exit(1)


HEADLINE = ("ndcg_at_10", "recall_at_10", "mrr_at_10", "auc", "image_only/auc", "title_overlap/auc")


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


@app.command("retrain")
def retrain(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """The retraining flow (Prefect): dataset -> validation -> features -> alignment -> matcher ->
    evaluation -> MLflow registration as `challenger`. Unchanged reruns come from the caches."""
    cfg = _load(params, set_)
    result = _retrain(cfg)
    _print_retrain(result)


def _print_retrain(result: dict) -> None:
    state = "new version" if result["version_created"] else "identical model already registered"
    console.print(f"Registered [bold]{result['model_name']}[/bold] v{result['version']} ({state}); "
                  f"MLflow run {result['run_id']}; dataset {result['dataset_dir']} ({result['dataset_hash']})")
    console.print(f"Cached stages: {', '.join(result['cached_stages']) or 'none'}; took {result['seconds']:.0f} s")
    console.print(_metrics_table("Test split, this run (lexical and text_zero_shot are untrained references)",
                                 result["metrics"]))


@app.command("promote")
def promote(
    metric: Annotated[Optional[str], typer.Option(help="Metric to compare (default: params promote.metric).")] = None,  # noqa: UP045
    min_delta: Annotated[Optional[float], typer.Option(help="Challenger must be better by at least this.")] = None,  # noqa: UP045
    data: DataOptionLate = None,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Evaluate challenger and champion on the current test split (default: of the dataset the
    challenger was trained on); promote the challenger to `champion` when it wins by min-delta
    and the guardrail holds. Running it twice is a no-op."""
    from components.registry.versions import RegistryError
    from flows.promote import promote_flow

    overrides = list(set_ or [])
    if metric is not None:
        overrides.append(f"promote.metric={metric}")
    if min_delta is not None:
        overrides.append(f"promote.min_delta={min_delta}")
    cfg = _load(params, overrides)
    try:
        decision = promote_flow(cfg.model_dump(mode="json", by_alias=True), dataset_dir=str(data) if data else None)
    except (RegistryError, ValueError) as exc:
        err_console.print(f"[red]Promotion stopped, champion unchanged:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc
    _print_decision(decision)


def _print_decision(decision: dict) -> None:
    colour = {"promoted": "green", "kept": "yellow"}.get(decision["outcome"], "cyan")
    console.print(f"Promotion: [{colour}]{decision['outcome']}[/{colour}] - {decision['reason']}", soft_wrap=True)
    if decision.get("challenger_metrics"):
        table = Table(title="Challenger vs champion (current test split)")
        for column in ("metric", f"challenger v{decision['challenger_version']}",
                       f"champion v{decision['champion_version'] or '-'}"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for key in ("ndcg@10", "recall@10", "mrr@10", "auc", "image_only/auc", "title_overlap/auc"):
            champion = decision["champion_metrics"].get(key)
            table.add_row(key, f"{decision['challenger_metrics'].get(key, float('nan')):.4f}",
                          "-" if champion is None else f"{champion:.4f}")
        console.print(table)


@app.command("run")
def run(params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """The main job: retrain on the default dataset, promote, and say where to look."""
    from components.registry.tracking import tracking_uri
    from flows.promote import promote_flow

    started = time.perf_counter()
    cfg = _load(params, set_)
    result = _retrain(cfg)
    _print_retrain(result)
    decision = promote_flow(cfg.model_dump(mode="json", by_alias=True), dataset_dir=result["dataset_dir"])
    _print_decision(decision)
    console.rule("Where to look")
    console.print(f"MLflow UI:   make ui   (then http://127.0.0.1:5000; store {tracking_uri(cfg.registry)})")
    console.print(f"MLflow run:  experiment {cfg.registry.experiment!r}, run {result['run_id']} "
                  "(params, metrics, validation report, gallery, plots, model)")
    champion = _champion_version(cfg)
    console.print(f"Champion:    models:/{cfg.registry.model_name}@champion = v{champion or '-'}")
    console.print('Search:      alignsearch search "christmas tree"    |    HTTP: alignsearch serve')
    if champion:
        _search_table(cfg, "christmas tree", 5, f"models:/{cfg.registry.model_name}@champion")
    console.print(f"Time: {time.perf_counter() - started:.0f} s")


def _champion_version(cfg) -> str | None:
    from components.registry.versions import CHAMPION, by_alias

    version = by_alias(cfg.registry.model_name, CHAMPION)
    return None if version is None else str(version.version)


def _print_hits(title: str, frame) -> None:
    table = Table(title=title)
    for column in ("#", "ad id", "title", "score", "visual words", "matched the query"):
        table.add_column(column, justify="right" if column in ("#", "score") else "left")
    for row in frame.itertuples():
        table.add_row(str(row.rank), row.ad_id, row.title, f"{row.score:.3f}", ", ".join(row.visual_words),
                      ", ".join(row.matched_words) or "-")
    console.print(table)


def _search_table(cfg, query: str, k: int, model_uri: str) -> None:
    """One-off search. Fast path: the version and its catalogue pointer read from a local sqlite
    registry, bundle and catalogue from the local cache, only the query tower loaded (no MLflow
    import). Otherwise (first use of a version, a server store): resolved through MLflow, which
    fills the cache for the next search."""
    import pandas as pd

    from components.catalogue.fast import cached_engine
    from components.registry.tracking import tracking_uri

    started = time.perf_counter()
    found = cached_engine(tracking_uri(cfg.registry), model_uri, cfg.data.cache_dir)
    if found is None:
        from components.catalogue.live import current_catalogue, resolve_model
        from components.registry.tracking import configure_mlflow
        from components.search.engine import SearchEngine

        configure_mlflow(cfg.registry)
        try:
            ref = resolve_model(model_uri, cfg.data.cache_dir)
        except LookupError as exc:
            err_console.print(f"[red]{exc}[/red]", soft_wrap=True)
            raise typer.Exit(1) from exc
        engine = SearchEngine(ref.bundle_dir, catalogue=current_catalogue(ref, cfg.data.cache_dir))
        info = {"version": ref.version, "catalogue_version": engine.catalogue_version}
    else:
        engine, info = found
    engine.query_tower  # noqa: B018 - load it now, so the timing below says what loading cost
    loaded = time.perf_counter()
    frame = engine.search_frame(pd.DataFrame({"query": [query], "k": [k]}))
    took = time.perf_counter() - loaded
    _print_hits(f"{query!r} - {model_uri} (v{info['version']}, catalogue {info['catalogue_version']}); "
                f"load {loaded - started:.1f} s, search {took * 1000:.0f} ms", frame)


def _search_url(url: str, query: str, k: int) -> None:
    """Ask a running `alignsearch serve` (for scripts: no model is loaded here)."""
    import os

    import httpx
    import pandas as pd

    headers = {"X-API-Key": os.environ[API_KEY_ENV]} if os.environ.get(API_KEY_ENV) else {}
    try:
        response = httpx.get(url.rstrip("/") + "/search", params={"q": query, "k": k}, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        err_console.print(f"[red]Cannot reach {url}:[/red] {exc}", soft_wrap=True)
        raise typer.Exit(1) from exc
    if response.status_code != 200:
        err_console.print(f"[red]{url} answered {response.status_code}:[/red] {response.text[:500]}", soft_wrap=True)
        raise typer.Exit(1)
    body = response.json()
    _print_hits(f"{query!r} - {url} (model v{body.get('model_version')}, catalogue {body.get('catalogue_version')}); "
                f"{body['took_ms']:.0f} ms in the service", pd.DataFrame(body["results"]))


@app.command("search")
def search(
    query: Annotated[str, typer.Argument(help="The text query, e.g. \"red sports car\".")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="How many ads.")] = 10,
    model_uri: Annotated[Optional[str], typer.Option(help="Model to ask (default: params serve.model_uri, the champion).")] = None,  # noqa: UP045
    url: Annotated[Optional[str], typer.Option(help="Ask a running service instead, e.g. http://127.0.0.1:8080.")] = None,  # noqa: UP045
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Rank the ads for a query with the champion (or --model-uri, or a service at --url) and print a table."""
    cfg = _load(params, set_)
    if not query.strip():
        err_console.print("[red]The query is empty.[/red]")
        raise typer.Exit(2)
    if k > cfg.serve.max_k:
        err_console.print(f"[red]-k {k} is above the limit serve.max_k={cfg.serve.max_k}.[/red]")
        raise typer.Exit(2)
    if url:
        _search_url(url, query, k)
        return
    _search_table(cfg, query, k, model_uri or cfg.serve.model_uri)


API_KEY_ENV = "ALIGNSEARCH_API_KEY"


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: resolved by the OS, could be anything
        return False


@app.command("serve")
def serve(
    host: Annotated[Optional[str], typer.Option(help="Bind address (default 127.0.0.1).")] = None,  # noqa: UP045
    port: Annotated[Optional[int], typer.Option(help="Port (default: params serve.port).")] = None,  # noqa: UP045
    model_uri: Annotated[Optional[str], typer.Option(help="Model to serve (default: the champion).")] = None,  # noqa: UP045
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a non-loopback --host (the service "
                                               f"has no authentication unless {API_KEY_ENV} is set).")] = False,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Serve search over HTTP (FastAPI): a search page at /, GET/POST /search, GET /health, docs at /docs.
    Follows the model version's live catalogue (`alignsearch ads add`): new versions are swapped in.
    With ALIGNSEARCH_API_KEY set, /search needs the header X-API-Key."""
    import os

    import uvicorn

    from components.registry.tracking import configure_mlflow
    from components.registry.versions import describe, load_search_model
    from components.search.service import create_app

    cfg = _load(params, set_)
    bind = host or cfg.serve.host
    api_key = os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(bind):
        if not allow_remote:
            err_console.print(f"[red]Refusing to bind {bind!r}: not a loopback address.[/red] The service would be "
                              "reachable from other machines; pass --allow-remote to mean it.", soft_wrap=True)
            raise typer.Exit(2)
        auth = f"requests need the API key from {API_KEY_ENV}" if api_key else \
            f"there is NO authentication (set {API_KEY_ENV} to require an API key)"
        err_console.print(f"[yellow]Warning: serving on {bind}, reachable from other machines; {auth}.[/yellow]",
                          soft_wrap=True)
    uri = model_uri or cfg.serve.model_uri
    configure_mlflow(cfg.registry)
    try:
        model = load_search_model(uri)
    except LookupError as exc:
        err_console.print(f"[red]{exc}[/red]", soft_wrap=True)
        raise typer.Exit(1) from exc
    from components.catalogue.live import CatalogueWatcher
    from components.catalogue.versions import resolve_image

    info = describe(uri)
    engine = model.unwrap_python_model().engine
    watcher = None
    if info.get("version"):  # follow the version's live catalogue (a new version is swapped in)
        watcher = CatalogueWatcher(engine, info["name"], info["version"], cache_dir=cfg.data.cache_dir,
                                   interval_s=cfg.serve.catalogue_poll_s).start()
    app_ = create_app(model, cfg.serve, model_uri=uri, info=info, api_key=api_key, engine=engine,
                      watcher=watcher, image_file=lambda ref: resolve_image(ref, cfg.data.cache_dir))
    port_ = port or cfg.serve.port
    console.print(f"Serving {uri} (catalogue {engine.catalogue_version}, {len(engine)} ads) on "
                  f"http://{bind}:{port_} (search page at /, docs at /docs)"
                  + (f"; API key required ({API_KEY_ENV})" if api_key else ""))
    uvicorn.run(app_, host=bind, port=port_, log_level="info")


@app.command("bench-serve")
def bench_serve(
    requests: Annotated[int, typer.Option(min=1, help="Requests to send.")] = 2000,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 8,
    k: Annotated[int, typer.Option(min=1, help="Ads per request.")] = 10,
    model_uri: Annotated[Optional[str], typer.Option(help="Model to serve (default: the champion).")] = None,  # noqa: UP045
    out: Annotated[Path, typer.Option(help="Where bench_serve.json/.md go.")] = Path("reports/bench-serve"),
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Start a real `alignsearch serve` on 127.0.0.1 (a free port), send N requests at a
    concurrency (p50/p95/p99 latency, throughput, errors), then sweep bad inputs (each must be 4xx)."""
    from flows.bench_serve import bench_serve as run_bench

    cfg = _load(params, set_)
    serve_args = ["--params", str(params), "--model-uri", model_uri or cfg.serve.model_uri]
    for item in set_ or []:
        serve_args += ["--set", item]
    try:
        report = run_bench(serve_args, out, requests=requests, concurrency=concurrency, k=k)
    except RuntimeError as exc:
        err_console.print(f"[red]{exc}[/red]", soft_wrap=True)
        raise typer.Exit(1) from exc
    console.print((out / "bench_serve.md").read_text(), markup=False, soft_wrap=True)
    console.print(f"Report: {out / 'bench_serve.json'}")
    if report["load"]["errors"] or report["bad_inputs_failed"]:
        raise typer.Exit(1)


@app.command("schedule")
def schedule(
    cron: Annotated[str, typer.Option(help="Cron expression, e.g. \"0 3 * * 1\" (Mondays 03:00).")],
    name: Annotated[str, typer.Option(help="Deployment name.")] = "alignsearch-retrain",
    timezone: Annotated[str, typer.Option(help="Time zone of the cron expression.")] = "UTC",
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Serve the retrain-and-promote flow on a cron schedule (needs a Prefect server:
    `prefect server start --host 127.0.0.1`, then PREFECT_API_URL=http://127.0.0.1:4200/api)."""
    import os

    from prefect.client.schemas.schedules import CronSchedule

    from flows.promote import retrain_and_promote_flow

    cfg = _load(params, set_)
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
    console.print(f"Serving deployment {name!r} of alignsearch-retrain-and-promote on {cron!r} ({timezone}); "
                  "Ctrl-C stops it.")
    del cfg  # validated now, read again by each run (so edits to the file apply)
    retrain_and_promote_flow.serve(name=name, schedules=[cron_schedule],
                                   parameters={"params_file": str(params.resolve()), "overrides": list(set_ or [])})


DataOption = Annotated[Optional[Path], typer.Option("--data", help="Dataset directory (default: params data.out_dir).")]  # noqa: UP045


@app.command("features")
def features(data: DataOption = None, out: Annotated[Optional[Path], typer.Option(help="Output directory.")] = None,  # noqa: UP045
             params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Visual parts of every ad image (EfficientNet-Lite0; cached by image content)."""
    from components.vision.stage import run_features

    cfg = _load(params, set_)
    result = run_features(cfg.vision, dataset_dir=data or cfg.data.out_dir, out_dir=out or cfg.paths.features_dir,
                          cache_dir=cfg.data.cache_dir)
    console.print(f"Features: {result.features_path} {result.metrics}")


@align_app.command("train")
def align_train(data: DataOption = None,
                features_dir: Annotated[Optional[Path], typer.Option("--features", help="Output of `alignsearch features`.")] = None,  # noqa: UP045
                out: Annotated[Optional[Path], typer.Option(help="Output directory.")] = None,  # noqa: UP045
                params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Train the alignment on the training split (titles and the click text of the matcher's
    training queries; never tags, part labels or other splits) and write the visual words of
    every ad (out-of-fold for training ads)."""
    from components.align.stage import run_align
    from components.vision.stage import FEATURES_FILE, load_features

    cfg = _load(params, set_)
    feats = load_features((features_dir or cfg.paths.features_dir) / FEATURES_FILE)
    result = run_align(cfg.align, dataset_dir=data or cfg.data.out_dir, features=feats,
                       out_dir=out or cfg.paths.align_dir, cache_dir=cfg.data.cache_dir,
                       fraction=cfg.match.train_fraction, query_seed=cfg.match.seed)
    console.print(f"Alignment model: {result.model_dir}\nWords: {result.words_path}\nGallery: {result.gallery_path}")
    console.print(json.dumps(result.metrics, indent=2))


@align_app.command("show")
def align_show(data: DataOption = None,
               align_dir: Annotated[Optional[Path], typer.Option("--align", help="Output of `alignsearch align train`.")] = None,  # noqa: UP045
               ad_id: Annotated[Optional[list[str]], typer.Option("--ad-id", help="Ads to show (repeatable).")] = None,  # noqa: UP045
               split: Annotated[str, typer.Option(help="Split to sample ads from when no --ad-id is given.")] = "test",
               limit: Annotated[int, typer.Option(help="How many ads.")] = 10,
               all_words: Annotated[bool, typer.Option("--all-words", help="Every kept word (align.words_per_image), not only the shown ones (align.words_shown).")] = False,
               params: ParamsOption = Path("params.yaml")) -> None:
    """Show ads with their titles and aligned visual words (the first align.words_shown, as
    the gallery and search hits do): probability, the part each word came from (whole image
    or part n), and ✓/✗ against the ad's held-out query words."""
    from components.align.evaluation import held_out_words
    from components.align.gallery import mark
    from components.align.model import WHOLE_IMAGE, read_words_shown
    from components.align.stage import WORDS_FILE, held_out_texts, load_visual_words
    from components.align.train import MODEL_SUBDIR
    from components.data.format import read_dataset
    from components.text.stems import word_stem

    cfg = _load(params, None)
    dataset = read_dataset(data or cfg.data.out_dir)
    align_dir = align_dir or cfg.paths.align_dir
    words = load_visual_words(align_dir / WORDS_FILE)
    shown = None if all_words else read_words_shown(align_dir / MODEL_SUBDIR)
    ads = dataset.ads.set_index("ad_id")
    chosen = ad_id or dataset.split(split).ads["ad_id"].head(limit).tolist()
    held = {a: held_out_words(t) for name in ("train", "valid", "test")
            for a, t in held_out_texts(dataset, name).items()}
    table = Table(title="Visual words (probability, source part; ✓/✗ against held-out query words)")
    for column in ("ad id", "title", "visual words", "held-out words"):
        table.add_column(column)
    for ad in chosen:
        if ad not in ads.index:
            err_console.print(f"[red]unknown ad id {ad!r}[/red]")
            raise typer.Exit(1)
        stems = held.get(ad)
        cells = [f"{mark(None if stems is None else word_stem(w.word) in stems)}{w.word} ({w.score:.2f}, "
                 f"{'image' if w.part == WHOLE_IMAGE else f'part {w.part}'})" for w in words.get(ad, [])[:shown]]
        table.add_row(ad, str(ads.loc[ad, "title"]), ", ".join(cells), ", ".join(sorted(stems or [])) or "–")
    console.print(table)


@align_app.command("compare")
def align_compare(data: DataOption = None,
                  variant: Annotated[list[str], typer.Option("--variant", help="NAME:key=value,key=value of the align section (repeatable); '' = params as they are.")] = ["params:"],  # noqa: B006
                  out: Annotated[Path, typer.Option(help="Where align_compare.csv and the runs go.")] = Path("reports/align-compare"),
                  params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Alignment variants side by side: visual-word precision on valid, and the ranking of a
    shared trained text_only whose word channel is each variant's alignment (calibrated on
    valid, as ours does), on the test split."""
    from components.data.format import read_dataset
    from components.evaluate.align_compare import compare_alignments, parse_variant
    from components.vision.cache import extract_parts_cached

    cfg = _load(params, set_)
    try:
        variants = [parse_variant(v) for v in variant]
    except ValueError as exc:
        err_console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    dataset_dir = data or cfg.data.out_dir
    dataset = read_dataset(dataset_dir)
    paths = [dataset.image_file(p) for p in dataset.ads["image_path"].astype(str)]
    feats = extract_parts_cached(paths, cfg.vision, cache_dir=Path(cfg.data.cache_dir) / "features")
    table = compare_alignments(variants, align_cfg=cfg.align, match_cfg=cfg.match, dataset_dir=dataset_dir,
                               features=feats, out_dir=out, cache_dir=cfg.data.cache_dir)
    shown = Table(title=f"Alignment variants ({out / 'align_compare.csv'})")
    columns = ["variant", "visual_word_precision", "visual_word_lift", "channel_weight", "valid/ndcg@10",
               "test/all/ndcg@10", "test/image_only/ndcg@10", "test/title_overlap/ndcg@10"]
    columns = [c for c in columns if c in table.columns]
    for column in columns:
        shown.add_column(column.removeprefix("visual_word_"))
    for _, row in table.iterrows():
        shown.add_row(*[f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns])
    console.print(shown)


@app.command("train-matcher")
def train_matcher(data: DataOption = None,
                  system: Annotated[str, typer.Option(help="ours | text_only | implicit_fusion | late_fusion | ...")] = "ours",
                  features_dir: Annotated[Optional[Path], typer.Option("--features")] = None,  # noqa: UP045
                  align_dir: Annotated[Optional[Path], typer.Option("--align")] = None,  # noqa: UP045
                  out: Annotated[Optional[Path], typer.Option(help="Output directory.")] = None,  # noqa: UP045
                  params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Train the language-space matcher (or a baseline) on the training split."""
    from components.align.stage import WORDS_FILE, load_ad_words
    from components.match.stage import run_train_matcher
    from components.systems import WORD_SYSTEMS
    from components.vision.stage import FEATURES_FILE, load_features

    cfg = _load(params, set_)
    feats = load_features((features_dir or cfg.paths.features_dir) / FEATURES_FILE)
    words = word_logits = None
    if system in WORD_SYSTEMS:
        words, word_logits = load_ad_words((align_dir or cfg.paths.align_dir) / WORDS_FILE)
    result = run_train_matcher(cfg.match, dataset_dir=data or cfg.data.out_dir, out_dir=out or cfg.paths.matcher_dir,
                               system=system, features=feats, words=words, word_logits=word_logits)
    console.print(f"Matcher: {result.scorer_dir} {result.metrics}")


@app.command("evaluate")
def evaluate(data: DataOption = None,
             matcher_dir: Annotated[Optional[Path], typer.Option("--matcher", help="Output of `train-matcher`.")] = None,  # noqa: UP045
             features_dir: Annotated[Optional[Path], typer.Option("--features")] = None,  # noqa: UP045
             align_dir: Annotated[Optional[Path], typer.Option("--align")] = None,  # noqa: UP045
             out: Annotated[Optional[Path], typer.Option(help="Reports directory.")] = None,  # noqa: UP045
             params: ParamsOption = Path("params.yaml"), set_: SetOption = None) -> None:
    """Metrics (auc, ndcg@10, recall@10, mrr@10 per system, per split) and plots."""
    from components.align.stage import WORDS_FILE, load_ad_words
    from components.evaluate.stage import run_evaluate
    from components.match.stage import SCORER_SUBDIR
    from components.vision.stage import FEATURES_FILE, load_features

    cfg = _load(params, set_)
    feats = load_features((features_dir or cfg.paths.features_dir) / FEATURES_FILE)
    words, word_logits = load_ad_words((align_dir or cfg.paths.align_dir) / WORDS_FILE)
    result = run_evaluate(dataset_dir=data or cfg.data.out_dir,
                          scorer_dir=(matcher_dir or cfg.paths.matcher_dir) / SCORER_SUBDIR,
                          out_dir=out or cfg.paths.reports_dir, features=feats, words=words, word_logits=word_logits,
                          seed=cfg.match.seed, match_cfg=cfg.match)
    console.print_json(json.dumps(result.metrics))


def _float_list(text: str | None) -> list[float] | None:
    return None if text is None else [float(x) for x in text.split(",") if x.strip()]


@app.command("benchmark")
def benchmark(
    data: Annotated[Path, typer.Option("--data", help="Dataset directory in the interchange format.")],
    systems: Annotated[Optional[str], typer.Option(help="Comma-separated systems (default: all of params benchmark.systems).")] = None,  # noqa: UP045
    fractions: Annotated[Optional[str], typer.Option(help="Training-query fractions, e.g. 0.25,0.5,1.0.")] = None,  # noqa: UP045
    seeds: Annotated[Optional[str], typer.Option(help="Seeds, e.g. 0,1,2.")] = None,  # noqa: UP045
    ablations: Annotated[Optional[str], typer.Option(help="Comma-separated ablations of ours ('' for none).")] = None,  # noqa: UP045
    out: Annotated[Path, typer.Option(help="Where benchmark.json, benchmark.md and the plots go.")] = Path("reports/benchmark"),
    quick: Annotated[bool, typer.Option("--quick", help="A small configuration that runs in minutes.")] = False,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Train and evaluate every system on one dataset; write benchmark.json/.md and plots.
    With `compute.workers` or a Dask address (params `compute`, ALIGNSEARCH_DASK_ADDRESS) the
    trainings run as tasks on Dask."""
    from components.evaluate.benchmark import run_benchmark
    from flows.compute import cell_mapper

    cfg = _load(params, set_)
    update: dict = {}
    if systems is not None:
        update["systems"] = [s.strip() for s in systems.split(",") if s.strip()]
    if ablations is not None:
        update["ablations"] = [s.strip() for s in ablations.split(",") if s.strip()]
    if fractions is not None:
        update["fractions"] = _float_list(fractions)
    if seeds is not None:
        update["seeds"] = [int(x) for x in seeds.split(",") if x.strip()]
    bench_cfg = cfg.benchmark.model_validate({**cfg.benchmark.model_dump(), **update})
    result = run_benchmark(bench_cfg, dataset_dir=data, out_dir=out, cache_dir=cfg.data.cache_dir,
                           parts_cfg=cfg.vision, align_cfg=cfg.align, match_cfg=cfg.match, quick=quick,
                           map_cells=cell_mapper(cfg.compute))
    console.print(result.paths["markdown"].read_text(), markup=False, soft_wrap=True)
    console.print(f"Reports: {out}  ({result.seconds / 60:.1f} min)")


ads_app = typer.Typer(help="The live catalogue: add and remove ads without retraining.", no_args_is_help=True)
app.add_typer(ads_app, name="ads")
ModelUriOption = Annotated[Optional[str], typer.Option(help="Model version whose catalogue changes (default: params serve.model_uri, the champion).")]  # noqa: UP045


def _catalogue_line(catalogue) -> str:
    return (f"{catalogue.model_name} v{catalogue.model_version}: catalogue {catalogue.label} "
            f"(run {catalogue.run_id or '-'}), {len(catalogue)} ads, {catalogue.index.kind} index")


@ads_app.command("add")
def ads_add(
    ads_dir: Annotated[Path, typer.Argument(help="Folder with ads.parquet (ad_id, title, image_path) and images/.")],
    model_uri: ModelUriOption = None,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Validate new ads (the dataset rules for ads and images), encode them with the model's
    alignment and ad tower, and add them as a new catalogue version. An existing ad id is
    replaced. Any bad row: nothing is added."""
    from components.catalogue.live import add_ads
    from components.catalogue.versions import CatalogueConflict
    from components.data.validate import ValidationError
    from components.registry.tracking import configure_mlflow

    cfg = _load(params, set_)
    configure_mlflow(cfg.registry)
    try:
        result = add_ads(model_uri or cfg.serve.model_uri, ads_dir, validate_cfg=cfg.validation,
                         cache_dir=cfg.data.cache_dir, experiment=cfg.registry.experiment)
    except ValidationError as exc:
        err_console.print(f"[red]Refused, nothing added:[/red]\n{exc}", soft_wrap=True, markup=False)
        raise typer.Exit(1) from exc
    except (LookupError, CatalogueConflict) as exc:
        err_console.print(f"[red]{exc}[/red]", soft_wrap=True)
        raise typer.Exit(1) from exc
    console.print(f"Added {len(result.added)}, replaced {len(result.replaced)} ads "
                  f"({result.ads_per_second:.1f} ads/s encoding, {result.encode_seconds:.1f} s).")
    console.print(_catalogue_line(result.catalogue))


@ads_app.command("remove")
def ads_remove(
    ad_ids: Annotated[list[str], typer.Argument(help="Ad ids to take out.")],
    model_uri: ModelUriOption = None,
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """Take ads out of the live catalogue (a new catalogue version). An unknown id: nothing removed."""
    from components.catalogue.live import remove_ads
    from components.catalogue.versions import CatalogueConflict
    from components.registry.tracking import configure_mlflow

    cfg = _load(params, set_)
    configure_mlflow(cfg.registry)
    try:
        result = remove_ads(model_uri or cfg.serve.model_uri, ad_ids, cache_dir=cfg.data.cache_dir,
                            experiment=cfg.registry.experiment)
    except (KeyError, ValueError, LookupError, CatalogueConflict) as exc:
        err_console.print(f"[red]Refused, nothing removed:[/red] {exc}", soft_wrap=True, markup=False)
        raise typer.Exit(1) from exc
    console.print(f"Removed {len(result.removed)} ads.")
    console.print(_catalogue_line(result.catalogue))


@ads_app.command("status")
def ads_status(model_uri: ModelUriOption = None, params: ParamsOption = Path("params.yaml"),
               set_: SetOption = None) -> None:
    """The current catalogue version of the model and its size."""
    from components.catalogue.live import current_catalogue, resolve_model
    from components.registry.tracking import configure_mlflow

    cfg = _load(params, set_)
    configure_mlflow(cfg.registry)
    try:
        ref = resolve_model(model_uri or cfg.serve.model_uri, cfg.data.cache_dir)
    except LookupError as exc:
        err_console.print(f"[red]{exc}[/red]", soft_wrap=True)
        raise typer.Exit(1) from exc
    console.print(_catalogue_line(current_catalogue(ref, cfg.data.cache_dir)))


@app.command("bench-index")
def bench_index(
    sizes: Annotated[str, typer.Option(help="Catalogue sizes, comma-separated.")] = "10000,100000,1000000",
    model_uri: ModelUriOption = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Dataset whose queries (and ads, for encoding) are used (default: params data.out_dir).")] = None,  # noqa: UP045
    encode_ads: Annotated[int, typer.Option(help="Ads to encode end to end for the throughput (0: skip).")] = 200,
    threads: Annotated[int, typer.Option(min=1, help="faiss threads while measuring.")] = 1,
    skip: Annotated[Optional[str], typer.Option(help="Index configs to leave out, comma-separated: name (every size) or name@size (e.g. hnsw32@1000000).")] = None,  # noqa: UP045
    out: Annotated[Path, typer.Option(help="Where bench_index.json/.md/.png go.")] = Path("reports/bench-index"),
    params: ParamsOption = Path("params.yaml"),
    set_: SetOption = None,
) -> None:
    """The ad index at scale: flat, HNSW, IVF-PQ and pq on embeddings shaped like the model's real ones
    (build time, bytes/ad, p50/p99 latency at batch 1 and 32, recall@10 vs exact), plus bulk
    encoding throughput of new ads end to end."""
    from components.registry.tracking import configure_mlflow
    from flows.bench_index import bench_index as run_bench

    cfg = _load(params, set_)
    configure_mlflow(cfg.registry)
    try:
        result = run_bench(model_uri or cfg.serve.model_uri, data or cfg.data.out_dir, cfg.data.cache_dir, out,
                           sizes=[int(s) for s in sizes.split(",") if s.strip()], encode_ads=encode_ads,
                           threads=threads, skip=set((skip or "").split(",")) - {""}, console=console)
    except LookupError as exc:
        err_console.print(f"[red]{exc}[/red]", soft_wrap=True)
        raise typer.Exit(1) from exc
    console.print(result["paths"]["markdown"].read_text(), markup=False, soft_wrap=True)
    console.print(f"Report: {result['paths']['markdown']}, plot: {result['paths']['plot']}")


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":
    main()
