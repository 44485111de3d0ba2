"""The live catalogue's tests: a model trained once per session by the real retraining flow on
the tiny synthetic dataset (as tests/ops does), each test on its own copy of the store.
Nothing is mocked: real MLflow store, real encoding, real HTTP servers and browser."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))  # ops_helpers: one store helper set

from ops_helpers import as_flow_params, ops_params, relocate_store  # noqa: E402

os.environ.pop("MLFLOW_TRACKING_URI", None)

URI = "models:/alignsearch@challenger"


@pytest.fixture(scope="session")
def catalogue_template(synthetic_dataset_dir, tmp_path_factory):
    """One retraining flow run (v1 registered as challenger): (root, result). Read only."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    from flows.retrain import retrain_flow

    root = tmp_path_factory.mktemp("catalogue-template")
    storage = tmp_path_factory.mktemp("catalogue-prefect")
    with prefect_test_harness(server_startup_timeout=60), temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}):
        result = retrain_flow(as_flow_params(ops_params(root, synthetic_dataset_dir)))
    return root, result


@pytest.fixture
def store(catalogue_template, synthetic_dataset_dir, tmp_path):
    """This test's own copy of the trained store: (root, params)."""
    from mlflow.tracking._tracking_service import utils as mlflow_service_utils

    from components.registry.tracking import configure_mlflow

    template, _ = catalogue_template
    root = tmp_path / "store"
    shutil.copytree(template, root)
    relocate_store(root, template)
    cfg = ops_params(root, synthetic_dataset_dir)
    configure_mlflow(cfg.registry)
    mlflow_service_utils._artifact_repos_cache.clear()
    yield root, cfg
    mlflow_service_utils._artifact_repos_cache.clear()


def new_ads_dir(dataset_dir: Path, out_dir: Path, picks: list[tuple[str, str, str]], *,
                same_bytes: bool = False) -> Path:
    """A folder of new ads: (new ad id, title, id of the dataset ad whose image it reuses).

    The image shows the same pixels as the source ad's, in a file of its own (a PNG text chunk
    names the new ad): identical files are one search result, so `same_bytes=True` copies
    the source file byte for byte."""
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    ads = pd.read_parquet(dataset_dir / "ads.parquet").set_index("ad_id")
    (out_dir / "images").mkdir(parents=True)
    rows = []
    for new_id, title, source_id in picks:
        source = dataset_dir / ads.loc[source_id, "image_path"]
        name = f"images/{new_id}{source.suffix}"
        if same_bytes:
            shutil.copyfile(source, out_dir / name)
        else:
            info = PngInfo()
            info.add_text("ad", new_id)
            with Image.open(source) as image:
                assert image.format == "PNG", f"{source}: the synthetic dataset's images are PNG"
                image.save(out_dir / name, format="PNG", pnginfo=info)
        rows.append({"ad_id": new_id, "title": title, "image_path": name})
    pd.DataFrame(rows).to_parquet(out_dir / "ads.parquet", index=False)
    return out_dir


class LiveServer:
    """A real uvicorn server on 127.0.0.1 in a thread, over the service `alignsearch serve`
    builds (`components.catalogue.serving.build_service`)."""

    def __init__(self, cfg, model_uri: str = URI, poll_s: float = 0.2, api_key: str | None = None):
        import threading

        import uvicorn
        from ops_helpers import free_port

        from components.catalogue.serving import build_service

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"X-API-Key": api_key} if api_key else {}
        serve_cfg = cfg.serve.model_copy(update={"max_in_flight": 64, "max_k": 1000, "host": "127.0.0.1",
                                                 "port": self.port})
        service = build_service(model_uri, serve_cfg, cache_dir=cfg.data.cache_dir, poll_s=poll_s, api_key=api_key)
        self.engine, self.watcher, app = service.engine, service.watcher, service.app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        import time

        import httpx

        self.watcher.start()
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", headers=self.headers, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the test server did not answer /health in 30 s")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.watcher.stop()
