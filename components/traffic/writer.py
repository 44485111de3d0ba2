"""Writing the traffic log off the request path: a bounded queue drained by one thread in batches.

A search hands its impression to `BatchWriter.put`, which never blocks: the event joins a
bounded queue, or, when the queue is full (the store has fallen `queue_max` events behind),
it is dropped and counted in `stats.dropped`; a search is never slowed or failed by the log.
One background thread takes events off the queue and writes them in batches, each batch ONE
transaction (`EventStore.append`): a batch is written when it holds `batch_size` events or its
oldest event is `flush_ms` old, whichever comes first. `flush()` writes what is pending and
waits for it; `close()` writes the rest and stops the thread.

What a SIGKILL loses: the events not yet committed, never part of one. In steady state that
is the batch being gathered (at most `batch_size` events, at most `flush_ms` old, plus the
time its commit takes); if the store falls behind, also the events waiting in the queue (at
most `queue_max`). A batch whose write fails (the database unreachable) is retried a few times,
then counted in `stats.failed` and logged; the thread goes on.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

import sqlalchemy as sa

from components.outputs import redact_uri
from components.traffic.config import TrafficConfig
from components.traffic.events import Event, EventStore

log = logging.getLogger(__name__)

_STOP = object()
# Waits between attempts at a batch that failed to write (SQLite busy past its timeout, a
# PostgreSQL connection lost).
RETRY_WAITS_S = (0.05, 0.25, 1.0)


@dataclasses.dataclass(frozen=True)
class WriterStats:
    written: int  # events committed (including those the log already held and skipped)
    dropped: int  # events refused because the queue was full (or the writer closed)
    failed: int  # events whose batch could not be written after its retries
    pending: int  # events queued, not yet committed
    batches: int  # transactions committed
    failed_batches: int = 0  # batches given up after their retries (`failed` counts their events)


class _Flush:
    def __init__(self) -> None:
        self.done = threading.Event()


class BatchWriter:
    """Appends events to an `EventStore` from one background thread, in batches.

    `on_commit(events)` is called on the writer thread after each batch commits (metrics, or a
    test's acknowledgements); an exception in it is logged and ignored."""

    def __init__(self, store: EventStore, *, batch_size: int = 256, flush_ms: float = 200.0,
                 queue_max: int = 10_000, on_commit: Callable[[Sequence[Event]], None] | None = None):
        if batch_size < 1 or flush_ms <= 0 or queue_max < 1:
            raise ValueError("batch_size and queue_max must be >= 1 and flush_ms > 0")
        self.store = store
        self.batch_size = batch_size
        self.flush_s = flush_ms / 1000.0
        self.on_commit = on_commit
        self._queue: queue.Queue = queue.Queue(maxsize=queue_max)
        self._lock = threading.Lock()
        self._counts = {"written": 0, "dropped": 0, "failed": 0, "batches": 0, "failed_batches": 0, "in_batch": 0}
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="traffic-writer", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, store: EventStore, cfg: TrafficConfig,
                    on_commit: Callable[[Sequence[Event]], None] | None = None) -> BatchWriter:
        return cls(store, batch_size=cfg.batch_size, flush_ms=cfg.flush_ms, queue_max=cfg.queue_max,
                   on_commit=on_commit)

    # --- the request side

    def put(self, event: Event) -> bool:
        """Queue an event to be written; False (and counted as dropped) when the queue is full
        or the writer is closed. Never blocks."""
        if not self._closed:
            try:
                self._queue.put_nowait(event)
                return True
            except queue.Full:
                pass
        with self._lock:
            self._counts["dropped"] += 1
        return False

    def flush(self, timeout_s: float | None = 30.0) -> bool:
        """Write every event queued before this call; True once they are committed (or failed),
        False if `timeout_s` passed first."""
        if self._closed or not self._thread.is_alive():
            return True
        marker = _Flush()
        try:
            self._queue.put(marker, timeout=timeout_s)
        except queue.Full:
            return False
        return marker.done.wait(timeout_s)

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Write the rest and stop the thread (puts after this are dropped)."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)  # blocks only while the queue is full, i.e. while it drains
        self._thread.join(timeout_s)
        if not self._thread.is_alive():  # events put while closing: counted, not silently kept
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
                with self._lock:
                    self._counts["dropped"] += 1
        else:
            log.warning("traffic writer: %d event(s) still unwritten after %s s", self.stats.pending, timeout_s)

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def stats(self) -> WriterStats:
        with self._lock:
            counts = dict(self._counts)
        return WriterStats(written=counts["written"], dropped=counts["dropped"], failed=counts["failed"],
                           pending=self._queue.qsize() + counts["in_batch"], batches=counts["batches"],
                           failed_batches=counts["failed_batches"])

    # --- the writer thread

    def _run(self) -> None:
        batch: list[Event] = []
        deadline = 0.0
        while True:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()) if batch else None)
            except queue.Empty:  # the batch's oldest event is flush_ms old
                item = None
            flushes = [item] if isinstance(item, _Flush) else []
            if item is not None and item is not _STOP and not flushes:
                if not batch:
                    deadline = time.monotonic() + self.flush_s
                batch.append(item)
                with self._lock:
                    self._counts["in_batch"] = len(batch)
            if batch and (item is None or item is _STOP or flushes or len(batch) >= self.batch_size):
                self._write(batch)
                batch = []
            for marker in flushes:
                marker.done.set()
            if item is _STOP:
                return

    def _write(self, batch: list[Event]) -> None:
        for attempt, wait_s in enumerate((*RETRY_WAITS_S, None)):
            try:
                self.store.append(batch)
                break
            except sa.exc.OperationalError as exc:  # busy, or the connection went away: try again
                if wait_s is None:
                    self._failed(batch, exc)
                    return
                log.warning("traffic writer: batch of %d not written (attempt %d): %s", len(batch), attempt + 1,
                            redact_uri(str(exc).splitlines()[0]))
                time.sleep(wait_s)
            except Exception as exc:  # noqa: BLE001 - the writer thread must outlive a bad batch
                self._failed(batch, exc)
                return
        with self._lock:
            self._counts["written"] += len(batch)
            self._counts["batches"] += 1
            self._counts["in_batch"] = 0
        if self.on_commit is not None:
            try:
                self.on_commit(batch)
            except Exception:  # noqa: BLE001
                log.exception("traffic writer: on_commit failed")

    def _failed(self, batch: list[Event], exc: Exception) -> None:
        with self._lock:
            self._counts["failed"] += len(batch)
            self._counts["failed_batches"] += 1
            self._counts["in_batch"] = 0
        log.error("traffic writer: batch of %d event(s) lost (%s): %s", len(batch), self.store,
                  redact_uri(str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
