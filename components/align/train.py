"""The `align` stage's training: learn which words an ad image shows from ad-level text.

Steps: the vocabulary of the training ads' ad-level texts and its word vectors; a
projection of the instance vectors (pooled vector + parts); visual concepts (k-means of
the parts) and the two co-occurrence structures; the per-word head (head.py) fitted on all
training ads; and, for the matcher, out-of-fold logits of the training ads from k heads
that each did not see them (cross-fitting).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from components.align.concepts import (
    assign,
    concept_bags,
    fit_concepts,
    instance_vectors,
    l2_normalize,
)
from components.align.config import AlignConfig
from components.align.cooccurrence import structure
from components.align.head import (
    Structure,
    cross_fit,
    fit_head,
    fit_projection,
    fold_of,
    predict_logits,
)
from components.align.model import AlignmentModel
from components.align.neighbours import NeighbourMemory, blend_logits, out_of_fold_votes
from components.device import resolve_device
from components.text.encoder import TextEncoder
from components.text.vocabulary import build_vocabulary, content_words
from components.vision.parts import PartsFeatures

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"
OUT_OF_FOLD_FILE = "out_of_fold_logits.npy"


@dataclass
class AlignResult:
    model_dir: Path
    out_of_fold_logits: np.ndarray  # (N, V) training ads' logits from heads that did not see them
    metrics: dict[str, float | int] = field(default_factory=dict)


def word_labels(texts: list[str], index: dict[str, int], min_length: int) -> np.ndarray:
    """(N, V) 1 where word v occurs in text i."""
    labels = np.zeros((len(texts), len(index)), np.float32)
    for i, text in enumerate(texts):
        for w in content_words(text, min_length):
            j = index.get(w)
            if j is not None:
                labels[i, j] = 1.0
    return labels


def train_alignment(cfg: AlignConfig, *, texts: list[str], parts: PartsFeatures,
                    encoder: TextEncoder, out_dir: Path) -> AlignResult:
    """Train the alignment and save an `AlignmentModel` under `out_dir/model`.

    `texts[i]` is the ad-level text of training image `parts[i]` (title, and where allowed
    its training click queries; see `components.align.stage.ad_level_texts`). The only
    cross-modal signal is that image i and text i belong to the same ad: no part or region
    label exists anywhere, so which part shows which word is left to the head.
    """
    with fixed_threads(cfg.num_threads):
        return _train_alignment(cfg, texts=texts, parts=parts, encoder=encoder, out_dir=Path(out_dir))


@contextmanager
def fixed_threads(count: int):
    """Run with `count` CPU threads in every pool the alignment uses: torch's, faiss's OpenMP and
    numpy's BLAS (threadpoolctl). Its parallel reductions (L-BFGS gradients, BLAS) sum in a
    thread-dependent order, so only a fixed count gives the same words on every machine
    (measured: word logits moved by up to 0.49 between 1 and 2 threads). 0 = leave as is."""
    if not count:
        yield
        return
    import faiss
    from threadpoolctl import threadpool_limits

    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(count)
    faiss.omp_set_num_threads(count)
    try:
        with threadpool_limits(limits=count):
            yield
    finally:
        torch.set_num_threads(torch_threads)
        faiss.omp_set_num_threads(faiss_threads)


def _train_alignment(cfg: AlignConfig, *, texts: list[str], parts: PartsFeatures,
                     encoder: TextEncoder, out_dir: Path) -> AlignResult:
    if len(texts) != len(parts):
        raise ValueError(f"{len(texts)} texts for {len(parts)} images: one text per image")
    started = time.perf_counter()
    timings: dict[str, float] = {}
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)

    t = time.perf_counter()
    vocab = build_vocabulary(texts, cfg.vocab_min_count, cfg.vocab_max_words, cfg.vocab_min_length)
    if len(vocab) < 2:
        raise ValueError(f"vocabulary of {len(vocab)} words: lower vocab_min_count")
    words = list(vocab.words)
    word_vectors = encoder.encode(words).astype(np.float32)
    labels = word_labels(texts, vocab.index(), cfg.vocab_min_length)
    timings["seconds_vocabulary"] = time.perf_counter() - t

    t = time.perf_counter()
    vectors, mask = instance_vectors(parts, True)  # (N,I,1280), (N,I); slot 0 pooled
    projection = fit_projection(vectors[mask], cfg.pca_dim)
    z = projection.apply(vectors)
    z[~mask] = 0.0
    region_mask = mask.copy()
    region_mask[:, 0] = False
    unit = l2_normalize(z)
    k = int(max(2, min(cfg.num_concepts, int(region_mask.sum()) // 8)))
    centroids = fit_concepts(unit[region_mask], k, cfg.seed, cfg.kmeans_iters)
    concepts = assign(unit, centroids)
    concepts[~region_mask] = -1
    concept_means = np.stack([z[concepts == c].mean(0) if (concepts == c).any() else centroids[c]
                              for c in range(k)]).astype(np.float32)
    concept_structure, _, _ = structure(concept_bags(concepts, region_mask), k, cfg.ppmi_context_power,
                                        cfg.marginal_power)
    word_bags = [np.flatnonzero(row) for row in labels]
    word_structure, _, _ = structure(word_bags, len(words), cfg.ppmi_context_power, cfg.marginal_power)
    timings["seconds_concepts"] = time.perf_counter() - t

    t = time.perf_counter()
    struct = Structure(concept_means, concept_structure, word_structure) if cfg.structure_weight > 0 else None
    head = fit_head(cfg, z, mask, labels, word_vectors, struct, device).cpu()
    timings["seconds_head"] = time.perf_counter() - t

    t = time.perf_counter()
    if cfg.folds >= 2:
        out_of_fold = cross_fit(cfg, z, mask, labels, word_vectors, cfg.folds, cfg.seed, struct, device)
    else:  # in-sample: what the matcher would see if nothing were held out (an ablation)
        out_of_fold = predict_logits(head, z, mask)
    timings["seconds_cross_fit"] = time.perf_counter() - t

    memory = None
    if cfg.neighbours:
        t = time.perf_counter()
        memory = NeighbourMemory.of(z[:, 0], labels)
        if cfg.folds >= 2:  # the head's folds: an ad's neighbours never include its own fold
            votes = out_of_fold_votes(memory, fold_of(len(z), cfg.folds, cfg.seed), cfg.neighbours,
                                      cfg.neighbour_temperature)
        else:  # in-sample, as the head's logits are: every ad votes for itself too
            votes = memory.votes(memory.vectors, cfg.neighbours, cfg.neighbour_temperature)
        out_of_fold = blend_logits(out_of_fold, votes, cfg.neighbour_weight)
        timings["seconds_neighbours"] = time.perf_counter() - t

    model = AlignmentModel(
        projection=projection, words=words, word_counts=list(vocab.counts), word_vectors=word_vectors,
        head=head, centroids=centroids, concept_means=concept_means, neighbours=memory,
        word_logit_means=out_of_fold.mean(axis=0).astype(np.float32),
        words_per_image=cfg.words_per_image, min_word_score=cfg.min_word_score,
        words_shown=min(cfg.words_shown, cfg.words_per_image), config=cfg.model_dump())
    model_dir = model.save(out_dir / MODEL_SUBDIR)
    np.save(out_dir / OUT_OF_FOLD_FILE, out_of_fold)
    timings["seconds_total"] = time.perf_counter() - started
    metrics: dict[str, float | int] = {
        "num_images": len(parts), "num_words": len(words), "num_concepts": k,
        "num_regions": int(region_mask.sum()), "labels_per_ad": float(labels.sum(1).mean()),
        "folds": cfg.folds, **{k_: round(v, 3) for k_, v in timings.items()},
    }
    log.info("alignment trained: %s", metrics)
    return AlignResult(model_dir=model_dir, out_of_fold_logits=out_of_fold, metrics=metrics)
