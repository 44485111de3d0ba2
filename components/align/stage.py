"""The `align` stage: the alignment trained on the training split's images and ad-level
text, the visual words and per-word logits of every ad (`words.parquet`,
`word_logits.npz`), and an alignment gallery a person can look at.

Training ads get out-of-fold words (from heads that did not see them); every other ad gets
the words of the model trained on all training ads, as a new ad would at serving time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from components.align.config import AlignConfig
from components.align.evaluation import (
    alignment_precision_at_1,
    held_out_words,
    word_precision_report,
)
from components.align.gallery import GalleryItem, GalleryWord, plot_alignment_gallery
from components.align.model import WHOLE_IMAGE, AlignmentModel, VisualWord
from components.align.train import AlignResult, train_alignment
from components.data.format import Dataset, read_dataset
from components.data.splits import training_query_subset
from components.data.truth import TRUTH_FILE, load_synthetic_truth
from components.outputs import write_stable_json
from components.text.encoder import TextEncoder
from components.text.stems import word_stem
from components.vision.parts import PartsFeatures

log = logging.getLogger(__name__)

WORDS_FILE = "words.parquet"
LOGITS_FILE = "word_logits.npz"
GALLERY_FILE = "alignment_gallery.png"
Words = list[tuple[str, float]]


@dataclass
class AlignStageResult:
    model_dir: Path
    words_path: Path
    logits_path: Path
    gallery_path: Path | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class WordLogits:
    """Per-ad logits of every vocabulary word, rows in `ad_ids` order."""

    ad_ids: list[str]
    words: list[str]
    logits: np.ndarray  # (N, V) float32
    means: np.ndarray  # (V,) the mean training logit of each word

    def rows(self, ad_ids: list[str]) -> np.ndarray:
        """(len(ad_ids), V) logits of those ads (a missing ad gets the word means: no evidence)."""
        index = {a: i for i, a in enumerate(self.ad_ids)}
        out = np.tile(self.means, (len(ad_ids), 1)).astype(np.float32)
        for i, ad_id in enumerate(ad_ids):
            j = index.get(ad_id)
            if j is not None:
                out[i] = self.logits[j]
        return out


def training_click_texts(dataset: Dataset, fraction: float = 1.0, seed: int = 0) -> dict[str, list[str]]:
    """Per training ad, the texts of the training queries with a positive qrel for it, within
    the share of training queries a run at `fraction` (and matcher seed `seed`) uses."""
    train = dataset.split("train")
    positives = train.qrels[train.qrels["relevance"] > 0]
    with_positive = set(positives["query_id"].astype(str))
    query_ids = [q for q in train.queries["query_id"].astype(str) if q in with_positive]
    kept = set(training_query_subset(query_ids, fraction, seed)) if query_ids else set()
    positives = positives[positives["query_id"].astype(str).isin(kept)].merge(train.queries, on="query_id")
    return positives.groupby("ad_id")["text"].apply(lambda s: [str(t) for t in s]).to_dict()


def ad_level_texts(dataset: Dataset, *, fraction: float = 1.0, seed: int = 0, click_text: bool = True,
                   title_words: bool = True) -> list[str]:
    """The text that comes with each training ad (docs/method.md#what-the-alignment-may-see), in training-ad order:
    its title, plus with `click_text` the training queries that clicked it (at `fraction`).
    A title-less source (COCO-style) always uses its training captions (its queries). Never
    tags, never validation or test text. With `click_text` and not `title_words` the title is
    left out: the click queries alone say what the ad shows."""
    train = dataset.split("train")
    titles = train.ads["title"].fillna("").astype(str).tolist()
    title_less = train.title_less
    if not (click_text or title_less):
        return titles
    clicks = training_click_texts(dataset, fraction, seed)
    keep_title = title_words or title_less
    return [" ".join([title if keep_title else "", *clicks.get(ad_id, [])]).strip()
            for title, ad_id in zip(titles, train.ads["ad_id"].astype(str), strict=True)]


def dataset_logits(model: AlignmentModel, result: AlignResult, dataset: Dataset,
                   features: PartsFeatures) -> tuple[np.ndarray, np.ndarray]:
    """(N, V) logits of every ad of `dataset` (`features` rows in its ad order): training ads
    out of fold, the others from the full model; and each word's source part."""
    logits, sources = model.logits_and_sources(features)
    train_rows = dataset.ad_rows(dataset.split("train"))
    logits[train_rows] = result.out_of_fold_logits
    return logits, sources


def save_words(ad_ids: list[str], words: list[list[VisualWord]], path: Path) -> Path:
    frame = pd.DataFrame({"ad_id": ad_ids, "words": [[w.word for w in ws] for ws in words],
                          "scores": [[float(w.score) for w in ws] for ws in words],
                          "parts": [[int(w.part) for w in ws] for ws in words]})
    frame.to_parquet(path, index=False)
    return path


def load_words(path: Path) -> dict[str, Words]:
    """ad_id -> [(word, probability), ...], most probable first."""
    frame = pd.read_parquet(path)
    return {str(r.ad_id): list(zip(list(r.words), [float(s) for s in r.scores], strict=True))
            for r in frame.itertuples()}


def load_visual_words(path: Path) -> dict[str, list[VisualWord]]:
    """ad_id -> its `VisualWord`s (with the part each came from)."""
    frame = pd.read_parquet(path)
    return {str(r.ad_id): [VisualWord(str(w), float(s), int(p)) for w, s, p in
                           zip(r.words, r.scores, r.parts, strict=True)] for r in frame.itertuples()}


def save_word_logits(ad_ids: list[str], model: AlignmentModel, logits: np.ndarray, path: Path) -> Path:
    np.savez(path, ad_ids=np.asarray(ad_ids, dtype=str), words=np.asarray(model.words, dtype=str),
             logits=logits.astype(np.float32), means=model.word_logit_means.astype(np.float32))
    return path


def load_word_logits(path: Path) -> WordLogits:
    with np.load(path, allow_pickle=False) as data:
        return WordLogits(ad_ids=[str(a) for a in data["ad_ids"]], words=[str(w) for w in data["words"]],
                          logits=data["logits"], means=data["means"])


def load_ad_words(words_path: Path) -> tuple[dict[str, Words], WordLogits]:
    """What the matcher reads from an align stage's output: words per ad (`words.parquet`)
    and the per-word logits beside it (`word_logits.npz`)."""
    words_path = Path(words_path)
    return load_words(words_path), load_word_logits(words_path.parent / LOGITS_FILE)


def translate_ads(model: AlignmentModel, ad_ids: list[str], features: PartsFeatures
                  ) -> tuple[dict[str, Words], WordLogits]:
    """New ads (never trained on) through the full model: their words and logits."""
    logits, sources = model.logits_and_sources(features)
    words = model.translate_logits(logits, sources)
    by_id = {a: [(w.word, w.score) for w in ws] for a, ws in zip(ad_ids, words, strict=True)}
    return by_id, WordLogits(list(ad_ids), list(model.words), logits, model.word_logit_means)


def held_out_texts(dataset: Dataset, split_name: str) -> dict[str, list[str]]:
    """Per ad of a split, the texts of that split's queries with a positive qrel for it (the
    held-out tags on openclipart): ground truth for word precision, never a model input."""
    split = dataset.split(split_name)
    positives = split.qrels[split.qrels["relevance"] > 0].merge(split.queries, on="query_id")
    return positives.groupby("ad_id")["text"].apply(lambda s: [str(t) for t in s]).to_dict()


def alignment_metrics(model: AlignmentModel, dataset: Dataset, features: PartsFeatures,
                      words_by_id: dict[str, list[VisualWord]], split_name: str) -> dict[str, float]:
    """Alignment quality on held-out data only: the planted truth of a synthetic dataset
    (`alignment_precision@1`), and the precision of one split's visual words against its
    held-out query words, overall, on words not in the title, and against the constant
    list of the most frequent training words (`word_precision_report`)."""

    metrics: dict[str, float] = {}
    if dataset.root is not None and (dataset.root / TRUTH_FILE).is_file():
        ad_ids = dataset.ads["ad_id"].astype(str).tolist()
        precision = alignment_precision_at_1(model, features, load_synthetic_truth(dataset.root), ad_ids)
        metrics["alignment_precision@1"] = float(precision["precision@1"])
    held_out = held_out_texts(dataset, split_name)
    if held_out:
        split_ads = dataset.split(split_name).ads
        titles = dict(zip(split_ads["ad_id"].astype(str), split_ads["title"].fillna("").astype(str), strict=True))
        report = word_precision_report({a: [w.word for w in words_by_id.get(a, [])] for a in held_out},
                                       held_out, titles, model.words, model.words_per_image,
                                       model.words_shown)
        metrics.update({f"visual_word_{k}": v for k, v in report.items()})
    return metrics


def gallery_items(dataset: Dataset, split_name: str, words_by_id: dict[str, list[VisualWord]],
                  features: PartsFeatures, size: int, words_shown: int | None = None) -> list[GalleryItem]:
    """The first `size` ads of a split, each of its first `words_shown` words (all when None)
    with the box of its source part and ✓/✗ against the ad's held-out query words.
    `features` rows follow `dataset`'s ad order."""

    held_out = held_out_texts(dataset, split_name)
    rows = {a: i for i, a in enumerate(dataset.ads["ad_id"].astype(str))}
    items = []
    for ad in dataset.split(split_name).ads.head(size).itertuples():
        held = held_out_words(held_out[ad.ad_id]) if ad.ad_id in held_out else None
        boxes = features.boxes[rows[ad.ad_id]]
        words = [GalleryWord(w.word, w.score,
                             None if w.part == WHOLE_IMAGE else tuple(float(v) for v in boxes[w.part - 1]),
                             None if held is None else word_stem(w.word) in held)
                 for w in words_by_id.get(ad.ad_id, [])[:words_shown]]
        items.append(GalleryItem(dataset.image_file(ad.image_path), str(ad.title), words))
    return items


def run_align(cfg: AlignConfig, *, dataset_dir: Path, features: PartsFeatures, out_dir: Path,
              cache_dir: Path | None = None, gallery_size: int = 12, fraction: float = 1.0,
              query_seed: int = 0, metrics_split: str = "valid") -> AlignStageResult:
    """Train the alignment on the training split (ad-level text at `fraction` of the training
    queries, chosen with the matcher's seed `query_seed`), translate every ad."""
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = read_dataset(dataset_dir)
    train = dataset.split("train")
    encoder = TextEncoder(cache_dir=Path(cache_dir) / "text" if cache_dir else None)
    texts = ad_level_texts(dataset, fraction=fraction, seed=query_seed, click_text=cfg.click_text,
                           title_words=cfg.title_words)
    result = train_alignment(cfg, texts=texts, parts=features.take(dataset.ad_rows(train)),
                             encoder=encoder, out_dir=out_dir)
    model = AlignmentModel.load(result.model_dir)
    ad_ids = dataset.ads["ad_id"].astype(str).tolist()
    logits, sources = dataset_logits(model, result, dataset, features)
    words = model.translate_logits(logits, sources)
    words_path = save_words(ad_ids, words, out_dir / WORDS_FILE)
    logits_path = save_word_logits(ad_ids, model, logits, out_dir / LOGITS_FILE)
    by_id = dict(zip(ad_ids, words, strict=True))
    metrics = {f"align/{k}": v for k, v in result.metrics.items() if isinstance(v, int | float)}
    metrics.update(alignment_metrics(model, dataset, features, by_id, metrics_split))
    gallery_path = None
    if gallery_size:
        items = gallery_items(dataset, "test", by_id, features, gallery_size, model.words_shown)
        gallery_path = plot_alignment_gallery(items, out_dir / GALLERY_FILE)
    metrics["align_stage_seconds"] = round(time.perf_counter() - started, 2)
    write_stable_json(metrics, out_dir / "metrics.json")
    return AlignStageResult(result.model_dir, words_path, logits_path, gallery_path, metrics)
