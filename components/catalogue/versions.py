"""Catalogue versions in MLflow: each change is a run, the model version points at its current one.

Why MLflow runs and not a DVC-tracked directory: a catalogue is only meaningful with the
model version that encoded it (its embeddings come from that version's ad tower), and the
registry is what serving already reads. A run in experiment `<experiment>-catalogue` holds
the whole version as artifacts (`catalogue/`, see `store`), its parent run, what changed and
how fast the encoding went; the registered model version carries the pointer
(`alignsearch.catalogue.run_id` / `.version` tags). So an answer's `catalogue_version`
traces to a run, the run to its model version, and it works unchanged against a team's
MLflow server with S3 artifacts. DVC would need a git commit from the serving host for
every hourly catalogue change, and would not tie a catalogue to a model version.

Changes are serialised per store (`components.registry.lock`: a file lock beside a sqlite
store, a lock model on a server) and the pointer is moved with compare-and-set: a change
computed from a version that has since moved is refused.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from components.outputs import atomic_dir
from components.registry.lock import store_lock
from components.registry.tracking import client as _client
from components.registry.versions import registry_error
from components.search.catalogue import Catalogue, is_saved

log = logging.getLogger(__name__)

TAG = "alignsearch.catalogue"
RUN_ID_TAG, VERSION_TAG = f"{TAG}.run_id", f"{TAG}.version"
ARTIFACT_PATH = "catalogue"
EXPERIMENT_SUFFIX = "-catalogue"


class CatalogueConflict(RuntimeError):
    """The catalogue moved while this change was computed from an older version."""


def pointer(model_name: str, model_version: str) -> tuple[str, int] | None:
    """(run id, version number) of the current catalogue of a model version; None: version 0
    (the model's own ads)."""
    try:
        version = _client().get_model_version(model_name, str(model_version))
    except Exception as exc:
        raise registry_error(f"reading {model_name} v{model_version}", exc) from exc
    return pointer_from_tags(version.tags or {})


def pointer_from_tags(tags: dict[str, str]) -> tuple[str, int] | None:
    """The pointer as a model version's tags hold it (read by `pointer`, or by a fast read)."""
    if not tags.get(RUN_ID_TAG):
        return None
    return tags[RUN_ID_TAG], int(tags.get(VERSION_TAG, "0"))


CATALOGUE_LOCK_TIMEOUT_S = 600.0


@contextlib.contextmanager
def catalogue_lock(model_name: str, timeout_s: float = CATALOGUE_LOCK_TIMEOUT_S) -> Iterator[None]:
    """One catalogue change at a time per store (`components.registry.lock.store_lock`)."""
    with store_lock(model_name, "catalogue", timeout_s=timeout_s):
        yield


def _experiment_id(main_experiment: str) -> str:
    import mlflow

    name = main_experiment + EXPERIMENT_SUFFIX
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None  # a server decides
    main = mlflow.get_experiment_by_name(main_experiment)
    if main is not None and main.artifact_location.startswith("file:"):
        location = main.artifact_location.rstrip("/") + "/catalogue"
    return mlflow.create_experiment(name, artifact_location=location)


def publish(catalogue: Catalogue, *, experiment: str, images: dict[str, Path] | None = None,
            metrics: dict[str, float] | None = None, expected_run_id: str | None,
            before_save=None) -> Catalogue:
    """Record `catalogue` (a `Catalogue.changed` result) as a run and make it the model
    version's current catalogue, if the current one is still `expected_run_id`.
    `before_save(run_id)`: called once the run exists, before the version is written."""
    client = _client()
    name, version = catalogue.model_name, catalogue.model_version
    current = pointer(name, version)
    if (current[0] if current else None) != expected_run_id:
        raise CatalogueConflict(f"the catalogue of {name} v{version} moved to {current} while this change was "
                                f"computed from {expected_run_id or 'v0'}; nothing was changed, run it again")
    tags = {f"{TAG}.model_name": name, f"{TAG}.model_version": version, VERSION_TAG: str(catalogue.version),
            f"{TAG}.parent_run_id": catalogue.parent_run_id or "", "mlflow.runName":
            f"catalogue {name} v{version} c{catalogue.version}"}
    run = client.create_run(_experiment_id(experiment), tags=tags)
    run_id = run.info.run_id
    try:
        if before_save is not None:
            before_save(run_id)
        with tempfile.TemporaryDirectory() as scratch:
            folder = catalogue.save(Path(scratch) / ARTIFACT_PATH, images=images)
            client.log_artifacts(run_id, str(folder), ARTIFACT_PATH)
        for key, value in {"num_ads": len(catalogue), **{f"num_{k}": len(v) for k, v in catalogue.change.items()},
                           **(metrics or {})}.items():
            client.log_metric(run_id, key, float(value))
        client.log_param(run_id, "index_kind", catalogue.index.kind)
        client.set_terminated(run_id, "FINISHED")
    except Exception:
        client.set_terminated(run_id, "FAILED")
        raise
    catalogue.run_id = run_id
    try:  # version number first, the run id last: a pointer with a run id is complete
        client.set_model_version_tag(name, version, VERSION_TAG, str(catalogue.version))
        client.set_model_version_tag(name, version, RUN_ID_TAG, run_id)
    except Exception as exc:
        raise registry_error(f"pointing {name} v{version} at catalogue run {run_id}", exc) from exc
    log.info("catalogue %s of %s v%s: run %s (%d ads; %s)", catalogue.label, name, version, run_id,
             len(catalogue), catalogue.change)
    return catalogue


def local_dir(cache_dir: Path, run_id: str) -> Path:
    return Path(cache_dir) / "catalogue" / "runs" / run_id / ARTIFACT_PATH


def fetch(run_id: str, cache_dir: Path) -> Path:
    """The catalogue version recorded by `run_id`, downloaded once into `cache_dir` (write,
    then rename: a killed download never looks complete)."""
    import mlflow

    target = local_dir(cache_dir, run_id)
    if is_saved(target):
        return target
    with atomic_dir(target, keep_existing=is_saved) as scratch, tempfile.TemporaryDirectory(dir=scratch.parent) as download:
        got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ARTIFACT_PATH, dst_path=download))
        for item in got.iterdir():
            item.rename(scratch / item.name)
    return target


def load_version(run_id: str, cache_dir: Path) -> Catalogue:
    return Catalogue.load(fetch(run_id, cache_dir), run_id=run_id)
