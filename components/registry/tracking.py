"""MLflow tracking set-up and the small helpers every run uses.

The tracking URI is always set explicitly (with it unset MLflow may fall back to a file store
under ./mlruns and refuse to start; docs/install.md). `MLFLOW_TRACKING_URI` wins over params.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import subprocess
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from components.outputs import redact_uri
from components.registry.config import RegistryConfig

log = logging.getLogger(__name__)

# MLflow caps a param value at 6,000 characters.
MAX_PARAM_CHARS = 6000


# `mlflow.set_tracking_uri` also writes MLFLOW_TRACKING_URI into the environment. Remember every
# value we wrote and the one the user set, so later calls still tell the user's setting from ours.
_written: set[str] = set()
_user_uri: list[str | None] = [None]


def tracking_uri(cfg: RegistryConfig) -> str:
    """The URI in use: the user's `MLFLOW_TRACKING_URI` when set, else `cfg.tracking_uri`."""
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env and from_env not in _written:
        _user_uri[0] = from_env  # set by the user (before we ever wrote, or changed since)
    elif from_env != _user_uri[0]:
        _user_uri[0] = None  # unset, or a value we wrote for some params
    return _user_uri[0] or cfg.tracking_uri


def sqlite_path(uri: str | None) -> Path | None:
    """The database file of a local `sqlite:///` store; None for any other store (a server)."""
    return Path(uri.removeprefix("sqlite:///")) if uri and uri.startswith("sqlite:///") else None


def client():
    """The MLflow client of the configured store (`configure_mlflow` sets it): the one way the
    components talk to tracking and registry."""
    from mlflow import MlflowClient

    return MlflowClient()


def registry_uri() -> str:
    """The registry URI in use (after `configure_mlflow`)."""
    import mlflow

    return mlflow.get_registry_uri() or ""


def use_store(uri: str) -> None:
    """Point MLflow's tracking and registry at `uri` (reading only: `configure_mlflow` also
    makes sure the experiment exists)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _written.add(uri)
    if redact_uri(uri) != uri:  # MLflow prints "View run ... at: <this URI>/#/..." when a run ends
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def configure_mlflow(cfg: RegistryConfig) -> str:
    """Point MLflow (tracking and registry) at the store and make sure the experiment exists
    with its artifacts where `cfg.artifact_location` says; returns the experiment id."""
    import mlflow

    uri = tracking_uri(cfg)
    db = sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    use_store(uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        artifact_location = None  # a server decides for itself
        if db is not None:  # a local store: artifacts beside the database
            local = Path(cfg.artifact_location) if uri == cfg.tracking_uri else db.parent / "artifacts"
            artifact_location = local.resolve().as_uri()
        experiment_id = mlflow.create_experiment(cfg.experiment, artifact_location=artifact_location)
    # The process's active experiment too: an earlier `mlflow.set_experiment` (another store, a
    # notebook) would make `mlflow.start_run(run_id=...)` of our runs refuse them.
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params as MLflow params: dotted keys (`match.lr`), JSON values without credentials
    (`redact_uri`), capped length."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = redact_uri(text)[:MAX_PARAM_CHARS]
    return out


def redact_params(params: Any) -> Any:
    """`params` (nested dicts and lists) with every string through `redact_uri`: what a run may
    record of them (its params.json)."""
    if isinstance(params, Mapping):
        return {key: redact_params(value) for key, value in params.items()}
    if isinstance(params, list | tuple):
        return [redact_params(value) for value in params]
    return redact_uri(params) if isinstance(params, str) else params


def metric_key(name: str) -> str:
    """An MLflow-safe metric name: MLflow rejects `@`, so `ndcg@10` is logged as `ndcg_at_10`."""
    return name.replace("@", "_at_")


def numeric_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric entries of a (nested) metrics dict as MLflow metrics: keys joined with `/`
    (`eval/ours/test/image_only/auc`), `@` spelled `_at_` (`metric_key`)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(numeric_metrics(value, f"{name}/"))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[metric_key(name)] = float(value)
    return out


def git_state(repo: Path | None = None) -> dict[str, str]:
    """The git commit of the code that runs, and whether the tree had local changes."""
    cwd = Path(repo or Path.cwd())
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": "unknown", "git_dirty": "unknown"}
    return {"git_commit": commit, "git_dirty": str(bool(dirty)).lower()}


def code_version(paths: Iterable[Path]) -> str:
    """A hash of the Python sources at `paths` (files, or directories searched recursively):
    part of every stage cache key, so a code change retrains (a git commit alone misses
    uncommitted edits)."""
    digest = hashlib.sha256()
    for root in map(Path, paths):
        files = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for path in files:
            digest.update(str(path.relative_to(root.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def log_params(client, run_id: str, params: Mapping[str, Any]) -> None:
    """Every (nested) param of `params`, flattened, in batches (MLflow takes 100 at a time)."""
    from mlflow.entities import Param

    items = list(flatten_params(params).items())
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[start:start + 100]])


def log_metrics(client, run_id: str, metrics: Mapping[str, float]) -> None:
    """Metrics at step 0, in batches (MLflow takes 1,000 at a time)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = list(metrics.items())
    for start in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=[Metric(metric_key(k), float(v), now, 0) for k, v in items[start:start + 1000]])


def source_tags(entry_point: str, repo: Path | None = None) -> dict[str, str]:
    """MLflow's own source tags (the run page's "Source" and its commit): `mlflow.source.name`,
    `.type` and, when the code is a git checkout, `mlflow.source.git.commit`."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_SOURCE_NAME, MLFLOW_SOURCE_TYPE

    tags = {MLFLOW_SOURCE_NAME: entry_point, MLFLOW_SOURCE_TYPE: "JOB"}
    commit = git_state(repo)["git_commit"]
    if commit != "unknown":
        tags[MLFLOW_GIT_COMMIT] = commit
    return tags


@contextlib.contextmanager
def without_integer_schema_hint() -> Iterator[None]:
    """MLflow hints on every schema it infers with an integer column that integers cannot hold
    missing values; ours (counts, ranks, `k`) are never missing, so the hint is noise to a user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        yield


def log_dataset_input(client, run_id: str, dataset_dir: Path, digest: str, counts: Mapping[str, Mapping[str, int]],
                      *, name: str | None = None, context: str = "training") -> None:
    """The run's dataset (the run page's "Datasets"): `mlflow.data` dataset with the DVC hash
    as digest, the directory as source, and the per-table, per-split counts (as rows of the
    dataset and as input tags `<table>.<split>`)."""
    import pandas as pd
    from mlflow.data import from_pandas
    from mlflow.data.dataset_source_registry import get_registered_sources
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    frame = pd.DataFrame([{"table": table, **{s: int(n) for s, n in per_split.items()}}
                          for table, per_split in counts.items()])
    source = Path(dataset_dir).resolve()
    # An explicit source: MLflow registers its local-files source twice, so a bare path
    # "can be interpreted in multiple ways" (a UserWarning on every run) though both are the same.
    local = next(s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource")
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
    tags += [InputTag(f"{table}.{split}", str(n)) for table, per_split in counts.items() for split, n in per_split.items()]
    with without_integer_schema_hint():  # the schema is inferred lazily, up to the entity
        dataset = from_pandas(frame, source=local(str(source)), name=name or source.name, digest=digest)
        client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=tags)])
