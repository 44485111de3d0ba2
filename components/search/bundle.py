"""A search bundle: everything a search needs, as one directory. This module owns its file
names, its writer (`build_bundle`) and its readers (`read_meta`, `bundle_catalogue`).

    bundle/
      bundle.json         format version, system, dataset hash, vision config, counts
      align/              AlignmentModel.save
      scorer/             Scorer.save (a two-tower system)
      index/              AdIndex.save over the catalogue's ad embeddings
      catalogue.parquet   ad_id, title, words, scores (the ads the index holds, in index order),
                          image_hash, word_boxes (format 2)
      word_vectors.npz    query-tower vectors of the catalogue's visual words ("matched words")

It is what the MLflow pyfunc ships, and what promotion re-evaluates on the current test split:
ads it has never seen are translated into visual words by the bundled alignment model.

The bundle's ads are version 0 of the model's catalogue (`bundle_catalogue`), so format 2
stores what a catalogue version of format 2 stores for the search page, computed once here:
each ad's `image_hash` and, for its first `words_shown` words (the alignment's setting, also
in bundle.json), `word_boxes` (`components.search.catalogue`). A format-1 bundle still loads:
its ads have no regions, and their images are hashed by the engine that serves them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from components.data.format import ADS_FILE, read_dataset
from components.match.data import QuerySide, match_data
from components.retrieve.compressed import second_moments
from components.retrieve.config import IndexConfig
from components.retrieve.index import AdIndex
from components.search.catalogue import (
    IMAGE_HASH,
    WORD_BOXES,
    Catalogue,
    image_hash,
    read_word_vectors,
    word_boxes_of,
    write_word_vectors,
)
from components.systems import TWO_TOWER_SYSTEMS
from components.vision.config import PartsConfig

if TYPE_CHECKING:
    from components.match.scorers import TwoTowerScorer
    from components.vision.parts import PartsFeatures

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # 1: before image_hash, word_boxes and words_shown
META_FILE = "bundle.json"
ALIGN_DIR = "align"
SCORER_DIR = "scorer"
INDEX_DIR = "index"
CATALOGUE_FILE = "catalogue.parquet"
WORD_VECTORS_FILE = "word_vectors.npz"

Words = list[tuple[str, float]]


def is_bundle(directory: Path) -> bool:
    """True when `directory` holds a complete bundle (its meta file is written last)."""
    return (Path(directory) / META_FILE).is_file()


def read_meta(bundle_dir: Path) -> dict:
    """The bundle's `bundle.json`, checked: a missing file or a format this code cannot read raises."""
    meta_path = Path(bundle_dir) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: not found; {bundle_dir} is not a search bundle")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") not in READABLE_FORMATS:
        raise ValueError(f"{meta_path}: bundle format {meta.get('format_version')!r}, expected one of "
                         f"{READABLE_FORMATS}")
    return meta


def two_tower(scorer, where: Path) -> TwoTowerScorer:
    """`scorer` if it can serve retrieval (one inner product over a faiss index), else a clear error."""
    if not hasattr(scorer, "encode_ads"):
        raise ValueError(f"{where}: system {scorer.system!r} cannot serve retrieval; a search bundle needs a "
                         f"two-tower system ({', '.join(TWO_TOWER_SYSTEMS)})")
    return scorer


def _query_moments(scorer: TwoTowerScorer, queries: pd.DataFrame) -> np.ndarray:
    """E[q q^T] of the training queries' vectors (all queries when the set has no training ones):
    what a compressed (pq) index of this model's catalogue whitens by, kept with every index."""
    chosen = queries[queries["split"] == "train"] if (queries["split"] == "train").any() else queries
    chosen = chosen.drop_duplicates("text")
    ids, texts = chosen["query_id"].astype(str).tolist(), chosen["text"].astype(str).tolist()
    return second_moments(scorer.encode_queries(QuerySide(ids, texts)))


def _search_page_annotations(alignment, dataset, ad_words: list[Words],
                             features: PartsFeatures | None) -> tuple[list[str], list[list[list[float]]]]:
    """Each ad's `image_hash` (its image file in `dataset`) and `word_boxes` (one box per word of
    its first `alignment.words_shown` words; all `[]` without `features`), in `dataset.ads` order."""
    hashes = [image_hash(dataset.image_file(path)) for path in dataset.ads["image_path"]]
    shown = [[w for w, _ in ws[:alignment.words_shown]] for ws in ad_words]
    if features is None:
        return hashes, [[[] for _ in ws] for ws in shown]
    return hashes, word_boxes_of(alignment, features, shown)


def build_bundle(out_dir: Path, *, align_dir: Path, scorer_dir: Path, dataset_dir: Path, words: dict[str, Words],
                 vision: PartsConfig, index_cfg: IndexConfig, dataset_hash: str,
                 features: PartsFeatures | None = None, word_logits=None) -> Path:
    """Assemble a bundle from trained stage outputs; the catalogue is every ad of the dataset.

    `words`, `word_logits`: visual words and per-word logits per ad (from the align stage;
    the logits feed ours' word channel); `features`: the dataset's parts in ad order (the
    features stage's output): systems with an image head encode the ads from them, and every
    system's ads get the image region of each shown word from them (`word_boxes`). Without
    `features` a system with an image head cannot be bundled, and the others store no regions
    (image hashes and `words_shown` still).
    """
    # torch-bound: kept off the search path
    from components.align.model import AlignmentModel
    from components.match.scorers import load_scorer

    started = time.perf_counter()
    dataset = read_dataset(dataset_dir)
    if features is not None and len(features) != len(dataset.ads):
        raise ValueError(f"features for {len(features)} images, but {dataset_dir / ADS_FILE} has "
                         f"{len(dataset.ads)} ads: the features must be the dataset's parts in ad order")
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    shutil.copytree(align_dir, out_dir / ALIGN_DIR)
    shutil.copytree(scorer_dir, out_dir / SCORER_DIR)
    scorer = two_tower(load_scorer(out_dir / SCORER_DIR), scorer_dir)
    needs_images = scorer.net.image_head is not None
    ads = match_data(dataset, words=words, features=features if needs_images else None,
                     word_logits=word_logits).ads
    index = AdIndex.build(ads.ad_ids, scorer.encode_ads(ads), index_cfg,
                          query_moments=_query_moments(scorer, dataset.queries))
    index.save(out_dir / INDEX_DIR)
    ad_words = ads.words or [[] for _ in ads.ad_ids]
    annotating = time.perf_counter()
    alignment = AlignmentModel.load(out_dir / ALIGN_DIR)
    hashes, boxes = _search_page_annotations(alignment, dataset, ad_words, features)
    annotate_seconds = time.perf_counter() - annotating
    pd.DataFrame({"ad_id": ads.ad_ids, "title": ads.titles,
                  "words": [[w for w, _ in ws] for ws in ad_words],
                  "scores": [[float(s) for _, s in ws] for ws in ad_words],
                  IMAGE_HASH: hashes, WORD_BOXES: boxes}).to_parquet(out_dir / CATALOGUE_FILE, index=False)
    vocabulary = sorted({w for ws in ad_words for w, _ in ws})
    vectors = scorer.encode_queries(QuerySide(vocabulary, vocabulary)) if vocabulary else []
    write_word_vectors(out_dir / WORD_VECTORS_FILE, dict(zip(vocabulary, vectors, strict=True)), index.dim)
    meta = {"format_version": FORMAT_VERSION, "system": scorer.system, "dataset_hash": dataset_hash,
            "num_ads": len(ads), "vision": vision.model_dump(mode="json"), "index_kind": index.kind,
            "words_per_ad": scorer.words_per_ad, "words_shown": alignment.words_shown,
            "word_regions": features is not None, "annotate_seconds": round(annotate_seconds, 2),
            "built_seconds": round(time.perf_counter() - started, 2)}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("bundle %s: %s over %d ads (%s index); hashes%s in %.1f s", out_dir, scorer.system, len(ads),
             index.kind, " and word regions" if features is not None else " (no features: no word regions)",
             annotate_seconds)
    return out_dir


def _image_refs(dataset_dir: Path, ad_ids: list[str], image_paths: list) -> dict[str, str]:
    """`file:<absolute path>` of each ad's image, for the paths that name a file inside the
    dataset directory (a table read at serve time: an absolute path, one leading out, or no
    path gives the ad no image). Whether the file is really there, and reached through no
    symlink, is checked when it is served (`catalogue.images.resolve_image`)."""
    root = Path(os.path.realpath(dataset_dir))
    refs, refused = {}, 0
    for ad_id, path in zip(ad_ids, image_paths, strict=True):
        normalised = os.path.normpath(path) if isinstance(path, str) and path else ""
        if not normalised or os.path.isabs(normalised) or normalised.split(os.sep)[0] in ("..", "."):
            refused += bool(normalised)
            continue
        refs[ad_id] = f"file:{root / normalised}"
    if refused:
        log.warning("%s: %d image paths lead out of the dataset directory; those ads have no image", dataset_dir,
                    refused)
    return refs


def bundle_catalogue(bundle_dir: Path, *, model_name: str = "", model_version: str = "",
                     dataset_dir: Path | None = None, index_cfg: IndexConfig | None = None) -> Catalogue:
    """Version 0 of a model version's catalogue: the ads its bundle was built over.

    `dataset_dir`: the training dataset (its images are the ads' images; None or missing:
    the ads have no image to show). `index_cfg`: another index config than the bundle's (the
    index is then rebuilt on first use, keeping the bundle index's query moments)."""
    bundle_dir = Path(bundle_dir)
    index = AdIndex.load(bundle_dir / INDEX_DIR)
    table = pd.read_parquet(bundle_dir / CATALOGUE_FILE)
    order = {a: i for i, a in enumerate(index.ad_ids)}
    table = table.assign(_row=table["ad_id"].astype(str).map(order)).sort_values("_row").drop(columns="_row")
    images: dict[str, str] = {}
    ads_file = None if dataset_dir is None else Path(dataset_dir) / ADS_FILE
    if ads_file is not None and ads_file.is_file():
        if not Path(dataset_dir).is_absolute():
            log.warning("catalogue v0 of %s v%s: training dataset %s is recorded relative to the working "
                        "directory; its images are looked for under %s", model_name, model_version, dataset_dir,
                        Path(dataset_dir).resolve())
        source = pd.read_parquet(ads_file, columns=["ad_id", "image_path"])
        images = _image_refs(Path(dataset_dir), source["ad_id"].astype(str).tolist(), source["image_path"].tolist())
    elif dataset_dir is not None:
        log.warning("catalogue v0 of %s v%s: training dataset %s not found; its ads have no images",
                    model_name, model_version, dataset_dir)
    ads = pd.DataFrame({"ad_id": table["ad_id"].astype(str).tolist(), "title": table["title"].astype(str).tolist(),
                        "words": table["words"].map(list).tolist(), "scores": table["scores"].map(list).tolist()})
    ads["image_ref"] = ads["ad_id"].map(lambda a: images.get(a, ""))
    for column in (IMAGE_HASH, WORD_BOXES):  # format 2; a format-1 bundle has neither (Catalogue fills in none)
        if column in table.columns:
            ads[column] = table[column].tolist()
    # A directory without bundle.json is not a bundle (`read_meta` says so when it is opened as
    # one); its catalogue alone, as tests assemble it, shows the default number of words.
    words_shown = read_meta(bundle_dir).get("words_shown") if is_bundle(bundle_dir) else None
    vectors = read_word_vectors(bundle_dir / WORD_VECTORS_FILE)
    catalogue = Catalogue(ads, index.vectors(), vectors, index_cfg or index.cfg, 0, model_name, str(model_version),
                          words_shown=words_shown)
    if index_cfg is None:
        catalogue._index = index
    else:
        catalogue._previous_index = index
    return catalogue
