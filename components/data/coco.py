"""The `coco` source: an MS-COCO style captions file and its image folder.

Images become ads with empty titles (`ad_id = coco:<image id>`); each caption becomes a
query with one relevant ad, its image, in the image's split. Two layouts are read:
COCO captions (`{"images": [{"id", "file_name", "split"?}], "annotations": [{"id"?,
"image_id", "caption"}]}`) and Karpathy's (`{"images": [{"filename", "split",
"sentences": [{"raw"}], "cocoid" | "imgid" | "id"}]}`).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from components.data.config import DataConfig
from components.data.format import IMAGES_DIR, SPLITS, Dataset, DatasetFormatError
from components.data.splits import assign_splits

log = logging.getLogger(__name__)

# Split names found in COCO/Karpathy files -> the interchange format's splits.
SPLIT_NAMES: dict[str, str] = {
    "train": "train",
    "restval": "train",
    "val": "valid",
    "valid": "valid",
    "validation": "valid",
    "test": "test",
}
# Pillow format -> file suffix; these are copied byte for byte, anything else is re-encoded as PNG.
KEPT_FORMATS: dict[str, str] = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


class CocoFormatError(DatasetFormatError):
    """A captions file (or its images) that cannot be read as COCO or Karpathy style."""


@dataclass
class _Image:
    key: str  # the image id as text (COCO ids are ints in JSON, strings elsewhere)
    file_name: str
    sub_dir: str | None  # Karpathy's `filepath` (e.g. "val2014"), tried before the images root
    split: str | None
    where: str  # e.g. "images[3]", for error messages


@dataclass
class _Caption:
    query_key: str
    image_key: str
    text: str


def _require(entry: object, key: str, where: str, path: Path):
    if not isinstance(entry, dict):
        raise CocoFormatError(f"{path}: {where} must be a JSON object, got {type(entry).__name__}")
    if key not in entry:
        raise CocoFormatError(f"{path}: {where} is missing key {key!r}")
    return entry[key]


def _id_text(value: object, field: str, where: str, path: Path) -> str:
    if isinstance(value, bool) or not isinstance(value, int | str) or str(value) == "":
        raise CocoFormatError(f"{path}: {where}.{field} must be an integer or a non-empty string, got {value!r}")
    return str(value)


def _split_of(entry: dict, where: str, path: Path) -> str | None:
    raw = entry.get("split")
    if raw is None:
        return None
    split = SPLIT_NAMES.get(str(raw).strip().lower())
    if split is None:
        raise CocoFormatError(f"{path}: {where}.split is {raw!r}; expected one of {sorted(SPLIT_NAMES)}")
    return split


def _text(value: object, field: str, where: str, path: Path) -> str:
    if not isinstance(value, str):
        raise CocoFormatError(f"{path}: {where}.{field} must be a string, got {type(value).__name__}")
    return value.strip()


def load_captions_file(path: Path) -> tuple[list[_Image], list[_Caption], str]:
    """Parse a COCO or Karpathy captions file; returns images, captions and the style name."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: captions file not found (data.coco.captions)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CocoFormatError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    except UnicodeDecodeError as exc:
        raise CocoFormatError(f"{path}: not UTF-8 text ({exc})") from exc
    if not isinstance(doc, dict):
        raise CocoFormatError(f"{path}: top level must be a JSON object with key 'images', got {type(doc).__name__}")
    raw_images = _require(doc, "images", "top level", path)
    if not isinstance(raw_images, list):
        raise CocoFormatError(f"{path}: 'images' must be a list, got {type(raw_images).__name__}")
    if not raw_images:
        raise CocoFormatError(f"{path}: 'images' is empty")
    karpathy = "annotations" not in doc
    if karpathy and not all(isinstance(e, dict) and "sentences" in e for e in raw_images):
        raise CocoFormatError(
            f"{path}: missing key 'annotations' (COCO style) and not every image has 'sentences' (Karpathy style)"
        )

    images: list[_Image] = []
    captions: list[_Caption] = []
    for i, entry in enumerate(raw_images):
        where = f"images[{i}]"
        if karpathy:
            id_field = next((f for f in ("cocoid", "imgid", "id") if f in entry), "cocoid")
            name_fields = ("filename", "file_name")
        else:
            id_field = "id"
            name_fields = ("file_name", "filename")
        key = _id_text(_require(entry, id_field, where, path), id_field, where, path)
        name_field = next((f for f in name_fields if f in entry), name_fields[0])
        file_name = _text(_require(entry, name_field, where, path), name_field, where, path)
        if not file_name:
            raise CocoFormatError(f"{path}: {where}.{name_field} is empty")
        _check_relative(file_name, f"{where}.{name_field}", path)
        sub_dir = entry.get("filepath") if isinstance(entry.get("filepath"), str) else None
        if sub_dir:
            _check_relative(sub_dir, f"{where}.filepath", path)
        images.append(_Image(key, file_name, sub_dir, _split_of(entry, where, path), where))
        if karpathy:
            sentences = entry["sentences"]
            if not isinstance(sentences, list):
                raise CocoFormatError(f"{path}: {where}.sentences must be a list")
            for j, sentence in enumerate(sentences):
                s_where = f"{where}.sentences[{j}]"
                text = _text(_require(sentence, "raw", s_where, path), "raw", s_where, path)
                sid = sentence.get("sentid")
                query_key = _id_text(sid, "sentid", s_where, path) if sid is not None else f"{i}.{j}"
                captions.append(_Caption(query_key, key, text))

    if not karpathy:
        raw_annotations = doc["annotations"]
        if not isinstance(raw_annotations, list):
            raise CocoFormatError(f"{path}: 'annotations' must be a list, got {type(raw_annotations).__name__}")
        known = {im.key for im in images}
        for i, entry in enumerate(raw_annotations):
            where = f"annotations[{i}]"
            image_key = _id_text(_require(entry, "image_id", where, path), "image_id", where, path)
            if image_key not in known:
                raise CocoFormatError(f"{path}: {where} refers to unknown image_id {entry['image_id']!r}")
            text = _text(_require(entry, "caption", where, path), "caption", where, path)
            query_key = _id_text(entry["id"], "id", where, path) if "id" in entry else str(i)
            captions.append(_Caption(query_key, image_key, text))

    _check_unique([im.key for im in images], "image id", path)
    _check_unique([c.query_key for c in captions], "caption (annotation/sentence) id", path)
    with_split = [im for im in images if im.split is not None]
    if with_split and len(with_split) != len(images):
        missing = next(im for im in images if im.split is None)
        raise CocoFormatError(
            f"{path}: {missing.where} has no 'split' while {len(with_split)} other image(s) have one; "
            "give every image a split or none (then splits are assigned with data.seed)"
        )
    return images, captions, "karpathy" if karpathy else "coco"


def _check_relative(name: str, where: str, path: Path) -> None:
    """Image names are relative to the images folder: an absolute name or one with `..` could
    read any file on the machine into the dataset."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive:
        raise CocoFormatError(f"{path}: {where} is an absolute path ({name!r}); names must be relative to the images folder")
    if ".." in posix.split("/"):
        raise CocoFormatError(f"{path}: {where} contains '..' ({name!r}); names must stay inside the images folder")


def _check_unique(keys: list[str], what: str, path: Path) -> None:
    seen: set[str] = set()
    for key in keys:
        if key in seen:
            raise CocoFormatError(f"{path}: duplicate {what} {key!r}")
        seen.add(key)


def _find_image(image: _Image, images_dir: Path, captions_path: Path) -> Path:
    candidates = [images_dir / image.file_name]
    if image.sub_dir:
        candidates.insert(0, images_dir / image.sub_dir / image.file_name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"{tried}: image file not found ({captions_path}: {image.where}, image id {image.key}, file name {image.file_name!r})"
    )


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _store_image(source: Path, out_dir: Path, stem: str) -> tuple[str, bool]:
    """Copy a PNG/JPEG/WebP file as it is, re-encode anything else as PNG; returns (relative path, re-encoded)."""
    try:
        with Image.open(source) as im:
            fmt = im.format
            if fmt in KEPT_FORMATS:
                rel = f"{IMAGES_DIR}/{stem}{KEPT_FORMATS[fmt]}"
                shutil.copyfile(source, out_dir / rel)
                return rel, False
            rel = f"{IMAGES_DIR}/{stem}.png"
            im.convert("RGBA" if "A" in im.getbands() else "RGB").save(out_dir / rel, format="PNG")
            return rel, True
    except (UnidentifiedImageError, OSError) as exc:
        raise CocoFormatError(f"{source}: not a readable image ({exc})") from exc


def build_coco(cfg: DataConfig, out_dir: Path) -> tuple[Dataset, dict]:
    """Build the interchange format from `cfg.coco.captions` and the images under `cfg.coco.images`.

    `cfg.coco.images` defaults to the captions file's directory. Splits come from the
    file when it has them, else from `assign_splits` with `cfg.seed`; `cfg.max_ads` keeps
    a seeded subset of the images (and their captions).
    """
    if cfg.coco.captions is None:
        raise ValueError("data.coco.captions is not set: give the path of a COCO or Karpathy style captions JSON")
    captions_path = Path(cfg.coco.captions)
    images_dir = Path(cfg.coco.images) if cfg.coco.images is not None else captions_path.parent
    if not images_dir.is_dir():
        raise FileNotFoundError(f"{images_dir}: image directory not found (data.coco.images)")
    images, captions, style = load_captions_file(captions_path)
    num_images_in_file, num_captions_in_file = len(images), len(captions)

    if cfg.max_ads is not None and len(images) > cfg.max_ads:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(images), size=cfg.max_ads, replace=False))
        images = [images[i] for i in keep]
        kept_keys = {im.key for im in images}
        captions = [c for c in captions if c.image_key in kept_keys]

    if images[0].split is not None:
        split_source = "file"
        split_of = {im.key: im.split for im in images}
    else:
        split_source = "seeded"
        split_of = assign_splits([im.key for im in images], cfg.split_fractions, cfg.seed)

    out_dir = Path(out_dir)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    ads_rows, stems, num_reencoded = [], set(), 0
    for im in images:
        source = _find_image(im, images_dir, captions_path)
        stem = "coco_" + _UNSAFE.sub("_", im.key)
        if stem in stems:  # two ids that differ only in unsafe characters
            stem = f"{stem}_{len(stems)}"
        stems.add(stem)
        rel, reencoded = _store_image(source, out_dir, stem)
        num_reencoded += reencoded
        ads_rows.append({"ad_id": f"coco:{im.key}", "title": "", "image_path": rel, "split": split_of[im.key]})

    query_rows, qrel_rows, num_empty = [], [], 0
    for caption in captions:
        if not caption.text:
            num_empty += 1
            continue
        split = split_of[caption.image_key]
        query_id = f"c:{caption.query_key}"
        query_rows.append({"query_id": query_id, "text": caption.text, "split": split})
        qrel_rows.append({"query_id": query_id, "ad_id": f"coco:{caption.image_key}", "relevance": 1, "split": split})

    ads = pd.DataFrame(ads_rows, columns=["ad_id", "title", "image_path", "split"])
    queries = pd.DataFrame(query_rows, columns=["query_id", "text", "split"])
    qrels = pd.DataFrame(qrel_rows, columns=["query_id", "ad_id", "relevance", "split"])
    captioned = set(qrels["ad_id"])
    stats = {
        "style": style,
        "captions_file": str(captions_path),
        "split_source": split_source,
        "images_in_file": num_images_in_file,
        "captions_in_file": num_captions_in_file,
        "num_ads": len(ads),
        "num_queries": len(queries),
        "ads_without_captions": int(sum(a not in captioned for a in ads["ad_id"])),
        "empty_captions_skipped": num_empty,
        "images_reencoded_png": int(num_reencoded),
        **{f"ads_{s}": int((ads["split"] == s).sum()) for s in SPLITS},
    }
    log.info("coco: %s", stats)
    return Dataset(ads=ads, queries=queries, qrels=qrels, root=out_dir), stats
