"""The store lock on a tracking server (a lock model in its registry), against a real local
`mlflow server`: a holder that works longer than its lease keeps the lock (it renews it), a
dead holder's stale lock is taken over by exactly one waiter, and a holder releases only its
own lock. Short leases (2 s) make the hour-long ones of real use visible in seconds."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from mlflow import MlflowClient
from mlflow_server import mlflow_server

from components.registry.lock import lock_model_name, store_lock
from components.registry.tracking import use_store
from components.registry.versions import RegistryError

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock-server")
    with mlflow_server(root, f"sqlite:///{root / 'mlflow.db'}") as url:
        yield url


@pytest.fixture
def model(server, monkeypatch, request) -> str:
    """A model name of this test's own (its lock model is this test's alone) on the server."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # use_store sets it: gone after the test
    use_store(server)
    return request.node.name.replace("_", "-")[:60]


def _lock_names(model: str) -> list[str]:
    return [m.name for m in MlflowClient().search_registered_models() if m.name.startswith(model)]


def _in_threads(*targets) -> None:
    """Run each target in a thread; re-raise the first exception one of them raised."""
    errors: list[BaseException] = []

    def guarded(target):
        try:
            target()
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]


def test_a_holder_working_past_its_lease_keeps_the_lock(model):
    held: dict[str, list[float]] = {}
    acquired = threading.Event()

    def long_work():
        with store_lock(model, "test", timeout_s=30, lease_s=2):
            held["long"] = [time.monotonic()]
            acquired.set()
            time.sleep(7)  # three and a half leases
            held["long"].append(time.monotonic())

    def waiter():
        assert acquired.wait(30)
        with store_lock(model, "test", timeout_s=30, lease_s=2):
            held["waiter"] = [time.monotonic(), time.monotonic()]

    _in_threads(long_work, waiter)
    assert held["waiter"][0] >= held["long"][1], "the waiter took the lock while its holder still worked"
    assert _lock_names(model) == []


def test_a_dead_holders_stale_lock_is_taken_over_exactly_once(model, caplog):
    client = MlflowClient()
    lock = lock_model_name(model, "test")
    client.create_registered_model(lock, tags={"holder": "gone-host:4242:dead", "expires": f"{time.time() - 5:.0f}"})
    start = threading.Barrier(5)
    spans: list[tuple[float, float]] = []

    def waiter():
        start.wait(30)
        with store_lock(model, "test", timeout_s=60, lease_s=2):
            began = time.monotonic()
            time.sleep(0.5)
            spans.append((began, time.monotonic()))

    with caplog.at_level(logging.WARNING, logger="components.registry.lock"):
        _in_threads(*[waiter] * 5)
    spans.sort()
    assert len(spans) == 5
    overlaps = [(a, b) for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1]]
    assert not overlaps, "two waiters held the lock at once"
    takeovers = [r for r in caplog.records if "taking over the stale" in r.getMessage()]
    assert len(takeovers) == 1, [r.getMessage() for r in takeovers]
    assert _lock_names(model) == []


def test_a_holder_releases_only_its_own_lock(model):
    """The lock taken from under its holder (as a waiter would, thinking it dead): the holder
    leaves the new holder's lock alone and says it lost the lock, so its work is not taken for
    having run alone."""
    client = MlflowClient()
    lock = lock_model_name(model, "test")
    with pytest.raises(RegistryError, match="intruder"):
        with store_lock(model, "test", timeout_s=10, lease_s=30):
            client.delete_registered_model(lock)
            client.create_registered_model(lock, tags={"holder": "intruder", "expires": f"{time.time() + 60:.0f}"})
    assert client.get_registered_model(lock).tags["holder"] == "intruder"
    client.delete_registered_model(lock)
