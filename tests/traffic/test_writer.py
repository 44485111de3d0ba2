"""The batch writer: batches by size and age, never blocks a search (a full queue drops and
counts), retries a failed batch, writes the rest on close; a SIGKILL loses only uncommitted
events, never part of a batch; several processes append to one SQLite file."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy as sa
from traffic_helpers import impression

from components.traffic import writer as writer_module
from components.traffic.events import EventStore
from components.traffic.writer import BatchWriter


class GatedStore:
    """A store whose writes wait until `gate` is set, and fail while `failures` lasts."""

    def __init__(self, failures: int = 0):
        self.gate, self.entered = threading.Event(), threading.Event()
        self.batches: list[list] = []
        self.failures = failures

    def append(self, events):
        self.entered.set()
        self.gate.wait(10)
        if self.failures:
            self.failures -= 1
            raise sa.exc.OperationalError("INSERT", {}, Exception("database is locked"))
        self.batches.append(list(events))


def _wait_for(condition, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)
    return condition()


def test_batches_by_size_and_by_age(tmp_path):
    store = EventStore(f"sqlite:///{tmp_path / 'traffic.db'}")
    sizes: list[int] = []
    writer = BatchWriter(store, batch_size=10, flush_ms=50, on_commit=lambda batch: sizes.append(len(batch)))
    for i in range(25):
        assert writer.put(impression(f"q{i}"))
    # The last, partial batch is written once it is flush_ms old: no close or flush needed.
    assert _wait_for(lambda: store.counts().impressions == 25)
    assert sum(sizes) == 25 and max(sizes) <= 10 and writer.stats.batches == len(sizes) >= 3
    assert writer.stats.pending == 0 and writer.stats.written == 25
    writer.close()
    store.close()


def test_flush_and_close_write_what_is_pending(tmp_path):
    store = EventStore(f"sqlite:///{tmp_path / 'traffic.db'}")
    writer = BatchWriter(store, batch_size=1000, flush_ms=60_000)  # neither size nor age would write
    for i in range(3):
        writer.put(impression(f"q{i}"))
    assert writer.flush(timeout_s=10) and store.counts().impressions == 3
    for i in range(4):
        writer.put(impression(f"r{i}"))
    writer.close()
    assert store.counts().impressions == 7
    assert not writer.put(impression("too late")) and writer.stats.dropped == 1
    store.close()


def test_a_full_queue_drops_and_counts_and_never_blocks():
    store = GatedStore()
    writer = BatchWriter(store, batch_size=1, flush_ms=1, queue_max=5)
    writer.put(impression("first"))
    assert store.entered.wait(10)  # the thread holds "first" in a write that hangs
    accepted = [writer.put(impression(f"q{i}")) for i in range(5)]
    started = time.perf_counter()
    refused = [writer.put(impression(f"over{i}")) for i in range(4)]
    assert time.perf_counter() - started < 0.5  # four refusals, no waiting
    assert all(accepted) and not any(refused)
    assert writer.stats.dropped == 4 and writer.stats.pending == 6
    store.gate.set()
    writer.close()
    assert [b[0].query for b in store.batches] == ["first", "q0", "q1", "q2", "q3", "q4"]
    assert writer.stats.written == 6 and writer.stats.dropped == 4


def test_a_failed_batch_is_retried_and_a_lost_one_counted(monkeypatch):
    monkeypatch.setattr(writer_module, "RETRY_WAITS_S", (0.0, 0.0, 0.0))
    store = GatedStore(failures=2)
    store.gate.set()
    writer = BatchWriter(store, batch_size=2, flush_ms=10)
    writer.put(impression("a"))
    writer.put(impression("b"))
    writer.flush()
    assert [[e.query for e in b] for b in store.batches] == [["a", "b"]] and writer.stats.written == 2

    store.failures = 10  # more than the retries: the batch is lost, counted, and the writer goes on
    writer.put(impression("c"))
    writer.flush()
    assert writer.stats.failed == 1 and writer.stats.pending == 0
    store.failures = 0
    writer.put(impression("d"))
    writer.close()
    assert [e.query for b in store.batches for e in b] == ["a", "b", "d"]


# A process that logs searches (and a click on every third) as fast as it can, printing
# "put <n>" for each event handed to the writer and "ack <n>" once its batch is committed.
APPEND_FOREVER = """
import sys, time
from components.traffic.events import Click, EventStore, Hit, Impression
from components.traffic.writer import BatchWriter

def acknowledge(batch):
    sys.stdout.write("".join(f"ack {e.event_id if isinstance(e, Impression) else e.click_id}\\n" for e in batch))
    sys.stdout.flush()

store = EventStore(sys.argv[1])
writer = BatchWriter(store, batch_size=int(sys.argv[2]), flush_ms=float(sys.argv[3]), queue_max=1_000_000,
                     on_commit=acknowledge)
n = 0
while True:
    shown = Impression(f"{n:07d}", f"query {n}", 10, tuple(Hit(f"ad{j}", j + 1, 1 / (j + 1)) for j in range(10)))
    events = [shown] + ([Click(f"{n + 1:07d}", shown.event_id, "ad3", 3)] if n % 3 == 0 else [])
    for event in events:
        writer.put(event)
        sys.stdout.write(f"put {n}\\n")
        n += 1
    sys.stdout.flush()
    time.sleep(0.0005)
"""


def test_sigkill_loses_no_acknowledged_event_and_leaves_no_partial_batch(store_uri, tmp_path):
    batch_size, flush_ms, kill_after = 50, 20, 1000
    script = tmp_path / "append_forever.py"
    script.write_text(APPEND_FOREVER)
    child = subprocess.Popen([sys.executable, str(script), store_uri, str(batch_size), str(flush_ms)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acked: set[str] = set()
    put = 0
    deadline = time.monotonic() + 60
    try:
        while len(acked) < kill_after and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            kind, _, value = line.strip().partition(" ")
            if kind == "ack":
                acked.add(value)
            elif kind == "put":
                put = int(value) + 1
    finally:
        os.kill(child.pid, signal.SIGKILL)  # mid-stream: events keep being put and written
        rest, errors = child.communicate(timeout=30)
    assert len(acked) >= kill_after, f"the child acknowledged {len(acked)} events; stderr:\n{errors}"
    for line in rest.splitlines(keepends=True):
        kind, _, value = line.strip().partition(" ")
        if line.endswith("\n") and kind == "ack":  # a line cut by the kill is no acknowledgement
            acked.add(value)
        elif line.endswith("\n") and kind == "put":
            put = int(value) + 1

    store = EventStore(store_uri)
    events = store.read()
    stored = set(events.impressions["event_id"]) | set(events.clicks["click_id"])
    assert acked <= stored  # every acknowledged event survived
    # Batches commit whole and in order: what is stored is exactly the first events put, with
    # no hole (a half-written batch would leave one) and no partial record.
    assert stored == {f"{n:07d}" for n in range(len(stored))}
    assert all(len(hits) == 10 for hits in events.impressions["hits"])
    assert set(events.clicks["request_id"]) <= set(events.impressions["event_id"])
    if store_uri.startswith("sqlite"):
        with sqlite3.connect(store_uri.removeprefix("sqlite:///")) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    print(f"\n{store.dialect}: {put} events put, {len(acked)} acknowledged, {len(stored)} stored, "
          f"{max(put - len(stored), 0)} lost by the SIGKILL (batch_size {batch_size}, flush_ms {flush_ms})")
    store.close()


APPEND_SOME = """
import sys
from components.traffic.events import EventStore, Hit, Impression
from components.traffic.writer import BatchWriter

store = EventStore(sys.argv[1])
with BatchWriter(store, batch_size=50, flush_ms=5) as writer:
    for n in range(int(sys.argv[3])):
        writer.put(Impression(f"{sys.argv[2]}-{n}", "q", 1, (Hit("ad", 1, 1.0),)))
assert writer.stats.written == int(sys.argv[3]) and writer.stats.failed == 0, writer.stats
"""


def test_writer_processes_share_one_sqlite_file(tmp_path):
    uri, per_process = f"sqlite:///{tmp_path / 'traffic.db'}", 600
    script = tmp_path / "append_some.py"
    script.write_text(APPEND_SOME)
    children = [subprocess.Popen([sys.executable, str(script), uri, f"p{i}", str(per_process)],
                                 stderr=subprocess.PIPE, text=True) for i in range(3)]
    for child in children:
        _, errors = child.communicate(timeout=120)
        assert child.returncode == 0, errors
    store = EventStore(uri)
    events = store.read()
    assert set(events.impressions["event_id"]) == {f"p{i}-{n}" for i in range(3) for n in range(per_process)}
    # One writer at a time: seq numbers every row once, in commit order.
    assert events.impressions["seq"].tolist() == list(range(1, 3 * per_process + 1))
    store.close()


@pytest.mark.parametrize("bad", [{"batch_size": 0}, {"flush_ms": 0}, {"queue_max": 0}])
def test_writer_settings_are_checked(bad):
    with pytest.raises(ValueError):
        BatchWriter(GatedStore(), **bad)
