"""Where an ad's image lives, and the one reader of that reference: `image_ref` is
`file:<absolute path>` (an ad of the training dataset) or `run:<run id>/images/<file>` (an
image logged by the catalogue run that added the ad; `run:SELF/...` while that run is being
written)."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from components.catalogue.versions import fetch, local_dir
from components.data.validate import FORMAT_NAMES, IMAGE_FORMATS, image_format
from components.search.catalogue import IMAGES_DIR

log = logging.getLogger(__name__)

SELF_REF = "run:SELF/"  # an image of the version being published (its run id is not known yet)


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


def resolve_image(ref: str, cache_dir: Path) -> Path | None:
    """The local file of an ad's `image_ref` (downloaded from its run when needed), or None."""
    if ref.startswith("file:"):
        path = Path(ref.removeprefix("file:"))
        return path if path.is_file() else None
    if ref.startswith("run:"):
        run_id, _, rel = ref.removeprefix("run:").partition("/")
        if not rel.startswith(IMAGES_DIR + "/") or ".." in Path(rel).parts:
            return None
        path = local_dir(cache_dir, run_id) / rel
        if not path.is_file():
            try:
                path = Path(fetch(run_id, cache_dir)) / rel
            except Exception as exc:  # a run that is gone: the ad has no image to show
                log.warning("image %s: %s", ref, exc)
                return None
        return path if path.is_file() else None
    return None
