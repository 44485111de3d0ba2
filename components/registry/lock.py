"""One holder at a time per store: the lock that promotions and catalogue changes take.

A local sqlite store: an exclusive file lock beside the database (the kernel frees it when the
holder dies). A tracking server: a lock model `<model>.<purpose>-lock` in its registry, whose
creation is atomic in the server's database, so it works across processes and machines; a
lock model past its lease is a dead holder's and is taken over.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterator

from components.locks import file_lock
from components.registry.tracking import client, registry_uri, sqlite_path
from components.registry.versions import RegistryError, is_absent, registry_error

log = logging.getLogger(__name__)

LOCK_SUFFIX = "-lock"
LOCK_LEASE_S = 3600.0  # a lock model older than this is a dead holder's: taken over


def lock_model_name(model_name: str, purpose: str) -> str:
    return f"{model_name}.{purpose}{LOCK_SUFFIX}"


@contextlib.contextmanager
def store_lock(model_name: str, purpose: str, *, timeout_s: float, lease_s: float = LOCK_LEASE_S) -> Iterator[None]:
    """Hold the `purpose` lock (`promotion`, `catalogue`) of `model_name`'s store for the block;
    past `timeout_s` of waiting, `RegistryError`."""
    db = sqlite_path(registry_uri())
    if db is not None:
        path = db.with_name(f"{db.name}.{purpose}.lock")
        with file_lock(path, timeout_s, lambda p: RegistryError(
                f"another {purpose} holds {p} for more than {timeout_s:.0f} s"), poll_s=0.5,
                on_wait=lambda p: log.info("another %s is running (%s); waiting", purpose, p)):
            yield
        return
    with _registry_lock(lock_model_name(model_name, purpose), purpose, timeout_s, lease_s):
        yield


@contextlib.contextmanager
def _registry_lock(lock: str, purpose: str, timeout_s: float, lease_s: float) -> Iterator[None]:
    from mlflow.exceptions import MlflowException

    mlflow_client = client()
    holder = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            mlflow_client.create_registered_model(
                lock, tags={"holder": holder, "expires": f"{time.time() + lease_s:.0f}"},
                description=f"held while a {purpose} runs; deleted after")
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise registry_error(f"taking the {purpose} lock {lock}", exc) from exc
        try:
            held = mlflow_client.get_registered_model(lock)
            if time.time() > float(held.tags.get("expires", "0")):
                log.warning("taking over the stale %s lock %s (held by %s)", purpose, lock, held.tags.get("holder"))
                mlflow_client.delete_registered_model(lock)
                continue
        except MlflowException as exc:
            if not is_absent(exc):  # released meanwhile: try again at once
                raise registry_error(f"reading the {purpose} lock {lock}", exc) from exc
            continue
        if time.monotonic() > deadline:
            raise RegistryError(f"another {purpose} ({held.tags.get('holder')}) holds {lock} for more than "
                                f"{timeout_s:.0f} s")
        log.info("another %s is running (%s holds %s); waiting", purpose, held.tags.get("holder"), lock)
        time.sleep(0.5)
    try:
        yield
    finally:
        try:
            mlflow_client.delete_registered_model(lock)
        except MlflowException as exc:
            if not is_absent(exc):
                raise registry_error(f"releasing the {purpose} lock {lock}", exc) from exc
