"""The ads a search engine serves (a catalogue version), in memory and on disk; this module
owns the version's file names, its writer and its reader, and the word-vectors file that
bundles and versions share.

    catalogue/
      catalogue.json     format, version number, model name/version, parent run, counts, index kind
      ads.parquet        ad_id, title, words, scores, image_ref (rows in embedding order), and
                         image_hash, word_boxes (format 2; see below)
      embeddings.npy     (N, dim) float32, the ad tower's ad vectors (not normalised)
      word_vectors.npz   query-tower vectors of the catalogue's visual words ("matched words")
      index/             AdIndex.save over the embeddings (so loading never rebuilds a graph)
      images/            the images of the ads this version added (earlier ones stay in their runs)

Embeddings are kept beside the index because a change (add, replace, remove) builds the next
version from them exactly; an IVF-PQ index alone could not give them back. `image_ref` is
where an ad's image lives: `file:<absolute path>` (ads of the training dataset) or
`run:<run id>/images/<file>` (an image logged by the catalogue run that added the ad).

Format 2 adds what a search page shows beside an ad, computed once when the version is built,
never per request: `image_hash` (sha256 of the image file's bytes: ads with the same one are
one result, `components.search.engine`) and `word_boxes` (for each of the ad's first
`words_shown` words, `[x0, y0, x1, y1]` as fractions of the image: the part the alignment
scores highest for that word, `word_boxes_of`; `[]` where there is none); catalogue.json
records `words_shown`. A format-1 version still loads: no hashes (`file:` images are hashed
when the next version is built, or once by the engine that serves it), no regions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from components.outputs import atomic_dir
from components.retrieve.config import IndexConfig
from components.retrieve.index import AdIndex

if TYPE_CHECKING:
    from components.vision.parts import PartsFeatures

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: before image_hash, word_boxes and words_shown
META_FILE = "catalogue.json"
ADS_FILE = "ads.parquet"
EMBEDDINGS_FILE = "embeddings.npy"
WORD_VECTORS_FILE = "word_vectors.npz"
INDEX_DIR = "index"
IMAGES_DIR = "images"
AD_COLUMNS = ["ad_id", "title", "words", "scores", "image_ref"]
IMAGE_HASH = "image_hash"  # "" = not known
WORD_BOXES = "word_boxes"  # per shown word [x0, y0, x1, y1] in 0..1, [] = no region
ANNOTATION_COLUMNS = [IMAGE_HASH, WORD_BOXES]


def image_hash(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes: an ad's `image_hash`."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_ref_hash(ref: str) -> str:
    """`image_hash` of a `file:` ref's file; "" for another ref, or a path that is not a regular
    file reached through no symlink (a table names it: a link is followed by nobody)."""
    path = ref.removeprefix("file:")
    if not ref.startswith("file:") or not os.path.isabs(path) or os.path.realpath(path) != os.path.normpath(path) \
            or not os.path.isfile(path):
        return ""
    return image_hash(path)


def file_ref_hashes(ads: pd.DataFrame) -> list[str]:
    """`image_hash` of each row, the missing ones of `file:` refs (the training dataset's
    images) read from their files; other refs (`run:`) are hashed when they are encoded."""
    return [known or _file_ref_hash(ref) for known, ref in zip(ads[IMAGE_HASH], ads["image_ref"].astype(str),
                                                                strict=True)]


def word_boxes_of(alignment, features: PartsFeatures, words: list[list[str]]) -> list[list[list[float]]]:
    """Per image (rows of `features`), for each of `words[i]` (the words a person is shown) the
    box of the part `alignment` (an `AlignmentModel`) scores highest for it, as fractions
    `[x0, y0, x1, y1]` of the image; `[]` where no part answers (`AlignmentModel.word_parts`).
    Part boxes are kept in original-image pixels (letterboxing undone), so a fraction lands on
    the same spot of the image however it is displayed."""
    chosen = alignment.word_parts(features, words)  # (N, W), -1 = none
    out = []
    for i, ws in enumerate(words):
        width, height = (float(v) for v in features.image_sizes[i])
        scale = np.array([width, height, width, height], np.float64)
        boxes = []
        for j in range(len(ws)):
            part = int(chosen[i, j])
            box = np.clip(features.boxes[i, part] / np.maximum(scale, 1.0), 0.0, 1.0) if part >= 0 else None
            valid = box is not None and box[2] > box[0] and box[3] > box[1]
            boxes.append([round(float(v), 4) for v in box] if valid else [])
        out.append(boxes)
    return out


def _annotated(ads: pd.DataFrame) -> pd.DataFrame:
    """`ads` with AD_COLUMNS and ANNOTATION_COLUMNS only, in that order: a missing annotation is
    "" (hash) or [] (boxes), boxes as plain lists of floats (parquet gives arrays back)."""
    out = ads[AD_COLUMNS].reset_index(drop=True).copy()
    hashes = ads[IMAGE_HASH] if IMAGE_HASH in ads.columns else [""] * len(ads)
    boxes = ads[WORD_BOXES] if WORD_BOXES in ads.columns else [None] * len(ads)
    out[IMAGE_HASH] = [h if isinstance(h, str) else "" for h in hashes]
    out[WORD_BOXES] = [[[float(v) for v in box] for box in row] if isinstance(row, list | np.ndarray) else []
                       for row in boxes]
    return out


def write_word_vectors(path: Path, vectors: dict[str, np.ndarray], dim: int) -> Path:
    """`word -> (dim,)` query-tower vectors as an npz of `words` (sorted) and `vectors`."""
    words = sorted(vectors)
    matrix = np.stack([vectors[w] for w in words]) if words else np.zeros((0, dim), np.float32)
    np.savez(path, words=np.array(words, dtype=str), vectors=matrix.astype(np.float32))
    return Path(path)


def is_saved(directory: Path) -> bool:
    """True when `directory` holds a complete catalogue version (its meta file is written last)."""
    return (Path(directory) / META_FILE).is_file()


def read_word_vectors(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {str(w): v for w, v in zip(data["words"], data["vectors"].astype(np.float32), strict=True)}


@dataclass
class Catalogue:
    """A catalogue version in memory. `version` 0 is the one a model was registered with."""

    ads: pd.DataFrame  # AD_COLUMNS, one row per ad, in embedding order
    embeddings: np.ndarray  # (N, dim) float32
    word_vectors: dict[str, np.ndarray]  # visual word -> query-tower vector (dim,)
    index_cfg: IndexConfig
    version: int = 0
    model_name: str = ""
    model_version: str = ""
    run_id: str | None = None  # the MLflow run that recorded this version (None for version 0)
    parent_run_id: str | None = None
    change: dict = field(default_factory=dict)  # what made this version: added / replaced / removed ids
    words_shown: int | None = None  # how many of an ad's words `word_boxes` covers (None: format 1)
    _index: object = field(default=None, repr=False)
    # The index this version's replaces: its query moments and trained state carry over (no retraining).
    _previous_index: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.ads = _annotated(self.ads)
        self.embeddings = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        if len(self.ads) != len(self.embeddings):
            raise ValueError(f"catalogue: {len(self.ads)} ads but {len(self.embeddings)} embeddings")

    def __len__(self) -> int:
        return len(self.ads)

    @property
    def label(self) -> str:
        """How answers name this version: `v<N>` (`v0` = the registered model's own ads)."""
        return f"v{self.version}"

    @property
    def index(self):
        """The faiss index over the embeddings (built on first use when not loaded from disk)."""
        if self._index is None:
            self._index = AdIndex.build(self.ads["ad_id"].astype(str).tolist(), self.embeddings, self.index_cfg,
                                        like=self._previous_index)
            self._previous_index = None
        return self._index

    def describe(self) -> dict:
        return {"catalogue_version": self.label, "catalogue_run_id": self.run_id or "",
                "num_ads": len(self), "index_kind": self.index.kind if len(self) else "none"}

    # -- changes --------------------------------------------------------------------------
    def changed(self, *, added: pd.DataFrame | None = None, added_embeddings: np.ndarray | None = None,
                added_word_vectors: dict[str, np.ndarray] | None = None, removed: list[str] = (),
                words_shown: int | None = None) -> Catalogue:
        """The next version: `removed` ids taken out, `added` rows in (an id already present is
        replaced: its old row goes, the new one is appended). Unknown ids in `removed` raise.
        `added` may carry ANNOTATION_COLUMNS (encoded with `words_shown` words each); rows
        without an image hash get theirs now when their image is a `file:` ref."""
        ids = self.ads["ad_id"].astype(str)
        unknown = sorted(set(removed) - set(ids))
        if unknown:
            raise KeyError(f"not in catalogue {self.label} of {self.model_name} v{self.model_version}: "
                           f"{unknown[:10]}" + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
        new_ids = [] if added is None else added["ad_id"].astype(str).tolist()
        drop = set(removed) | set(new_ids)
        keep = ~ids.isin(drop).to_numpy()
        ads = self.ads[keep]
        embeddings = self.embeddings[keep]
        if added is not None and len(added):
            ads = pd.concat([ads, _annotated(added)], ignore_index=True)
            embeddings = np.concatenate([embeddings, np.asarray(added_embeddings, np.float32)])
        if len(ads) == 0:
            raise ValueError("this change would leave the catalogue empty; a search needs at least one ad")
        ads = _annotated(ads)
        ads[IMAGE_HASH] = file_ref_hashes(ads)
        words_in_use = {w for ws in ads["words"] for w in ws}
        vectors = {w: v for w, v in {**self.word_vectors, **(added_word_vectors or {})}.items() if w in words_in_use}
        replaced = sorted(set(new_ids) & set(ids))
        change = {"added": sorted(set(new_ids) - set(ids)), "replaced": replaced, "removed": sorted(set(removed))}
        return Catalogue(ads, embeddings, vectors, self.index_cfg, self.version + 1, self.model_name,
                         self.model_version, None, self.run_id, change, words_shown or self.words_shown,
                         _previous_index=self.index)

    # -- persistence ----------------------------------------------------------------------
    def save(self, out_dir: Path, images: dict[str, Path] | None = None) -> Path:
        """Write the version to `out_dir` (through a temporary directory renamed at the end).
        `images`: file name under images/ -> source file, the images this version adds."""
        with atomic_dir(out_dir) as scratch:
            self.ads.to_parquet(scratch / ADS_FILE, index=False)
            np.save(scratch / EMBEDDINGS_FILE, self.embeddings)
            dim = self.embeddings.shape[1] if self.embeddings.ndim == 2 else 0
            write_word_vectors(scratch / WORD_VECTORS_FILE, self.word_vectors, dim)
            self.index.save(scratch / INDEX_DIR)
            if images:
                (scratch / IMAGES_DIR).mkdir()
                for name, source in images.items():
                    shutil.copyfile(source, scratch / IMAGES_DIR / name)
            meta = {"format_version": FORMAT_VERSION, "version": self.version, "model_name": self.model_name,
                    "model_version": self.model_version, "parent_run_id": self.parent_run_id,
                    "num_ads": len(self), "dim": dim, "index_kind": self.index.kind,
                    "index_config": self.index_cfg.model_dump(), "change": self.change,
                    "words_shown": self.words_shown}
            (scratch / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out_dir

    @classmethod
    def load(cls, directory: Path, run_id: str | None = None) -> Catalogue:
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not found; {directory} is not a catalogue version")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") not in READABLE_FORMATS:
            raise ValueError(f"{meta_path}: catalogue format {meta.get('format_version')!r}, expected one of "
                             f"{READABLE_FORMATS}")
        ads = pd.read_parquet(directory / ADS_FILE)
        ads["words"] = ads["words"].map(list)
        ads["scores"] = ads["scores"].map(list)
        vectors = read_word_vectors(directory / WORD_VECTORS_FILE)
        # Memory-mapped: serving reads the index, not these (a change reads them once), so a
        # large catalogue's float32 vectors stay on disk instead of in every server's memory.
        embeddings = np.load(directory / EMBEDDINGS_FILE, mmap_mode="r")
        catalogue = cls(ads, embeddings, vectors, IndexConfig(**meta["index_config"]),
                        int(meta["version"]), meta["model_name"], str(meta["model_version"]), run_id,
                        meta.get("parent_run_id"), meta.get("change") or {}, meta.get("words_shown"))
        catalogue._index = AdIndex.load(directory / INDEX_DIR)
        return catalogue

