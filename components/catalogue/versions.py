"""Catalogue versions in MLflow: each change is a run, the model version points at its current one.

Why MLflow runs and not a DVC-tracked directory: a catalogue is only meaningful with the
model version that encoded it (its embeddings come from that version's ad tower), and the
registry is what serving already reads. A run in experiment `<experiment>-catalogue` holds
the whole version as artifacts (`catalogue/`, see `store`), its parent run, what changed and
how fast the encoding went; the registered model version carries the pointer in one tag
(`alignsearch.catalogue` = `<run id>:<version>`, written in one call, so no reader ever sees
half of it; stores written before hold it as two tags, `.run_id` and `.version`, still read).
So an answer's `catalogue_version`
traces to a run, the run to its model version, and it works unchanged against a team's
MLflow server with S3 artifacts. DVC would need a git commit from the serving host for
every hourly catalogue change, and would not tie a catalogue to a model version.

Changes are serialised per store by the catalogue lock (`catalogue_lock`: a file lock beside
a sqlite store, a lock model on a server), which a promotion also holds while it carries the
champion's catalogue over and moves `champion`; the pointer is moved with compare-and-set: a
change computed from a version that has since moved is refused.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

from components.outputs import atomic_dir
from components.registry.lock import CATALOGUE, store_lock
from components.registry.tracking import client as _client
from components.registry.versions import is_absent, registry_error
from components.search.catalogue import Catalogue, is_saved

log = logging.getLogger(__name__)

TAG = "alignsearch.catalogue"
POINTER_TAG = TAG  # on the model version: "<run id>:<version>"
RUN_ID_TAG, VERSION_TAG = f"{TAG}.run_id", f"{TAG}.version"  # the pointer before it was one tag; VERSION_TAG
# also names a catalogue run's own version number
ARTIFACT_PATH = "catalogue"
EXPERIMENT_SUFFIX = "-catalogue"


class CatalogueConflict(RuntimeError):
    """The catalogue moved while this change was computed from an older version."""


def pointer(model_name: str, model_version: str) -> tuple[str, int] | None:
    """(run id, version number) of the current catalogue of a model version; None: version 0
    (the model's own ads)."""
    return pointer_from_tags(_version_tags(model_name, model_version))


def _version_tags(model_name: str, model_version: str) -> dict[str, str]:
    try:
        version = _client().get_model_version(model_name, str(model_version))
    except Exception as exc:
        raise registry_error(f"reading {model_name} v{model_version}", exc) from exc
    return dict(version.tags or {})


def pointer_from_tags(tags: dict[str, str]) -> tuple[str, int] | None:
    """The pointer as a model version's tags hold it (read by `pointer`, or by a fast read):
    the one tag, else the two of a store written before it."""
    if tags.get(POINTER_TAG):
        run_id, _, version = tags[POINTER_TAG].rpartition(":")
        return run_id, int(version)
    if not tags.get(RUN_ID_TAG):
        return None
    return tags[RUN_ID_TAG], int(tags.get(VERSION_TAG, "0"))


def pointer_value(run_id: str, version: int) -> str:
    return f"{run_id}:{version}"


CATALOGUE_LOCK_TIMEOUT_S = 600.0


@contextlib.contextmanager
def catalogue_lock(model_name: str, timeout_s: float = CATALOGUE_LOCK_TIMEOUT_S) -> Iterator[None]:
    """One catalogue change at a time per store, and none while a promotion carries the
    champion's catalogue over and moves `champion` (`components.registry.lock.store_lock`)."""
    with store_lock(model_name, CATALOGUE, timeout_s=timeout_s):
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
    version_tags = _version_tags(name, version)
    current = pointer_from_tags(version_tags)
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
    try:  # one tag, one call: a reader sees the old pointer or the new one
        client.set_model_version_tag(name, version, POINTER_TAG, pointer_value(run_id, catalogue.version))
    except Exception as exc:
        raise registry_error(f"pointing {name} v{version} at catalogue run {run_id}", exc) from exc
    _drop_two_tag_pointer(client, name, version, version_tags)
    log.info("catalogue %s of %s v%s: run %s (%d ads; %s)", catalogue.label, name, version, run_id,
             len(catalogue), catalogue.change)
    return catalogue


def _drop_two_tag_pointer(client, name: str, version: str, tags: dict[str, str]) -> None:
    """The pointer as two tags (a store written before the one tag) goes, once the one tag is
    written: two pointers that disagree would only confuse whoever reads the tags."""
    for key in (RUN_ID_TAG, VERSION_TAG):
        if key in tags:
            try:
                client.delete_model_version_tag(name, version, key)
            except Exception as exc:
                if not is_absent(exc):
                    raise registry_error(f"removing the old pointer tag {key} of {name} v{version}", exc) from exc


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
