"""An exclusive file lock across processes, waited for up to a deadline (one place for the
pattern the registry and the catalogue both need beside a local sqlite store)."""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path, timeout_s: float, timeout_error: Callable[[Path], Exception], *,
              poll_s: float = 0.2, on_wait: Callable[[Path], None] | None = None) -> Iterator[None]:
    """Hold an exclusive `flock` on `path` (created if missing) for the block. Waits in steps
    of `poll_s` (calling `on_wait` once); past `timeout_s` raises `timeout_error(path)`. The
    kernel frees the lock when the holder dies, so a killed process never leaves it stale."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    waited = False
    with path.open("a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise timeout_error(path) from None
                if on_wait is not None and not waited:
                    on_wait(path)
                waited = True
                time.sleep(poll_s)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
