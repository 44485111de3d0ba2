"""A one-off search without importing MLflow: the model version and its catalogue pointer read
straight from a local sqlite registry (read-only), the bundle and catalogue from the local
cache `live.resolve_model` / `versions.fetch` filled the first time.

Importing MLflow and loading a pyfunc cost most of a one-off `alignsearch search` (about
10 s before, of which ~1.5 s `import mlflow` and ~3 s PyTorch Lightning). Anything this
cannot answer from the cache (a server URI, a version never fetched) returns None and the
caller takes the MLflow path, which fills the cache for next time.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)


def _parse(model_uri: str) -> tuple[str, str | None, str | None] | None:
    """models:/name@alias -> (name, alias, None); models:/name/3 -> (name, None, "3")."""
    if not model_uri.startswith("models:/"):
        return None
    rest = model_uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    name, _, version = rest.partition("/")
    return (name, None, version) if version.isdigit() else None


def read_registry(tracking_uri: str, model_uri: str) -> tuple[str, str, dict[str, str]] | None:
    """(name, version, version tags + `__run_id__`, the run that logged it) from a sqlite store,
    or None when not a sqlite store or the model/alias is not there (the MLflow path then says why)."""
    parsed = _parse(model_uri)
    if parsed is None or not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    if not db.is_file():
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
    return name, version, {**tags, "__run_id__": str(row[0])}


def cached_engine(tracking_uri: str, model_uri: str, cache_dir: Path):
    """(engine, info) from the local cache, or None. `info`: name, version, catalogue_version."""
    from components.catalogue.live import bundle_cache
    from components.catalogue.versions import RUN_ID_TAG, local_dir

    found = read_registry(tracking_uri, model_uri)
    if found is None:
        return None
    name, version, tags = found
    bundle = bundle_cache(cache_dir, tags["__run_id__"])
    if not (bundle / "bundle.json").is_file():
        return None
    catalogue = None
    run_id = tags.get(RUN_ID_TAG)
    if run_id:
        if not (local_dir(cache_dir, run_id) / "catalogue.json").is_file():
            return None
        from components.catalogue.store import Catalogue

        catalogue = Catalogue.load(local_dir(cache_dir, run_id), run_id=run_id)
    from components.search.engine import SearchEngine

    engine = SearchEngine(bundle, catalogue=catalogue)
    return engine, {"name": name, "version": version, "catalogue_version": engine.catalogue_version}
