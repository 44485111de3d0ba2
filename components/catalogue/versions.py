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

Changes are serialised per store (a file lock beside a sqlite store) and the pointer is
moved with compare-and-set: a change computed from a version that has since moved is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from components.catalogue.store import IMAGES_DIR, Catalogue
from components.locks import file_lock

log = logging.getLogger(__name__)

TAG = "alignsearch.catalogue"
RUN_ID_TAG, VERSION_TAG = f"{TAG}.run_id", f"{TAG}.version"
ARTIFACT_PATH = "catalogue"
EXPERIMENT_SUFFIX = "-catalogue"


class CatalogueConflict(RuntimeError):
    """The catalogue moved while this change was computed from an older version."""


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def pointer(model_name: str, model_version: str) -> tuple[str, int] | None:
    """(run id, version number) of the current catalogue of a model version; None: version 0
    (the model's own ads)."""
    from components.registry.versions import registry_error

    try:
        version = _client().get_model_version(model_name, str(model_version))
    except Exception as exc:
        raise registry_error(f"reading {model_name} v{model_version}", exc) from exc
    tags = version.tags or {}
    if not tags.get(RUN_ID_TAG):
        return None
    return tags[RUN_ID_TAG], int(tags.get(VERSION_TAG, "0"))


@contextlib.contextmanager
def catalogue_lock(timeout_s: float = 600.0):
    """One catalogue change at a time per local sqlite store (a file lock beside it); on a
    server the compare-and-set on the pointer still refuses a lost update."""
    import mlflow

    uri = mlflow.get_registry_uri() or ""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri.removeprefix("sqlite:///") + ".catalogue.lock")
    with file_lock(path, timeout_s, lambda p: CatalogueConflict(
            f"another catalogue change holds {p} for over {timeout_s:.0f} s")):
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

    from components.registry.versions import registry_error

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
    if (target / "catalogue.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=ARTIFACT_PATH,
                                                       dst_path=str(scratch)))
        try:
            os.replace(got, target)
        except OSError:
            if not (target / "catalogue.json").is_file():  # not another process that won the race
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def load_version(run_id: str, cache_dir: Path) -> Catalogue:
    return Catalogue.load(fetch(run_id, cache_dir), run_id=run_id)


def resolve_image(ref: str, cache_dir: Path) -> Path | None:
    """The local file of an ad's `image_ref` (downloaded from its run when needed), or None."""
    if ref.startswith("file:"):
        path = Path(ref.removeprefix("file:"))
        return path if path.is_file() else None
    if ref.startswith("run:"):
        run_id, _, rel = ref.removeprefix("run:").partition("/")
        if not rel.startswith(IMAGES_DIR + "/") or ".." in Path(rel).parts:
            return None
        path = local_dir(cache_dir, run_id) / rel
        if not path.is_file():
            try:
                path = Path(fetch(run_id, cache_dir)) / rel
            except Exception as exc:  # a run that is gone: the ad has no image to show
                log.warning("image %s: %s", ref, exc)
                return None
        return path if path.is_file() else None
    return None
