"""What the stages write: atomically (a reader sees a whole file or directory, or none of it),
for DVC byte-identically (the same inputs give the same JSON; timings stay out), and never
with a credential in it (`redact_uri`).

Every write-then-rename in the project goes through `atomic_file` / `atomic_dir`, so a killed
run never leaves a half-result that a later run would reuse.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

SCRATCH_SUFFIX = ".tmp"
# `scheme://user:password@` (or `scheme://user@`): the user part stops at the first '/', so an
# '@' later in a path is left alone. And the secrets of a signed URL's query string.
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_SECRET_PARAM = re.compile(r"(?i)([?&][\w.-]*(?:password|passwd|pwd|secret|token|signature|credential|key)[\w.-]*=)"
                           r"[^&\s]+")  # what `atomic_file` / `atomic_dir` name their scratch paths with


def redact_uri(text: str) -> str:
    """`text` with every URI in it shown without user and password (`postgresql://u:pw@db/mlflow`
    -> `postgresql://db/mlflow`) and signed-URL secrets masked: what is shown, logged, tagged or
    logged as a param goes through this, the one rule for it."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1", text))


def is_timing(key: str) -> bool:
    """A wall-clock measurement by name: `*_seconds` or `seconds_*`."""
    return key.endswith("_seconds") or key.startswith("seconds_")


def without_timings(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` without timing keys, recursively through nested mappings."""
    return {k: without_timings(v) if isinstance(v, Mapping) else v for k, v in values.items() if not is_timing(k)}


def write_stable_json(values: Mapping[str, Any], path: Path) -> Path:
    """Write `values` without timings as indented JSON (floats as floats), atomically."""
    return atomic_write(Path(path), (json.dumps(without_timings(values), indent=2, default=float) + "\n").encode())


def _scratch_file(path: Path, suffix: str = "") -> Path:
    """A new empty file beside `path` for a writer to fill, created with the usual mode (the
    umask applies, as for any file the project writes; `tempfile.mkstemp` would make it 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{SCRATCH_SUFFIX}{suffix}")
    os.close(os.open(scratch, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    return scratch


def atomic_write(path: Path, data: bytes) -> Path:
    """Write `data` to `path` through a sibling temporary file renamed over it."""
    path = Path(path)
    tmp = _scratch_file(path)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


@contextlib.contextmanager
def atomic_file(path: Path, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` for a writer that wants a file name (np.savez, to_parquet);
    renamed to `path` when the block ends without error, removed otherwise. `suffix` keeps a
    writer that appends its own extension (np.savez adds `.npz`) from renaming the wrong file."""
    path = Path(path)
    tmp = _scratch_file(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def is_scratch(path: Path) -> bool:
    """A scratch file or directory of an unfinished write (a killed writer leaves it behind)."""
    return Path(path).name.startswith(".") and Path(path).name.endswith(SCRATCH_SUFFIX)


@contextlib.contextmanager
def atomic_dir(path: Path, *, keep_existing: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """A scratch directory beside `path`, renamed to `path` when the block ends without error
    (removed otherwise). An existing `path` is replaced, unless `keep_existing(path)` says it is
    a finished result (another process did the same work meanwhile): then it stays and the
    scratch is dropped."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{SCRATCH_SUFFIX}")
    scratch.mkdir()  # the usual mode (tempfile.mkdtemp would make it 0700)
    try:
        yield scratch
        kept = keep_existing is not None and path.exists() and keep_existing(path)
        if not kept:
            if path.exists():
                shutil.rmtree(path)
            try:
                os.rename(scratch, path)
            except OSError:  # appeared meanwhile
                if keep_existing is None or not keep_existing(path):
                    raise
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
