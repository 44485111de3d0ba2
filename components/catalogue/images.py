"""Where an ad's image lives, and the one reader of that reference: `image_ref` is
`file:<absolute path>` (an ad of the training dataset) or `run:<run id>/images/<file>` (an
image logged by the catalogue run that added the ad; `run:SELF/...` while that run is being
written).

A reference names a file under a root, and is found only there: a `file:` ref under the model
version's dataset directory, a `run:` ref under that run's folder of the catalogue cache, each
reached through no symlink (real paths compared), so a catalogue, a dataset table or a cache
entry cannot make the service read another file of the machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path

from components.catalogue.versions import ARTIFACT_PATH, local_dir
from components.data.validate import FORMAT_NAMES, IMAGE_FORMATS, image_format
from components.outputs import redact_uri
from components.search.catalogue import IMAGES_DIR

log = logging.getLogger(__name__)

SELF_REF = "run:SELF/"  # an image of the version being published (its run id is not known yet)
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # MLflow's are 32 hex digits
_FILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")  # image_name's, and no dot file


def image_name(path: Path) -> str:
    """The file name an added ad's image is stored under: its content hash and the suffix of the
    format detected in it (a PNG named x.html is stored as .png); `ValueError` for a file that
    is no PNG, JPEG or WebP (validation refuses those first)."""
    found = image_format(path)
    if found is None:
        raise ValueError(f"{path}: not a {FORMAT_NAMES} image")
    digest = hashlib.md5(Path(path).read_bytes()).hexdigest()[:20]
    return digest + IMAGE_FORMATS[found].suffix


def own_image_ref(name: str) -> str:
    """The reference of an image the version being published adds."""
    return f"{SELF_REF}{IMAGES_DIR}/{name}"


def fill_own_ref(ref: str, run_id: str) -> str:
    """`own_image_ref` once the publishing run exists."""
    return ref.replace(SELF_REF, f"run:{run_id}/", 1) if ref.startswith(SELF_REF) else ref


def _file_under(root: Path, rel: str) -> Path | None:
    """`root/rel` (real path) when it is a regular file reached through no symlink below `root`."""
    real_root = os.path.realpath(root)
    candidate = os.path.join(real_root, rel)
    if os.path.realpath(candidate) != candidate or not os.path.isfile(candidate):
        return None
    return Path(candidate)


def _dataset_file(path: str, dataset_dir: Path | None) -> Path | None:
    if not os.path.isabs(path) or ".." in Path(path).parts:
        return None
    if dataset_dir is None:
        # No root known: only `live.reindex` reads refs this way, to re-encode images (never to
        # serve them); still no symlink anywhere on the way.
        return Path(path) if os.path.realpath(path) == os.path.normpath(path) and os.path.isfile(path) else None
    real_root = Path(os.path.realpath(dataset_dir))
    if not Path(path).is_relative_to(real_root) or Path(path) == real_root:
        return None
    return _file_under(real_root, os.path.relpath(path, real_root))


def _run_file(run_id: str, name: str, cache_dir: Path) -> Path | None:
    """A catalogue run's image: from the cached version when that is here, else that one file
    downloaded beside it (never the whole version: embeddings, index and every image)."""
    version_dir = local_dir(cache_dir, run_id)
    run_dir = version_dir.parent
    found = (_file_under(run_dir, os.path.join(version_dir.name, IMAGES_DIR, name))
             or _file_under(run_dir, os.path.join(IMAGES_DIR, name)))
    if found is not None or os.path.lexists(run_dir / IMAGES_DIR / name):
        return found
    import mlflow

    try:
        (run_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=run_dir) as scratch:
            got = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{ARTIFACT_PATH}/{IMAGES_DIR}/{name}",
                                                      dst_path=scratch)
            if os.path.islink(got) or not os.path.isfile(got):
                return None
            os.replace(got, run_dir / IMAGES_DIR / name)  # whole or not at all
    except Exception as exc:  # a run or image that is gone: the ad has no image to show
        log.warning("image run:%s/%s/%s: %s", run_id, IMAGES_DIR, name, redact_uri(f"{type(exc).__name__}: {exc}"))
        return None
    return _file_under(run_dir, os.path.join(IMAGES_DIR, name))


def resolve_image(ref: str, cache_dir: Path, *, dataset_dir: Path | None = None) -> Path | None:
    """The local file of an ad's `image_ref`, or None. `file:` refs are found under
    `dataset_dir` (the model version's training dataset; None only for `live.reindex`, which
    reads images to re-encode them), `run:` refs in the catalogue cache under `cache_dir`
    (one image downloaded from its run when needed)."""
    if ref.startswith("file:"):
        return _dataset_file(ref.removeprefix("file:"), dataset_dir)
    if ref.startswith("run:"):
        run_id, _, rel = ref.removeprefix("run:").partition("/")
        folder, _, name = rel.partition("/")
        if not _RUN_ID.fullmatch(run_id) or folder != IMAGES_DIR or not _FILE_NAME.fullmatch(name):
            return None
        return _run_file(run_id, name, cache_dir)
    return None
