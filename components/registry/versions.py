"""Registered-model versions: register with the `challenger` alias, find by content key,
resolve aliases, fetch a version's search bundle."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
MODEL_KEY_TAG = "alignsearch.model_key"


@dataclass
class RegisteredVersion:
    name: str
    version: str
    run_id: str | None
    created: bool  # False when an identical model was already registered


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def find_by_key(name: str, model_key: str):
    """The newest version of `name` tagged with `model_key`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        found = _client().search_model_versions(f"name = '{name}' and tags.`{MODEL_KEY_TAG}` = '{model_key}'")
    except MlflowException:  # no such registered model yet
        return None
    return max(found, key=lambda v: int(v.version)) if found else None


def register(model_uri: str, name: str, *, model_key: str, tags: dict[str, str]) -> RegisteredVersion:
    """Register `model_uri` as a new version of `name` with alias `challenger`.

    All or nothing: if tagging or aliasing fails, the new version is deleted again, so a
    failed run leaves the registry (and its champion) as it was.
    """
    import mlflow

    client = _client()
    version = mlflow.register_model(model_uri, name, tags={MODEL_KEY_TAG: model_key, **tags})
    try:
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    except Exception:
        log.error("registering %s v%s failed; deleting the version", name, version.version)
        client.delete_model_version(name, version.version)
        raise
    return RegisteredVersion(name, str(version.version), version.run_id, True)


def by_alias(name: str, alias: str):
    """The version behind `name@alias`, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def download_bundle(model_uri: str, dst: Path) -> Path:
    """The search bundle inside a logged pyfunc (`models:/name@alias`, `models:/name/3`, `runs:/...`)."""
    import mlflow

    from components.registry.pyfunc import BUNDLE_ARTIFACT

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    bundle = local / "artifacts" / BUNDLE_ARTIFACT
    if not bundle.is_dir():
        raise FileNotFoundError(f"{model_uri}: no search bundle in the model (looked for {bundle})")
    return bundle


def describe(model_uri: str) -> dict[str, str]:
    """Name, version and run of a `models:/name@alias` or `models:/name/N` URI (empty for others)."""
    if not model_uri.startswith("models:/"):
        return {}
    name, _, ref = model_uri.removeprefix("models:/").partition("/")
    if "@" in name:
        name, alias = name.split("@", 1)
        version = by_alias(name, alias)
    else:
        from mlflow.exceptions import MlflowException

        try:
            version = _client().get_model_version(name, ref)
        except MlflowException:
            version = None
    if version is None:
        return {}
    return {"name": name, "version": str(version.version), "run_id": version.run_id or ""}


def load_search_model(model_uri: str):
    """The pyfunc at `model_uri`, with a clear error when the alias or version does not exist."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as exc:
        raise LookupError(f"cannot load {model_uri} from {mlflow.get_tracking_uri()}: {exc.message}. "
                          f"Run `alignsearch retrain` and `alignsearch promote` first, or pass --model-uri.") from exc
