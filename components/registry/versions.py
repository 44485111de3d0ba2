"""Registered-model versions: register with the `challenger` alias (a retry completes a
registration whose alias never landed), find by content key, resolve aliases; "absent" kept apart from "error" in one helper (`is_absent`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from components.outputs import redact_uri
from components.registry.tracking import client as _client
from components.registry.tracking import registry_uri

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
MODEL_KEY_TAG = "alignsearch.model_key"


@dataclass
class RegisteredVersion:
    name: str
    version: str
    run_id: str | None
    created: bool  # False when an identical model was already registered


class RegistryError(RuntimeError):
    """The model registry failed (server down, permission, timeout, ...): not the same as
    "not there". Whatever was being done stops, and nothing was changed."""


def is_absent(exc: BaseException) -> bool:
    """True only for MLflow's "does not exist" (RESOURCE_DOES_NOT_EXIST)."""
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException) and exc.error_code == "RESOURCE_DOES_NOT_EXIST"


def registry_error(what: str, exc: BaseException) -> RegistryError:
    code = getattr(exc, "error_code", type(exc).__name__)
    message = getattr(exc, "message", None) or str(exc)
    return RegistryError(redact_uri(f"{what} failed at {registry_uri()} ({code}: {message}); "
                                    "stopped, nothing was changed"))


def _newest(filter_string: str, what: str):
    """The newest version matching `filter_string`, or None (also when the model does not exist
    yet). Any other registry error raises `RegistryError`: a lookup that failed must not read
    as "not there"."""
    try:
        found = _client().search_model_versions(filter_string)
    except Exception as exc:
        if is_absent(exc):
            return None
        raise registry_error(what, exc) from exc
    return max(found, key=lambda v: int(v.version)) if found else None


def find_by_key(name: str, model_key: str):
    """The newest version of `name` tagged with `model_key`, or None: a failed lookup raises, or
    the same model would be registered twice."""
    return _newest(f"name = '{name}' and tags.`{MODEL_KEY_TAG}` = '{model_key}'",
                   f"looking up {name} versions with {MODEL_KEY_TAG}={model_key}")


def version_of_run(run_id: str):
    """The newest registered version logged by `run_id`, or None (a model that is not a
    registered version of this store)."""
    return _newest(f"run_id = '{run_id}'", f"looking up the version of run {run_id}")


def registered(name: str, model_key: str) -> RegisteredVersion | None:
    """The version of `name` already registered under `model_key`, made `challenger` unless it
    is `champion`; None when there is none. A registration whose alias never landed (the
    process died between creating the version and aliasing it) is completed here, so its
    retry does not leave `challenger` on the previous version."""
    found = find_by_key(name, model_key)
    if found is None:
        return None
    version = str(found.version)
    aliases = _aliases(name)
    if version not in (aliases.get(CHAMPION), aliases.get(CHALLENGER)):
        try:
            _client().set_registered_model_alias(name, CHALLENGER, version)
        except Exception as exc:
            raise registry_error(f"pointing {name}@{CHALLENGER} at v{version}", exc) from exc
        log.info("%s v%s (registered before, its alias never set) is now %s", name, version, CHALLENGER)
    return RegisteredVersion(name, version, found.run_id, False)


def aliases(name: str) -> dict[str, str]:
    """alias -> version of `name` ({} when the model does not exist; a registry error raises)."""
    return _aliases(name)


def _aliases(name: str) -> dict[str, str]:
    """alias -> version of `name` ({} when the model does not exist)."""
    try:
        model = _client().get_registered_model(name)
    except Exception as exc:
        if is_absent(exc):
            return {}
        raise registry_error(f"reading registered model {name}", exc) from exc
    return {alias: str(version) for alias, version in dict(model.aliases or {}).items()}


def register(model_uri: str, name: str, *, model_key: str, tags: dict[str, str]) -> RegisteredVersion:
    """Register `model_uri` as a new version of `name` with alias `challenger`, unless a
    version with `model_key` is already registered (`registered`: that one, made challenger).

    All or nothing: if tagging or aliasing fails, the new version is deleted again, so a
    failed run leaves the registry (and its champion) as it was.
    """
    import mlflow

    existing = registered(name, model_key)
    if existing is not None:
        return existing
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
    """The version behind `name@alias`, or None when the model or the alias does not exist.

    Absence is read from the registered model's alias list, not from an exception (a missing
    alias is INVALID_PARAMETER_VALUE in MLflow, like a real error); any registry error raises
    `RegistryError`.
    """
    version = _aliases(name).get(alias)
    if version is None:
        return None
    try:
        return _client().get_model_version(name, version)
    except Exception as exc:
        if is_absent(exc):
            return None
        raise registry_error(f"reading {name}@{alias} (version {version})", exc) from exc


def training_dataset_dir(version) -> Path | None:
    """The dataset directory a registered version was trained on (its run records it as the
    `dataset_dir` tag), or None when it is not recorded."""
    if (version.tags or {}).get("dataset_dir"):
        return Path(version.tags["dataset_dir"])
    if not version.run_id:
        return None
    try:
        run = _client().get_run(version.run_id)
    except Exception as exc:
        if is_absent(exc):
            return None
        raise registry_error(f"reading run {version.run_id} of version {version.version}", exc) from exc
    recorded = run.data.tags.get("dataset_dir")
    return Path(recorded) if recorded else None


def describe(model_uri: str) -> dict[str, str]:
    """Name, version and run of a `models:/name@alias` or `models:/name/N` URI (empty for others)."""
    if not model_uri.startswith("models:/"):
        return {}
    name, _, ref = model_uri.removeprefix("models:/").partition("/")
    if "@" in name:
        name, alias = name.split("@", 1)
        version = by_alias(name, alias)
    else:
        try:
            version = _client().get_model_version(name, ref)
        except Exception as exc:
            if not is_absent(exc):
                raise registry_error(f"reading {name} version {ref}", exc) from exc
            version = None
    if version is None:
        return {}
    return {"name": name, "version": str(version.version), "run_id": version.run_id or ""}
