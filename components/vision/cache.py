"""On-disk cache of visual parts, keyed by image content and extractor configuration.

Layout: `<cache_dir>/parts-<config + backend hash>/shard-<keys hash>.npz`, one uncompressed .npz
per group of up to `shard_size` images, each holding the images' content keys and their
`PartsFeatures` arrays. A rerun over 3,000 cached images opens about a dozen files
instead of 3,000, and a changed image gets a new content key, so only it is recomputed
(into a new small shard). Shards are written atomically and never modified, so an
interrupted run keeps every finished shard and concurrent runs cannot corrupt each other.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from components.device import resolve_device
from components.outputs import atomic_file
from components.vision import parts as parts_module
from components.vision.parts import PartsConfig, PartsFeatures

log = logging.getLogger(__name__)

SHARD_PREFIX = "shard-"
_READ_CHUNK = 1 << 20


def image_key(path: str | Path) -> str:
    """Content key of one image file: sha256 of its bytes (paths and mtimes don't matter)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def config_dir(cache_dir: str | Path, cfg: PartsConfig, backend: str = "auto",
               device: str | torch.device | None = None) -> Path:
    """The sub-directory holding features of one extractor config (+ weights, + code version)
    computed by one backend (`auto` resolved as `extract_parts` resolves it)."""
    resolved = parts_module.resolve_backend(backend, resolve_device(device))
    token = hashlib.sha256(f"{cfg.cache_token()}|{resolved}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"parts-{token}"


def _shard_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(f"{SHARD_PREFIX}*.npz"))


def _locate(directory: Path, wanted: set[str]) -> dict[str, tuple[Path, int]]:
    """key -> (shard, row) for every wanted key present in the cache."""
    found: dict[str, tuple[Path, int]] = {}
    for shard in _shard_files(directory):
        if len(found) == len(wanted):
            break
        try:
            with np.load(shard, allow_pickle=False) as data:
                keys = data["keys"]  # reads only this member of the archive
        except Exception as exc:  # a damaged shard is skipped, its images recomputed
            log.warning("ignoring unreadable cache shard %s: %s", shard, exc)
            continue
        for row, key in enumerate(keys.tolist()):
            if key in wanted and key not in found:
                found[key] = (shard, row)
    return found


def _write_shard(directory: Path, keys: list[str], feats: PartsFeatures) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20]
    final = directory / f"{SHARD_PREFIX}{name}.npz"
    # Readers see the whole shard or none of it; the temporary name (".shard-...tmp.npz")
    # ends in .npz so np.savez keeps it, and never matches the `shard-*.npz` glob.
    with atomic_file(final, suffix=".npz") as tmp:
        np.savez(tmp, keys=np.asarray(keys, dtype=str),
                 **{field: getattr(feats, field) for field in PartsFeatures.ARRAYS})
    return final


def extract_parts_cached(image_paths: Sequence[str | Path], cfg: PartsConfig | None,
                         cache_dir: str | Path, device: str | torch.device | None = None,
                         batch_size: int = 32, progress: bool = True, workers: int | None = None,
                         shard_size: int = 256, backend: str = "auto") -> PartsFeatures:
    """`extract_parts` with a content-addressed disk cache; same result, rows in input order.

    Identical files under different paths are computed once. Missing images are computed
    in chunks of `shard_size`, each saved as soon as it is done. The backend is part of the
    key: backends agree only to float rounding (~1e-5), and that much moved test nDCG@10 in
    the third decimal, so features a torch run cached must not stand in for ONNX Runtime's
    (the numbers of a run would depend on which backend filled the cache first).
    """
    cfg = cfg or PartsConfig()
    paths = [str(p) for p in image_paths]
    if not paths:
        return PartsFeatures.empty(cfg)
    directory = config_dir(cache_dir, cfg, backend, device)
    keys = [image_key(p) for p in paths]
    located = _locate(directory, set(keys))

    # Sources of rows: loaded shards and freshly computed chunks, each a dict of arrays.
    sources: list[dict[str, np.ndarray]] = []
    where: dict[str, tuple[int, int]] = {}  # key -> (source, row)
    by_shard: dict[Path, list[str]] = {}
    for key, (shard, _row) in located.items():
        by_shard.setdefault(shard, []).append(key)
    for shard, shard_keys in by_shard.items():
        try:
            with np.load(shard, allow_pickle=False) as data:
                sources.append({field: data[field] for field in PartsFeatures.ARRAYS})
        except Exception as exc:  # truncated after its key list: recompute its images
            log.warning("ignoring unreadable cache shard %s: %s", shard, exc)
            continue
        for key in shard_keys:
            where[key] = (len(sources) - 1, located[key][1])

    first_path: dict[str, str] = {}
    for key, path in zip(keys, paths, strict=True):
        if key not in where:
            first_path.setdefault(key, path)
    missing = list(first_path)
    log.info("parts cache %s: %d of %d images cached, %d to compute", directory,
             sum(k in where for k in keys), len(paths), len(missing))

    with tqdm(total=len(missing), desc="parts", unit="img", disable=not progress or not missing) as bar:
        for start in range(0, len(missing), shard_size):
            chunk_keys = missing[start:start + shard_size]
            feats = parts_module.extract_parts([first_path[k] for k in chunk_keys], cfg, device,
                                               batch_size=batch_size, progress=False, workers=workers,
                                               backend=backend)
            _write_shard(directory, chunk_keys, feats)
            sources.append({field: getattr(feats, field) for field in PartsFeatures.ARRAYS})
            for row, key in enumerate(chunk_keys):
                where[key] = (len(sources) - 1, row)
            bar.update(len(chunk_keys))

    # Gather rows source by source (vectorised), in the caller's order.
    out_rows_by_source: dict[int, tuple[list[int], list[int]]] = {}
    for out_row, key in enumerate(keys):
        src, row = where[key]
        dst, rows = out_rows_by_source.setdefault(src, ([], []))
        dst.append(out_row)
        rows.append(row)
    arrays = {}
    for field in PartsFeatures.ARRAYS:
        template = sources[0][field]
        out = np.empty((len(paths), *template.shape[1:]), dtype=template.dtype)
        for src, (dst, rows) in out_rows_by_source.items():
            out[dst] = sources[src][field][rows]
        arrays[field] = out
    return PartsFeatures(paths=paths, **arrays)
