"""Micro-batching of concurrent searches: one model call answers every query waiting.

On a CPU the cost of a search is one forward of the query tower. Concurrent requests that
each run their own forward compete for the same cores (and torch's intra-op threads
oversubscribe them), so latency grows with the queue. The batcher has one thread that
takes the first waiting query, gathers whatever else arrives within `max_wait_ms` (up to
`max_batch`), and answers them all with one `predict` call: one forward of a batch costs
little more than a forward of one short query.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import pandas as pd

log = logging.getLogger(__name__)

_STOP = object()


@dataclass
class _Pending:
    query: str
    k: int
    future: Future = field(default_factory=Future)


class MicroBatcher:
    """`submit(query, k)` -> a Future of that query's hits (the rows `predict` gives for it,
    at most k). `predict` takes a frame with `query` and `k` columns and returns one row per
    (query, hit) with a `query` column, best hit first (the pyfunc's contract)."""

    def __init__(self, predict: Callable[[pd.DataFrame], pd.DataFrame], max_batch: int = 16,
                 max_wait_ms: float = 2.0) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.predict, self.max_batch, self.max_wait = predict, max_batch, max_wait_ms / 1000.0
        self.batches = 0  # predict calls made (for /health and tests)
        self.queries = 0
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="search-batcher", daemon=True)
        self._thread.start()

    def submit(self, query: str, k: int) -> Future:
        if not self._thread.is_alive():
            raise RuntimeError("the search batcher is closed")
        pending = _Pending(query, int(k))
        self._queue.put(pending)
        return pending.future

    def search(self, query: str, k: int, timeout: float | None = None) -> pd.DataFrame:
        return self.submit(query, k).result(timeout)

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _gather(self, first: _Pending) -> tuple[list[_Pending], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        return batch, stop

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stop = self._gather(first)
            self._answer(batch)
            if stop:
                return

    def _answer(self, batch: list[_Pending]) -> None:
        # Identical queries are encoded once, at the largest k any of them asked for.
        wanted: dict[str, int] = {}
        for item in batch:
            wanted[item.query] = max(wanted.get(item.query, 0), item.k)
        try:
            frame = self.predict(pd.DataFrame({"query": list(wanted), "k": list(wanted.values())}))
        except BaseException as exc:  # every waiting request gets the failure (the service logs it)
            for item in batch:
                item.future.set_exception(exc)
            return
        self.batches += 1
        self.queries += len(batch)
        groups = {query: rows for query, rows in frame.groupby("query", sort=False)} if len(frame) else {}
        for item in batch:
            rows = groups.get(item.query, frame.iloc[:0])
            item.future.set_result(rows.head(item.k).reset_index(drop=True))
