"""The search service of a registered model version, assembled once for `alignsearch serve`
and for the tests that stand in for it: the engine (`live.open_engine`: cached bundle, ONNX
query tower, current live catalogue), a `predict` over it as the pyfunc answers, a watcher that swaps in new catalogue
versions, and the FastAPI app."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from fastapi import FastAPI

from components.catalogue.images import resolve_image
from components.catalogue.live import CatalogueWatcher, open_engine
from components.search.config import ServeConfig
from components.search.engine import SearchEngine
from components.search.service import create_app


class EngineModel:
    """What the service asks: `predict(frame)` answers as the registered pyfunc does (one row
    per query and hit), straight from an engine opened in this process."""

    def __init__(self, engine: SearchEngine) -> None:
        self.engine = engine

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        return self.engine.search_frame(frame)


@dataclass
class Service:
    app: FastAPI
    engine: SearchEngine
    watcher: CatalogueWatcher
    info: dict[str, str]  # name, version, run_id of the served model version


def build_service(model_uri: str, cfg: ServeConfig, *, cache_dir: Path, tracking_uri: str | None = None,
                  api_key: str | None = None, poll_s: float | None = None) -> Service:
    """The app serving `model_uri` (`LookupError` when no such version). The watcher is not
    started: the caller starts it beside the server (`service.watcher.start()`)."""
    engine, ref = open_engine(model_uri, cache_dir=cache_dir, tracking_uri=tracking_uri)
    info = {"name": ref.name, "version": ref.version, "run_id": ref.run_id}
    watcher = CatalogueWatcher(engine, ref.name, ref.version, cache_dir=cache_dir,
                               interval_s=cfg.catalogue_poll_s if poll_s is None else poll_s)
    app = create_app(EngineModel(engine), cfg, model_uri=model_uri, info=info, api_key=api_key,
                     engine=engine, watcher=watcher,
                     image_file=lambda image_ref: resolve_image(image_ref, cache_dir, dataset_dir=ref.dataset_dir))
    return Service(app, engine, watcher, info)
