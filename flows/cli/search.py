"""`alignsearch search|serve|bench-serve|bench-index`: asking a registered model, serving it
over HTTP, and measuring the service and the ad index.

A one-off search must start fast: nothing here loads torch or MLflow before the query
tower (and, off the fast path, the model) is needed; FastAPI loads only for `serve`.
"""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import httpx
import pandas as pd
import typer
import uvicorn
from rich.table import Table

from components.catalogue.live import open_engine
from components.config import Params
from components.outputs import redact_uri
from components.registry.tracking import configure_mlflow, tracking_uri
from components.search.config import API_KEY_ENV
from flows.bench_index import bench_index as measure_index
from flows.bench_serve import bench_serve as measure_service
from flows.bench_serve import errors as bench_errors
from flows.cli.options import (
    PARAMS_FILE,
    ModelUriOption,
    ParamsOption,
    SetOption,
    comma_list,
    console,
    err_console,
    load_config,
)


def _print_hits(title: str, frame: pd.DataFrame) -> None:
    table = Table(title=title)
    for column in ("#", "ad id", "title", "score", "visual words", "matched the query"):
        table.add_column(column, justify="right" if column in ("#", "score") else "left")
    for row in frame.itertuples():
        table.add_row(str(row.rank), row.ad_id, row.title, f"{row.score:.3f}", ", ".join(row.visual_words),
                      ", ".join(row.matched_words) or "-")
    console.print(table)


def search_table(cfg: Params, query: str, k: int, model_uri: str) -> None:
    """One-off search (`open_engine`). With a local sqlite store and the version already cached,
    the version and its catalogue pointer are read from the database and only the query tower
    loads (no MLflow import); otherwise MLflow resolves it and fills the cache for next time."""
    started = time.perf_counter()
    try:
        engine, ref = open_engine(model_uri, cache_dir=cfg.data.cache_dir, tracking_uri=tracking_uri(cfg.registry))
    except LookupError as exc:
        err_console.print(f"[red]{redact_uri(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(1) from exc
    info = {"version": ref.version, "catalogue_version": engine.catalogue_version}
    engine.query_tower  # noqa: B018 - load it now, so the timing below says what loading cost
    loaded = time.perf_counter()
    frame = engine.search_frame(pd.DataFrame({"query": [query], "k": [k]}))
    took = time.perf_counter() - loaded
    _print_hits(f"{query!r} - {model_uri} (v{info['version']}, catalogue {info['catalogue_version']}); "
                f"load {loaded - started:.1f} s, search {took * 1000:.0f} ms", frame)


def _search_url(url: str, query: str, k: int) -> None:
    """Ask a running `alignsearch serve` (for scripts: no model is loaded here)."""
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


def search(
    query: Annotated[str, typer.Argument(help="The text query, e.g. \"red sports car\".")],
    k: Annotated[int, typer.Option("-k", "--k", min=1, help="How many ads.")] = 10,
    model_uri: Annotated[Optional[str], typer.Option(help="Model to ask (default: params serve.model_uri, the champion).")] = None,  # noqa: UP045
    url: Annotated[Optional[str], typer.Option(help="Ask a running service instead, e.g. http://127.0.0.1:8080.")] = None,  # noqa: UP045
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Rank the ads for a query with the champion (or --model-uri, or a service at --url) and print a table."""
    cfg = load_config(params, set_)
    if not query.strip():
        err_console.print("[red]The query is empty.[/red]")
        raise typer.Exit(2)
    if k > cfg.serve.max_k:
        err_console.print(f"[red]-k {k} is above the limit serve.max_k={cfg.serve.max_k}.[/red]")
        raise typer.Exit(2)
    if url:
        _search_url(url, query, k)
        return
    search_table(cfg, query, k, model_uri or cfg.serve.model_uri)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: resolved by the OS, could be anything
        return False


def serve(
    host: Annotated[Optional[str], typer.Option(help="Bind address (default 127.0.0.1).")] = None,  # noqa: UP045
    port: Annotated[Optional[int], typer.Option(help="Port (default: params serve.port).")] = None,  # noqa: UP045
    model_uri: Annotated[Optional[str], typer.Option(help="Model to serve (default: the champion).")] = None,  # noqa: UP045
    allow_remote: Annotated[bool, typer.Option("--allow-remote", help="Allow a non-loopback --host (the service "
                                               f"has no authentication unless {API_KEY_ENV} is set).")] = False,
    log_traffic: Annotated[Optional[bool], typer.Option("--log/--no-log", help="Log every answered search and take "  # noqa: UP045
                                                        "clicks in traffic.store_uri (default: params "
                                                        "serve.log_traffic, on).")] = None,
    interleave_share: Annotated[Optional[float], typer.Option(min=0.0, max=1.0, help="Share of searches answered "  # noqa: UP045
                                                              "by a team-draft interleaving of the served model and "
                                                              "the challenger (default: params "
                                                              "serve.interleave_share, 0 = off).")] = None,
    challenger_uri: Annotated[Optional[str], typer.Option(help="The model interleaved with the served one "  # noqa: UP045
                                                          "(default: params serve.challenger_uri, the "
                                                          "challenger alias).")] = None,
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Serve search over HTTP (FastAPI): a search page at /, GET/POST /search, POST /click, GET /health,
    docs at /docs. Every answered search is logged in the traffic log (traffic.store_uri; --no-log: not).
    Follows the model version's live catalogue (`alignsearch ads add`): new versions are swapped in.
    With --interleave-share above 0, that share of searches interleaves the challenger's ranking
    with the served model's (both rank the served model's live catalogue; clicks are credited per model).
    With ALIGNSEARCH_API_KEY set, every route but the page needs the header X-API-Key (the page
    asks for it); without it, only requests naming the bind address (Host) are answered."""
    from components.catalogue.serving import build_service  # FastAPI: only the service needs it

    cfg = load_config(params, set_)
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
    port_ = port or cfg.serve.port
    # The app checks Host headers against the address it is bound to (no key: DNS rebinding).
    serve_cfg = cfg.serve.model_copy(update={
        "host": bind, "port": port_, "log_traffic": cfg.serve.log_traffic if log_traffic is None else log_traffic,
        "interleave_share": cfg.serve.interleave_share if interleave_share is None else interleave_share,
        "challenger_uri": challenger_uri or cfg.serve.challenger_uri})
    configure_mlflow(cfg.registry)
    try:
        service = build_service(uri, serve_cfg, cache_dir=cfg.data.cache_dir, tracking_uri=tracking_uri(cfg.registry),
                                api_key=api_key, traffic=cfg.traffic)
    except LookupError as exc:
        err_console.print(f"[red]{redact_uri(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(1) from exc
    service.watcher.start()  # follow the version's live catalogue (a new version is swapped in)
    engine, app_ = service.engine, service.app
    logged = (f"searches and clicks logged to {redact_uri(cfg.traffic.store_uri)}" if service.traffic_log is not None
              else "traffic logging off")
    if service.challenger is not None:
        challenger = service.challenger.info
        logged += (f"; {serve_cfg.interleave_share:.0%} of searches interleaved with {challenger['name']} "
                   f"v{challenger['version']}")
    elif serve_cfg.interleave_share > 0:
        err_console.print(f"[yellow]Not interleaving: {service.interleave_off}[/yellow]", soft_wrap=True)
    console.print(f"Serving {redact_uri(uri)} (catalogue {engine.catalogue_version}, {len(engine)} ads) on "
                  f"http://{bind}:{port_} (search page at /, docs at /docs); {logged}"
                  + (f"; API key required on every route but the page ({API_KEY_ENV})" if api_key else ""),
                  soft_wrap=True)
    uvicorn.run(app_, host=bind, port=port_, log_level="info")


def bench_serve(
    requests: Annotated[int, typer.Option(min=1, help="Requests to send.")] = 2000,
    concurrency: Annotated[int, typer.Option(min=1, help="Requests in flight at once.")] = 8,
    k: Annotated[int, typer.Option(min=1, help="Ads per request.")] = 10,
    rounds: Annotated[int, typer.Option(min=1, help="Alternating rounds the requests to the servers "
                                        "(traffic log off, on[, interleaving]) are split into.")] = 10,
    model_uri: Annotated[Optional[str], typer.Option(help="Model to serve (default: the champion).")] = None,  # noqa: UP045
    interleave_share: Annotated[float, typer.Option(min=0.0, max=1.0, help="Above 0: a third server, logging and "
                                                    "interleaving this share of searches with the challenger "
                                                    "(serve.challenger_uri), joins the rounds.")] = 0.0,
    out: Annotated[Path, typer.Option(help="Where bench_serve.json/.md go.")] = Path("reports/bench-serve"),
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """Start real `alignsearch serve`s on 127.0.0.1, the traffic log off and on (a scratch store in
    --out), and with --interleave-share a third that interleaves with the challenger; send each N
    requests at a concurrency in alternating rounds (p50/p95/p99 latency, throughput, errors), then
    sweep bad inputs (each must be 4xx) and clicks (each its status)."""
    cfg = load_config(params, set_)
    serve_args = ["--params", str(params), "--model-uri", model_uri or cfg.serve.model_uri]
    for item in set_ or []:
        serve_args += ["--set", item]
    try:
        report = measure_service(serve_args, out, requests=requests, concurrency=concurrency, k=k, rounds=rounds,
                                 interleave_share=interleave_share)
    except RuntimeError as exc:
        err_console.print(f"[red]{redact_uri(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(1) from exc
    console.print((out / "bench_serve.md").read_text(), markup=False, soft_wrap=True)
    console.print(f"Report: {out / 'bench_serve.json'}")
    failed = bench_errors(report)
    if failed:
        err_console.print(f"[red]{'; '.join(failed)}[/red]", soft_wrap=True)
        raise typer.Exit(1)


def bench_index(
    sizes: Annotated[str, typer.Option(help="Catalogue sizes, comma-separated.")] = "10000,100000,1000000",
    model_uri: ModelUriOption = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Dataset whose queries (and ads, for encoding) are used (default: params data.out_dir).")] = None,  # noqa: UP045
    encode_ads: Annotated[int, typer.Option(help="Ads to encode end to end for the throughput (0: skip).")] = 200,
    threads: Annotated[int, typer.Option(min=1, help="faiss threads while measuring.")] = 1,
    skip: Annotated[Optional[str], typer.Option(help="Index configs to leave out, comma-separated: name (every size) or name@size (e.g. hnsw32@1000000).")] = None,  # noqa: UP045
    out: Annotated[Path, typer.Option(help="Where bench_index.json/.md/.png go.")] = Path("reports/bench-index"),
    params: ParamsOption = PARAMS_FILE,
    set_: SetOption = None,
) -> None:
    """The ad index at scale: flat, HNSW, IVF-PQ and pq on embeddings shaped like the model's real ones
    (build time, bytes/ad, p50/p99 latency at batch 1 and 32, recall@10 vs exact), plus bulk
    encoding throughput of new ads end to end."""
    cfg = load_config(params, set_)
    configure_mlflow(cfg.registry)
    try:
        result = measure_index(model_uri or cfg.serve.model_uri, data or cfg.data.out_dir, cfg.data.cache_dir, out,
                               sizes=comma_list(sizes, int), encode_ads=encode_ads,
                               threads=threads, skip=set(comma_list(skip) or []), console=console)
    except LookupError as exc:
        err_console.print(f"[red]{redact_uri(str(exc))}[/red]", soft_wrap=True)
        raise typer.Exit(1) from exc
    console.print(result["paths"]["markdown"].read_text(), markup=False, soft_wrap=True)
    console.print(f"Report: {result['paths']['markdown']}, plot: {result['paths']['plot']}")
