"""One holder at a time per store: the locks that promotions and catalogue changes take.

A local sqlite store: an exclusive file lock beside the database (the kernel frees it when the
holder dies). A tracking server: a lock model `<model>.<purpose>-lock` in its registry, whose
creation is atomic in the server's database, so it works across processes and machines:

- the lock model names its holder (host, pid and a random token: one per acquisition) and an
  `expires` time; the holder renews it every lease/3 from a background thread, so work longer
  than the lease keeps it, and a dead holder's lock is free within one lease;
- a lock past its lease is taken over by exactly one waiter: the one that creates the takeover
  model `<lock>.takeover-<holder hash>-<n>` (creation is the only atomic step a registry
  offers); it deletes the stale lock only if its holder is still the one it saw, and then
  competes for the lock like any waiter;
- a holder deletes the lock only while it still names it; one that finds its lock taken
  leaves it alone and raises `RegistryError` when its block ends (its work did not run alone).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from components.locks import file_lock
from components.registry.tracking import client, registry_uri, sqlite_path
from components.registry.versions import RegistryError, is_absent, registry_error

log = logging.getLogger(__name__)

LOCK_SUFFIX = "-lock"
# The purposes: one promotion at a time; one catalogue change at a time, and none while a
# promotion carries the champion's catalogue over and moves `champion` (it holds CATALOGUE
# then, inside PROMOTION: always in that order).
PROMOTION, CATALOGUE = "promotion", "catalogue"
LOCK_LEASE_S = 120.0  # renewed every lease/3 while held: a lock older than this is a dead holder's
TAKEOVER_LEASE_S = 30.0  # a takeover model older than this is a waiter's that died mid-takeover
POLL_S = 0.5


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
                f"another {purpose} holds {p} for more than {timeout_s:.0f} s"), poll_s=POLL_S,
                on_wait=lambda p: log.info("another %s is running (%s); waiting", purpose, p)):
            yield
        return
    with registry_lock(lock_model_name(model_name, purpose), purpose, timeout_s=timeout_s, lease_s=lease_s):
        yield


@dataclass
class _Held:
    holder: str
    expires: float

    @property
    def stale(self) -> bool:
        return time.time() > self.expires


def _already_exists(exc: BaseException) -> bool:
    return getattr(exc, "error_code", None) == "RESOURCE_ALREADY_EXISTS"


def _create(mlflow_client, name: str, holder: str, lease_s: float, description: str) -> bool:
    """Create the model `name` naming `holder` until now + `lease_s`; False when it exists."""
    try:
        mlflow_client.create_registered_model(name, tags={"holder": holder, "expires": f"{time.time() + lease_s:.3f}"},
                                              description=description)
        return True
    except Exception as exc:
        # RESOURCE_DOES_NOT_EXIST too: MLflow's SQL store looks the model up after the insert
        # failed, to say it exists, and finds it deleted meanwhile (its holder released it).
        if _already_exists(exc) or is_absent(exc):
            return False
        raise registry_error(f"creating the lock model {name}", exc) from exc


def _read(mlflow_client, name: str) -> _Held | None:
    """Holder and expiry of the model `name`, or None when it does not exist."""
    try:
        tags = mlflow_client.get_registered_model(name).tags or {}
    except Exception as exc:
        if is_absent(exc):
            return None
        raise registry_error(f"reading the lock model {name}", exc) from exc
    try:
        expires = float(tags.get("expires", "0"))
    except ValueError:
        expires = 0.0  # unreadable: a lock nobody can renew
    return _Held(tags.get("holder", "unknown"), expires)


def _delete(mlflow_client, name: str) -> None:
    try:
        mlflow_client.delete_registered_model(name)
    except Exception as exc:
        if not is_absent(exc):
            raise registry_error(f"deleting the lock model {name}", exc) from exc


def _take_over(mlflow_client, lock: str, stale: _Held, purpose: str, me: str) -> None:
    """Delete the stale lock `stale` if this waiter wins its takeover (creates the takeover model
    of that holder first); else leave it to the winner. Either way the caller competes again."""
    tag = hashlib.sha256(stale.holder.encode()).hexdigest()[:12]
    attempt = 1
    while True:  # an expired takeover model: its waiter died mid-takeover; the next attempt is open
        token = f"{lock}.takeover-{tag}-{attempt}"
        if _create(mlflow_client, token, me, TAKEOVER_LEASE_S, f"taking over {lock} from {stale.holder}"):
            break
        held = _read(mlflow_client, token)
        if held is not None and not held.stale:
            return  # another waiter is taking it over right now
        attempt += 1
    try:
        current = _read(mlflow_client, lock)
        if current is not None and current.holder == stale.holder and current.stale:
            log.warning("taking over the stale %s lock %s (held by %s, expired %.0f s ago)", purpose, lock,
                        stale.holder, time.time() - current.expires)
            _delete(mlflow_client, lock)
        for earlier in range(1, attempt):  # takeover models of waiters that died: theirs expired
            _delete(mlflow_client, f"{lock}.takeover-{tag}-{earlier}")
    finally:
        _delete(mlflow_client, token)


class _Renewal:
    """Moves the lock's `expires` forward every lease/3 while its holder works; notes when the
    lock is no longer this holder's (taken over, or deleted)."""

    def __init__(self, lock: str, holder: str, lease_s: float) -> None:
        self.lock, self.holder, self.lease_s = lock, holder, lease_s
        self.lost: str | None = None  # who holds it instead, when this holder lost it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"renew {lock}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        mlflow_client = client()
        while not self._stop.wait(self.lease_s / 3):
            try:
                held = _read(mlflow_client, self.lock)
                if held is None or held.holder != self.holder:
                    self.lost = "nobody" if held is None else held.holder
                    log.error("the lock %s was taken from %s (now held by %s)", self.lock, self.holder, self.lost)
                    return
                mlflow_client.set_registered_model_tag(self.lock, "expires", f"{time.time() + self.lease_s:.3f}")
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried at the next tick
                log.warning("renewing the lock %s failed (%s); retrying in %.0f s", self.lock, exc, self.lease_s / 3)


@contextlib.contextmanager
def registry_lock(lock: str, purpose: str, *, timeout_s: float, lease_s: float = LOCK_LEASE_S) -> Iterator[None]:
    """Hold the lock model `lock` in the registry for the block (the tracking-server path of
    `store_lock`; works against any store). See the module docstring for lease and takeover."""
    mlflow_client = client()
    me = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
    deadline = time.monotonic() + timeout_s
    waiting = False
    while not _create(mlflow_client, lock, me, lease_s, f"held while a {purpose} runs; deleted after"):
        held = _read(mlflow_client, lock)
        if held is None:
            continue  # released meanwhile: try again at once
        if held.stale:
            _take_over(mlflow_client, lock, held, purpose, me)
            continue
        if time.monotonic() > deadline:
            raise RegistryError(f"another {purpose} ({held.holder}) holds {lock} for more than {timeout_s:.0f} s")
        if not waiting:
            log.info("another %s is running (%s holds %s); waiting", purpose, held.holder, lock)
            waiting = True
        time.sleep(POLL_S)
    renewal = _Renewal(lock, me, lease_s)
    renewal.start()
    try:
        yield
    finally:  # also when the block raised: release what is ours, and only that
        renewal.stop()
        held = _read(mlflow_client, lock)
        if held is not None and held.holder == me:
            _delete(mlflow_client, lock)
        else:
            renewal.lost = renewal.lost or ("nobody" if held is None else held.holder)
            log.error("the %s lock %s is no longer this process's (held by %s): left as it is", purpose, lock,
                      renewal.lost)
    if renewal.lost:  # the block finished: say its work did not run alone
        raise RegistryError(f"the {purpose} lock {lock} was taken from this process while it worked (now held by "
                            f"{renewal.lost}); its work may have overlapped another {purpose}")
