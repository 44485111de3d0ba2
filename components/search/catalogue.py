"""The ads a search engine serves (a catalogue version), in memory and on disk; this module
owns the version's file names, its writer and its reader, and the word-vectors file that
bundles and versions share.

    catalogue/
      catalogue.json     format, version number, model name/version, parent run, counts, index kind
      ads.parquet        ad_id, title, words, scores, image_ref (rows in embedding order)
      embeddings.npy     (N, dim) float32, the ad tower's ad vectors (not normalised)
      word_vectors.npz   query-tower vectors of the catalogue's visual words ("matched words")
      index/             AdIndex.save over the embeddings (so loading never rebuilds a graph)
      images/            the images of the ads this version added (earlier ones stay in their runs)

Embeddings are kept beside the index because a change (add, replace, remove) builds the next
version from them exactly; an IVF-PQ index alone could not give them back. `image_ref` is
where an ad's image lives: `file:<absolute path>` (ads of the training dataset) or
`run:<run id>/images/<file>` (an image logged by the catalogue run that added the ad).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from components.outputs import atomic_dir
from components.retrieve.config import IndexConfig
from components.retrieve.index import AdIndex

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "catalogue.json"
ADS_FILE = "ads.parquet"
EMBEDDINGS_FILE = "embeddings.npy"
WORD_VECTORS_FILE = "word_vectors.npz"
INDEX_DIR = "index"
IMAGES_DIR = "images"
AD_COLUMNS = ["ad_id", "title", "words", "scores", "image_ref"]


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
    _index: object = field(default=None, repr=False)
    # The index this version's replaces: its query moments and trained state carry over (no retraining).
    _previous_index: object = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.ads = self.ads[AD_COLUMNS].reset_index(drop=True)
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
                added_word_vectors: dict[str, np.ndarray] | None = None, removed: list[str] = ()) -> Catalogue:
        """The next version: `removed` ids taken out, `added` rows in (an id already present is
        replaced: its old row goes, the new one is appended). Unknown ids in `removed` raise."""
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
            ads = pd.concat([ads, added[AD_COLUMNS]], ignore_index=True)
            embeddings = np.concatenate([embeddings, np.asarray(added_embeddings, np.float32)])
        if len(ads) == 0:
            raise ValueError("this change would leave the catalogue empty; a search needs at least one ad")
        words_in_use = {w for ws in ads["words"] for w in ws}
        vectors = {w: v for w, v in {**self.word_vectors, **(added_word_vectors or {})}.items() if w in words_in_use}
        replaced = sorted(set(new_ids) & set(ids))
        change = {"added": sorted(set(new_ids) - set(ids)), "replaced": replaced, "removed": sorted(set(removed))}
        return Catalogue(ads, embeddings, vectors, self.index_cfg, self.version + 1, self.model_name,
                         self.model_version, None, self.run_id, change, _previous_index=self.index)

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
                    "index_config": self.index_cfg.model_dump(), "change": self.change}
            (scratch / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return out_dir

    @classmethod
    def load(cls, directory: Path, run_id: str | None = None) -> Catalogue:
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not found; {directory} is not a catalogue version")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: catalogue format {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        ads = pd.read_parquet(directory / ADS_FILE)
        ads["words"] = ads["words"].map(list)
        ads["scores"] = ads["scores"].map(list)
        vectors = read_word_vectors(directory / WORD_VECTORS_FILE)
        # Memory-mapped: serving reads the index, not these (a change reads them once), so a
        # large catalogue's float32 vectors stay on disk instead of in every server's memory.
        embeddings = np.load(directory / EMBEDDINGS_FILE, mmap_mode="r")
        catalogue = cls(ads, embeddings, vectors, IndexConfig(**meta["index_config"]),
                        int(meta["version"]), meta["model_name"], str(meta["model_version"]), run_id,
                        meta.get("parent_run_id"), meta.get("change") or {})
        catalogue._index = AdIndex.load(directory / INDEX_DIR)
        return catalogue

