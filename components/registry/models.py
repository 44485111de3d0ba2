"""From a model URI to a registered version and its search bundle on local disk: the one route
(`open_model`) that search, serve, the live catalogue, promotion and bench-index take.

The bundle of a version is downloaded once into the local cache, keyed by the run that logged
it (a run id is unique across stores; `name/version` is not: every store has an `alignsearch`
v1), and its query tower is exported to ONNX there, so later searches of that version need
neither torch nor transformers. Against a local sqlite store the version is read straight from
its tables (read-only, no MLflow import: about 1.5 s of a one-off search); anything that read
cannot answer (a server, a schema it does not know) goes through MLflow.
"""

from __future__ import annotations

import logging
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from components.outputs import atomic_dir
from components.registry.tracking import client, sqlite_path, use_store
from components.registry.versions import describe, registry_error, training_dataset_dir
from components.search import onnx_query
from components.search.bundle import SCORER_DIR, is_bundle

log = logging.getLogger(__name__)

BUNDLE_ARTIFACT = "bundle"  # the bundle's artifact name inside the logged pyfunc


@dataclass
class ModelRef:
    """A registered model version and its search bundle on local disk."""

    name: str
    version: str
    bundle_dir: Path
    dataset_dir: Path | None
    run_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)  # the version's tags when it was opened

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None] | None:
    """models:/name@alias -> (name, alias, None); models:/name/3 -> (name, None, "3"); else None."""
    if not model_uri.startswith("models:/"):
        return None
    rest = model_uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    name, _, version = rest.partition("/")
    return (name, None, version) if version.isdigit() else None


def bundle_cache(cache_dir: Path, run_id: str) -> Path:
    """Where a version's bundle is kept locally."""
    return Path(cache_dir) / "catalogue" / "bundles" / run_id / "bundle"


def _read_sqlite(tracking_uri: str | None, model_uri: str) -> tuple[str, str, str, dict[str, str]] | None:
    """(name, version, run id, version tags) read-only from a local sqlite store, or None when
    not such a store or the model/alias is not there (the MLflow path then says why)."""
    parsed = parse_model_uri(model_uri)
    db = sqlite_path(tracking_uri)
    if parsed is None or db is None or not db.is_file():
        return None
    name, alias, version = parsed
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            if alias is not None:
                row = conn.execute("select version from registered_model_aliases where name = ? and alias = ?",
                                   (name, alias)).fetchone()
                if row is None:
                    return None
                version = str(row[0])
            tags = dict(conn.execute("select key, value from model_version_tags where name = ? and version = ?",
                                     (name, int(version))).fetchall())
            row = conn.execute("select run_id from model_versions where name = ? and version = ?",
                               (name, int(version))).fetchone()
    except sqlite3.Error as exc:  # a schema this does not know: the MLflow path handles it
        log.debug("fast registry read of %s failed: %s", db, exc)
        return None
    if row is None or not row[0]:
        return None
    return name, version, str(row[0]), tags


def _download(model_uri: str, target: Path) -> Path:
    """The bundle inside the logged pyfunc at `model_uri`, written to `target` (write, then
    rename), with its query tower exported to ONNX."""
    import mlflow

    with atomic_dir(target) as scratch, tempfile.TemporaryDirectory(dir=scratch.parent) as download:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=download))
        bundle = local / "artifacts" / BUNDLE_ARTIFACT
        if not bundle.is_dir():
            raise FileNotFoundError(f"{model_uri}: no search bundle in the model (looked for {bundle})")
        for item in bundle.iterdir():
            item.rename(scratch / item.name)
        _export_query_tower(scratch)
    return target


def _export_query_tower(bundle_dir: Path) -> None:
    """An optimisation: a failed export costs only speed (the torch tower still answers)."""
    try:
        onnx_query.export(Path(bundle_dir) / SCORER_DIR)
    except Exception as exc:  # noqa: BLE001
        log.warning("%s: no ONNX query tower (%s: %s); searches use the torch tower", bundle_dir,
                    type(exc).__name__, exc)


def open_model(model_uri: str, cache_dir: Path, *, tracking_uri: str | None = None) -> ModelRef:
    """`models:/name@alias` or `models:/name/N` -> the version and its bundle in `cache_dir`
    (downloaded once per version). `tracking_uri`: the store to read (else MLflow's current
    one); a local sqlite store is read directly, without MLflow, when the bundle is already
    cached. Raises `LookupError` when there is no such version."""
    fast = _read_sqlite(tracking_uri, model_uri)
    if fast is not None and is_bundle(bundle_cache(cache_dir, fast[2])):
        name, version, run_id, tags = fast
        dataset_dir = Path(tags["dataset_dir"]) if tags.get("dataset_dir") else None
        return ModelRef(name, version, bundle_cache(cache_dir, run_id), dataset_dir, run_id, tags)
    if tracking_uri:
        use_store(tracking_uri)
    info = describe(model_uri)
    if not info:
        raise LookupError(f"{model_uri}: no such registered model version (run `alignsearch retrain` and "
                          "`alignsearch promote`, or pass --model-uri models:/NAME/VERSION)")
    name, version, run_id = info["name"], info["version"], info.get("run_id") or ""
    try:
        found = client().get_model_version(name, version)
    except Exception as exc:
        raise registry_error(f"reading {name} v{version}", exc) from exc
    if run_id:
        target = bundle_cache(cache_dir, run_id)
    else:  # a version without a run: no safe cache key, fetched every time
        target = Path(cache_dir) / "catalogue" / "bundles" / f"no-run-{name}-{version}" / "bundle"
    if not is_bundle(target) or not run_id:
        _download(f"models:/{name}/{version}", target)
    elif not (target / SCORER_DIR / onnx_query.EXPORT_DIR).is_dir():  # cached before towers were exported
        _export_query_tower(target)
    return ModelRef(name, version, target, training_dataset_dir(found), run_id, dict(found.tags or {}))
