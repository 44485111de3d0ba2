"""The `align` stage: label-free alignment trained on the training split, then the visual
words of every ad (`words.parquet`) and an alignment gallery a person can look at."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from components.align.config import AlignConfig
from components.align.model import AlignmentModel
from components.align.train import train_alignment
from components.data.format import Dataset, read_dataset
from components.text.encoder import TextEncoder
from components.vision.parts import PartsFeatures

log = logging.getLogger(__name__)

WORDS_FILE = "words.parquet"
GALLERY_FILE = "alignment_gallery.png"
Words = list[tuple[str, float]]


@dataclass
class AlignStageResult:
    model_dir: Path
    words_path: Path
    gallery_path: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


def training_texts(dataset: Dataset) -> list[str]:
    """The text that comes with each training image: its title, or, for a title-less source
    (COCO-style), that image's training captions (METHOD.md §3). Never tags or other splits."""
    train = dataset.split("train")
    titles = train.ads["title"].fillna("").astype(str).tolist()
    if any(t.strip() for t in titles):
        return titles
    positives = train.qrels[train.qrels["relevance"] > 0].merge(train.queries, on="query_id")
    captions = positives.groupby("ad_id")["text"].apply(lambda s: " ".join(s.astype(str)))
    return [captions.get(ad_id, "") for ad_id in train.ads["ad_id"]]


def save_words(ad_ids: list[str], words: list[Words], path: Path) -> Path:
    frame = pd.DataFrame({"ad_id": ad_ids, "words": [[w for w, _ in ws] for ws in words],
                          "scores": [[float(s) for _, s in ws] for ws in words]})
    frame.to_parquet(path, index=False)
    return path


def load_words(path: Path) -> dict[str, Words]:
    frame = pd.read_parquet(path)
    return {str(r.ad_id): list(zip(list(r.words), [float(s) for s in r.scores], strict=True))
            for r in frame.itertuples()}


def alignment_metrics(model: AlignmentModel, dataset: Dataset, features: PartsFeatures,
                      words_by_id: dict[str, Words], split_name: str) -> dict[str, float]:
    """Label-free alignment quality, measured on held-out data only: the planted truth of a
    synthetic dataset (`alignment_precision@1`), and the precision of one split's visual words
    against the words of that split's queries (`visual_word_precision`)."""
    from components.align.evaluation import alignment_precision_at_1, visual_word_precision
    from components.data.synthetic import TRUTH_FILE, load_synthetic_truth

    metrics: dict[str, float] = {}
    if dataset.root is not None and (dataset.root / TRUTH_FILE).is_file():
        ad_ids = dataset.ads["ad_id"].astype(str).tolist()
        precision = alignment_precision_at_1(model, features, load_synthetic_truth(dataset.root), ad_ids)
        metrics["alignment_precision@1"] = float(precision["precision@1"])
    split = dataset.split(split_name)
    positives = split.qrels[split.qrels["relevance"] > 0].merge(split.queries, on="query_id")
    held_out = positives.groupby("ad_id")["text"].apply(list).to_dict()
    if held_out:
        precision = visual_word_precision({a: [w for w, _ in words_by_id[a]] for a in held_out}, held_out)
        metrics["visual_word_precision"] = float(precision["precision"])
    return metrics


def run_align(cfg: AlignConfig, *, dataset_dir: Path, features: PartsFeatures, out_dir: Path,
              cache_dir: Path | None = None, gallery_size: int = 12, logger=None) -> AlignStageResult:
    """Train the alignment on the training split's images and texts, translate every ad."""
    from components.evaluate.plots import plot_alignment_gallery

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = read_dataset(dataset_dir)
    train = dataset.split("train")
    encoder = TextEncoder(cache_dir=Path(cache_dir) / "text" if cache_dir else None)
    result = train_alignment(cfg, texts=training_texts(dataset), parts=features.take(dataset.ad_rows(train)),
                             encoder=encoder, out_dir=out_dir, logger=logger)
    model = AlignmentModel.load(result.model_dir)
    ad_ids = dataset.ads["ad_id"].astype(str).tolist()
    words = model.translate(features)
    words_path = save_words(ad_ids, words, out_dir / WORDS_FILE)
    by_id = dict(zip(ad_ids, words, strict=True))
    metrics = {f"align/{k}": v for k, v in result.metrics.items() if isinstance(v, int | float)}
    metrics.update(alignment_metrics(model, dataset, features, by_id, "valid"))
    gallery_path = None
    if gallery_size:
        test_ads = dataset.split("test").ads.head(gallery_size)
        items = [(dataset.image_file(r.image_path), str(r.title), by_id[r.ad_id]) for r in test_ads.itertuples()]
        gallery_path = plot_alignment_gallery(items, out_dir / GALLERY_FILE)
    metrics["align_stage_seconds"] = round(time.perf_counter() - started, 2)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return AlignStageResult(result.model_dir, words_path, gallery_path, metrics)
