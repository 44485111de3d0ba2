"""The dataset interchange format: one directory of three parquet tables plus images.

This module owns the schema (column names and types), reading and writing, and the
dataset's content hash. Everything else in alignsearch consumes a `Dataset`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

SPLITS: tuple[str, ...] = ("train", "valid", "test")

ADS_FILE = "ads.parquet"
QUERIES_FILE = "queries.parquet"
QRELS_FILE = "qrels.parquet"
IMAGES_DIR = "images"
README_FILE = "README.txt"

# column -> pandas dtype written to parquet; optional columns are listed separately.
ADS_COLUMNS: dict[str, str] = {
    "ad_id": "string",
    "title": "string",
    "image_path": "string",
    "split": "string",
}
ADS_OPTIONAL_COLUMNS: dict[str, str] = {"category": "string"}
QUERIES_COLUMNS: dict[str, str] = {"query_id": "string", "text": "string", "split": "string"}
QRELS_COLUMNS: dict[str, str] = {
    "query_id": "string",
    "ad_id": "string",
    "relevance": "int64",
    "split": "string",
}
# A qrel's weight (float > 0, finite; 1 when absent): how much the pair counts in training. Ingested
# clicks carry their inverse-propensity weight here (docs/dataset-format.md, docs/traffic.md).
QRELS_OPTIONAL_COLUMNS: dict[str, str] = {"weight": "float64"}


class DatasetFormatError(ValueError):
    """A dataset directory that cannot be read as the interchange format."""


@dataclass
class Dataset:
    """A dataset in the interchange format: ads, queries and qrels, with images under `root`."""

    ads: pd.DataFrame
    queries: pd.DataFrame
    qrels: pd.DataFrame
    root: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def title_less(self) -> bool:
        """No ad has a title (a COCO-style source: images and captions only)."""
        return not self.ads["title"].fillna("").astype(str).str.strip().any()

    def image_file(self, image_path: str) -> Path:
        if self.root is None:
            raise DatasetFormatError("dataset has no root directory; image paths are relative to it")
        return self.root / image_path

    def split(self, name: str) -> Dataset:
        """The part of the dataset in one split (ads, queries and qrels of that split)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return Dataset(
            ads=self.ads[self.ads["split"] == name].reset_index(drop=True),
            queries=self.queries[self.queries["split"] == name].reset_index(drop=True),
            qrels=self.qrels[self.qrels["split"] == name].reset_index(drop=True),
            root=self.root,
        )

    def ad_rows(self, part: Dataset) -> list[int]:
        """Row numbers in this dataset's ads table of `part`'s ads (e.g. a split), in their
        order: how dataset-wide per-ad arrays such as image features are sliced."""
        row = {ad_id: i for i, ad_id in enumerate(self.ads["ad_id"].astype(str))}
        return [row[a] for a in part.ads["ad_id"].astype(str)]

    def counts(self) -> dict[str, dict[str, int]]:
        """Rows per table and split, e.g. {"ads": {"train": 10, ...}, ...}."""
        out: dict[str, dict[str, int]] = {}
        for table_name, table in (("ads", self.ads), ("queries", self.queries), ("qrels", self.qrels)):
            per_split = table["split"].value_counts()
            out[table_name] = {s: int(per_split.get(s, 0)) for s in SPLITS}
            out[table_name]["total"] = int(len(table))
        positives = self.qrels[self.qrels["relevance"] > 0]
        out["positive_qrels"] = {s: int((positives["split"] == s).sum()) for s in SPLITS}
        out["positive_qrels"]["total"] = int(len(positives))
        return out


def _coerce(table: pd.DataFrame, columns: dict[str, str], optional: dict[str, str], name: str) -> pd.DataFrame:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DatasetFormatError(f"{name}: missing required column(s) {missing}")
    keep = list(columns) + [c for c in optional if c in table.columns]
    out = table[keep].copy()
    for column, dtype in {**columns, **optional}.items():
        if column in out.columns:
            out[column] = out[column].astype(dtype)
    return out.reset_index(drop=True)


def write_dataset(dataset: Dataset, out_dir: Path) -> Path:
    """Write the three tables (images are expected to be in `out_dir/images` already)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _coerce(dataset.ads, ADS_COLUMNS, ADS_OPTIONAL_COLUMNS, ADS_FILE).to_parquet(out_dir / ADS_FILE, index=False)
    _coerce(dataset.queries, QUERIES_COLUMNS, {}, QUERIES_FILE).to_parquet(out_dir / QUERIES_FILE, index=False)
    _coerce(dataset.qrels, QRELS_COLUMNS, QRELS_OPTIONAL_COLUMNS, QRELS_FILE).to_parquet(out_dir / QRELS_FILE, index=False)
    return out_dir


def read_dataset(root: Path, *, strict: bool = True) -> Dataset:
    """Read a dataset directory.

    With `strict`, missing columns raise `DatasetFormatError` naming the file; without it
    the raw tables are returned as they are (validation reports what is wrong with them).
    """
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DatasetFormatError(f"{root}: not a directory (a dataset is a directory holding {ADS_FILE}, "
                                 f"{QUERIES_FILE}, {QRELS_FILE} and {IMAGES_DIR}/)")
    tables = {}
    for file_name in (ADS_FILE, QUERIES_FILE, QRELS_FILE):
        path = root / file_name
        if not path.is_file():
            raise DatasetFormatError(f"{path}: file not found (a dataset directory holds {ADS_FILE}, {QUERIES_FILE}, {QRELS_FILE} and {IMAGES_DIR}/)")
        try:
            tables[file_name] = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a corrupt file
            raise DatasetFormatError(f"{path}: not a readable parquet file ({exc})") from exc
    ads, queries, qrels = tables[ADS_FILE], tables[QUERIES_FILE], tables[QRELS_FILE]
    if strict:
        ads = _coerce(ads, ADS_COLUMNS, ADS_OPTIONAL_COLUMNS, str(root / ADS_FILE))
        queries = _coerce(queries, QUERIES_COLUMNS, {}, str(root / QUERIES_FILE))
        qrels = _coerce(qrels, QRELS_COLUMNS, QRELS_OPTIONAL_COLUMNS, str(root / QRELS_FILE))
    return Dataset(ads=ads, queries=queries, qrels=qrels, root=root)


def dataset_hash(root: Path) -> str:
    """Content hash of a dataset directory, identical to DVC's directory hash (`<md5>.dir`).

    DVC hashes a directory as the md5 of the JSON list of its files' (md5, relpath), sorted
    by the relpath string; computing the same here means the hash a run logs is the one in
    `dvc.lock` or a `.dvc` file when the directory is a DVC output, and still a faithful
    content hash when the user's dataset is not tracked by DVC at all. (Sorting Path objects
    instead orders by parts, which differs where `a.png` and a folder `a/` meet: openclipart
    has `flags/america/canada.png` beside `flags/america/canada/`.)
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(f"{root}: not a directory")
    relpaths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    entries = [{"md5": _file_md5(root / relpath), "relpath": relpath} for relpath in relpaths]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def _file_md5(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
