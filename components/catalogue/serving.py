"""The search service of a registered model version, assembled once for `alignsearch serve`
and for the tests that stand in for it: the engine (`live.open_engine`: cached bundle, ONNX
query tower, current live catalogue), a `predict` over it as the pyfunc answers, a watcher that swaps in new catalogue
versions, the traffic log its searches and clicks go to (`TrafficLog`), and the FastAPI app.

The service (`search.service`) sits below the traffic log in the layers and knows it only as a
`SearchLog`; this module, on the traffic log's layer, gives it the real one: the `EventStore`
that `traffic.store_uri` names, a `BatchWriter` that takes impressions off the request path,
and the click rules (`traffic.clicks.record_click`).

With `serve.interleave_share` > 0 it also opens the challenger (`serve.challenger_uri`) beside
the served model (`open_challenger`): the challenger's engine ranks the served model's current
catalogue, encoded by the challenger's model (`live.ChallengerCatalogue`), and follows it when
the watcher swaps in a new version, so both always rank the same ads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from fastapi import FastAPI

from components.catalogue.images import resolve_image
from components.catalogue.live import CatalogueWatcher, ChallengerCatalogue, open_engine
from components.outputs import redact_uri
from components.registry.models import ModelRef
from components.search.config import ServeConfig
from components.search.engine import SearchEngine
from components.search.service import ClickRefused, SearchSource, create_app
from components.traffic.clicks import ClickError, record_click
from components.traffic.config import TrafficConfig
from components.traffic.events import Hit, Impression, open_store
from components.traffic.writer import BatchWriter

log = logging.getLogger(__name__)


class EngineModel:
    """What the service asks: `predict(frame)` answers as the registered pyfunc does (one row
    per query and hit), straight from an engine opened in this process."""

    def __init__(self, engine: SearchEngine) -> None:
        self.engine = engine

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        return self.engine.search_frame(frame)


class TrafficLog:
    """The service's `SearchLog` over the traffic log: impressions are queued to a `BatchWriter`
    (written in batches off the request path), clicks are checked against the log and written
    at once, each refused click a `ClickRefused` with its rule's status and reason."""

    def __init__(self, cfg: TrafficConfig):
        self.cfg = cfg
        self.store = open_store(cfg)
        self.writer = BatchWriter.from_config(self.store, cfg)

    def log_search(self, *, request_id: str, query: str, k: int, hits: list[tuple[str, int, float]],
                   model_name: str | None, model_version: str | None, catalogue_version: str | None,
                   source: SearchSource, took_ms: float, contributors: list[str] | None = None) -> None:
        self.writer.put(Impression(
            event_id=request_id, query=query, k=k, hits=tuple(Hit(ad_id, position, score) for ad_id, position, score in hits),
            model_name=model_name, model_version=model_version, catalogue_version=catalogue_version, source=source,
            took_ms=took_ms, contributors=tuple(contributors) if contributors is not None else None))

    def click(self, request_id: str, ad_id: str) -> dict:
        try:
            # With the writer: a click that arrives before its search's batch is written finds it.
            click = record_click(self.store, request_id, ad_id, window_s=self.cfg.click_window_s, writer=self.writer)
        except ClickError as exc:
            raise ClickRefused(exc.http_status, exc.reason, str(exc)) from exc
        return {"click_id": click.click_id, "request_id": click.request_id, "ad_id": click.ad_id,
                "position": click.position}

    def stats(self) -> dict:
        stats = self.writer.stats
        return {"logging": "on", "store_uri": redact_uri(self.cfg.store_uri), "queued": stats.pending,
                "written": stats.written, "dropped": stats.dropped, "failed": stats.failed,
                "failed_batches": stats.failed_batches, "batches": stats.batches,
                "batch_size": self.cfg.batch_size, "flush_ms": self.cfg.flush_ms}

    def close(self) -> None:
        """Write what is queued, stop the writer thread, release the store's connections."""
        self.writer.close()
        self.store.close()


def open_traffic_log(cfg: ServeConfig, traffic: TrafficConfig | None) -> TrafficLog | None:
    """The log the service writes to; None (no store opened) when logging is off: no traffic
    settings given, or `serve.log_traffic` false."""
    return TrafficLog(traffic) if traffic is not None and cfg.log_traffic else None


class ChallengerModel:
    """The service's `Challenger`: a second model version whose engine ranks the served model's
    current catalogue (`catalogue`, a `ChallengerCatalogue`, keeps it there)."""

    def __init__(self, engine: SearchEngine, ref: ModelRef, catalogue: ChallengerCatalogue, uri: str) -> None:
        self.engine, self.ref, self.catalogue, self.uri = engine, ref, catalogue, redact_uri(uri)
        self.info = {"name": ref.name, "version": ref.version, "run_id": ref.run_id}

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        return self.engine.search_frame(frame)

    def describe(self) -> dict:
        return {"challenger_uri": self.uri, "challenger_catalogue_version": self.engine.catalogue_version,
                "challenger_catalogue_error": redact_uri(self.catalogue.last_error)}


def open_challenger(cfg: ServeConfig, served: ModelRef, served_engine: SearchEngine, *, cache_dir: Path,
                    tracking_uri: str | None = None) -> tuple[ChallengerModel | None, str]:
    """The challenger to interleave with `served`, on `served_engine`'s current catalogue, or
    (None, why not): interleaving off (share 0), no version at `cfg.challenger_uri`, the
    challenger is the served version itself, or the served catalogue could not be encoded by
    the challenger's model (an ad's image not found)."""
    if cfg.interleave_share <= 0:
        return None, "serve.interleave_share is 0"
    uri = cfg.challenger_uri
    try:
        engine, ref = open_engine(uri, cache_dir=cache_dir, tracking_uri=tracking_uri, catalogue="bundle")
    except LookupError as exc:
        return None, f"no challenger: {redact_uri(str(exc))}"
    if (ref.name, ref.version) == (served.name, served.version):
        return None, f"{redact_uri(uri)} is the served version ({ref.name} v{ref.version}): nothing to compare"
    catalogue = ChallengerCatalogue(engine, ref, served, cache_dir=cache_dir)
    if not catalogue.follow(served_engine.catalogue):
        return None, (f"{ref.name} v{ref.version} cannot rank catalogue {served_engine.catalogue_version} of "
                      f"{served.name} v{served.version}: {redact_uri(catalogue.last_error)}")
    return ChallengerModel(engine, ref, catalogue, uri), ""


@dataclass
class Service:
    app: FastAPI
    engine: SearchEngine
    watcher: CatalogueWatcher
    info: dict[str, str]  # name, version, run_id of the served model version
    traffic_log: TrafficLog | None = None  # None: logging off
    challenger: ChallengerModel | None = None  # None: not interleaving
    interleave_off: str = ""  # why not, when serve.interleave_share > 0


def build_service(model_uri: str, cfg: ServeConfig, *, cache_dir: Path, tracking_uri: str | None = None,
                  api_key: str | None = None, poll_s: float | None = None,
                  traffic: TrafficConfig | None = None, interleave_seed: int = 0) -> Service:
    """The app serving `model_uri` (`LookupError` when no such version). The watcher is not
    started: the caller starts it beside the server (`service.watcher.start()`). With `traffic`
    (and `cfg.log_traffic`), searches and clicks are logged to `traffic.store_uri`; the app's
    shutdown writes what is queued. With `cfg.interleave_share` > 0, the challenger
    (`open_challenger`) answers that share of searches with the served model, interleaved
    (drawn from `interleave_seed` and the request id); when there is none, the served model
    answers alone and /health says why."""
    engine, ref = open_engine(model_uri, cache_dir=cache_dir, tracking_uri=tracking_uri)
    info = {"name": ref.name, "version": ref.version, "run_id": ref.run_id}
    challenger, interleave_off = open_challenger(cfg, ref, engine, cache_dir=cache_dir, tracking_uri=tracking_uri)
    if cfg.interleave_share > 0 and challenger is None:
        log.warning("not interleaving: %s", interleave_off)
    watcher = CatalogueWatcher(engine, ref.name, ref.version, cache_dir=cache_dir,
                               interval_s=cfg.catalogue_poll_s if poll_s is None else poll_s,
                               on_swap=challenger.catalogue.follow if challenger is not None else None)
    traffic_log = open_traffic_log(cfg, traffic)
    app = create_app(EngineModel(engine), cfg, model_uri=model_uri, info=info, api_key=api_key,
                     engine=engine, watcher=watcher,
                     image_file=lambda image_ref: resolve_image(image_ref, cache_dir, dataset_dir=ref.dataset_dir),
                     search_log=traffic_log, challenger=challenger, interleave_seed=interleave_seed,
                     interleave_off=interleave_off)
    return Service(app, engine, watcher, info, traffic_log, challenger, interleave_off)
