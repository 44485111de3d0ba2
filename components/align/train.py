"""The `align` stage: learn part -> word alignment from training images and their texts.

Stages (METHOD.md section 8): visual concepts and the two co-occurrence structures;
a Gromov-Wasserstein coupling of the structures (no pairs); the alignment network trained
with the structure losses and, behind a flag, the weak multiple-instance ad loss;
optional CSLS self-training rounds; CSLS hubness statistics; save.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ot
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from components.align.concepts import (
    Whitening,
    assign,
    concept_bags,
    fit_concepts,
    fit_whitening,
    instance_vectors,
)
from components.align.config import AlignConfig
from components.align.cooccurrence import structure
from components.align.model import AlignmentModel, csls_scores
from components.align.module import AlignmentModule
from components.lightning_logs import quiet_lightning
from components.text.encoder import TextEncoder
from components.text.vocabulary import build_vocabulary, content_words
from components.vision.parts import PartsFeatures

log = logging.getLogger(__name__)

MODEL_SUBDIR = "model"


@dataclass
class AlignResult:
    model_dir: Path
    metrics: dict[str, float | int] = field(default_factory=dict)


# --------------------------------------------------------------------------- GW


def gw_cost(c1: np.ndarray, c2: np.ndarray, p: np.ndarray, q: np.ndarray, plan: np.ndarray) -> float:
    """Square-loss Gromov-Wasserstein objective of a coupling `plan` (K, V)."""
    const, h1, h2 = ot.gromov.init_matrix(c1, c2, p, q, "square_loss")
    return float(ot.gromov.gwloss(const, h1, h2, plan))


def random_coupling(p: np.ndarray, q: np.ndarray, rng: np.random.Generator,
                    iters: int = 200) -> np.ndarray:
    """A random coupling with marginals p, q: a random positive matrix, Sinkhorn-scaled."""
    plan = rng.random((len(p), len(q))) ** 4 + 1e-9
    for _ in range(iters):
        plan *= (p / plan.sum(1))[:, None]
        plan *= (q / plan.sum(0))[None, :]
    return plan


def gromov_wasserstein(c1: np.ndarray, c2: np.ndarray, p: np.ndarray, q: np.ndarray,
                       cfg: AlignConfig) -> tuple[np.ndarray, dict[str, float]]:
    """The lowest-cost coupling over `cfg.gw_restarts` initialisations (the first is p q^T,
    the others random couplings), and its cost next to a random and the independent
    coupling's (the structure carries signal when the GW cost is clearly lower)."""
    rng = np.random.default_rng(cfg.seed)
    best_plan, best_cost, costs = None, np.inf, []
    for restart in range(cfg.gw_restarts):
        g0 = np.outer(p, q) if restart == 0 else random_coupling(p, q, rng)
        if cfg.gw_solver == "entropic":
            plan = ot.gromov.entropic_gromov_wasserstein(
                c1, c2, p, q, "square_loss", epsilon=cfg.gw_epsilon, G0=g0,
                max_iter=cfg.gw_max_iter)
        else:
            plan = ot.gromov.gromov_wasserstein(c1, c2, p, q, "square_loss", G0=g0,
                                                max_iter=cfg.gw_max_iter)
        plan = np.nan_to_num(np.asarray(plan, dtype=np.float64))
        cost = gw_cost(c1, c2, p, q, plan)
        costs.append(cost)
        if cost < best_cost:
            best_plan, best_cost = plan, cost
    random_costs = [gw_cost(c1, c2, p, q, random_coupling(p, q, rng)) for _ in range(3)]
    info = {"gw_cost": best_cost, "gw_cost_restart_std": float(np.std(costs)),
            "gw_cost_random": float(np.mean(random_costs)),
            "gw_cost_independent": gw_cost(c1, c2, p, q, np.outer(p, q))}
    return best_plan, info


# --------------------------------------------------------------------------- stage


def _title_words(texts: list[str], index: dict[str, int], min_length: int) -> np.ndarray:
    """(N, L) vocabulary indices of each text's distinct content words, -1 padded."""
    rows = []
    for text in texts:
        seen: list[int] = []
        for w in content_words(text, min_length):
            j = index.get(w)
            if j is not None and j not in seen:
                seen.append(j)
        rows.append(seen)
    width = max(1, max((len(r) for r in rows), default=1))
    out = np.full((len(rows), width), -1, np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def _trainer(cfg: AlignConfig, epochs: int, logger, callbacks, validate: bool) -> pl.Trainer:
    quiet_lightning()
    if cfg.device == "auto":
        accelerator, devices = "auto", 1
    elif cfg.device.startswith("cuda"):
        accelerator = "gpu"
        devices = [int(cfg.device.split(":")[1])] if ":" in cfg.device else 1
    else:
        accelerator, devices = "cpu", 1
    return pl.Trainer(
        max_epochs=epochs, max_steps=cfg.max_steps, accelerator=accelerator, devices=devices,
        logger=logger if logger is not None else False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        log_every_n_steps=cfg.log_every_n_steps, deterministic=True, callbacks=callbacks,
        val_check_interval=cfg.val_check_steps if validate else None,
        check_val_every_n_epoch=None if validate else 1)


def _fit(module: AlignmentModule, cfg: AlignConfig, epochs: int, train_loader, val_loader,
         logger) -> None:
    callbacks = []
    if val_loader is not None:
        callbacks.append(pl.callbacks.EarlyStopping(monitor="val/loss", patience=cfg.patience,
                                                    mode="min"))
    module.best_score, module.best_state = float("inf"), None
    trainer = _trainer(cfg, epochs, logger, callbacks, validate=val_loader is not None)
    trainer.fit(module, train_loader, val_loader)
    if module.best_state is not None:  # early stopping: keep the best held-out epoch
        module.net.load_state_dict(module.best_state)


def _mutual_nn_dictionary(mapped_concepts: np.ndarray, model: AlignmentModel) -> tuple[np.ndarray, float]:
    """Concept -> word pairs that are mutual nearest neighbours under CSLS, and their mean
    CSLS (the label-free stopping criterion of MUSE)."""
    scores = csls_scores(mapped_concepts, model.word_vectors, model.word_hubness, model.csls_k)
    best_word = scores.argmax(axis=1)
    best_concept = scores.argmax(axis=0)
    dictionary = np.full(len(mapped_concepts), -1, np.int64)
    for c, w in enumerate(best_word):
        if best_concept[w] == c:
            dictionary[c] = w
    keep = dictionary >= 0
    mean = float(scores[keep, dictionary[keep]].mean()) if keep.any() else -np.inf
    return dictionary, mean


@dataclass
class AlignInputs:
    """Everything the network trains against, computed from training images and texts."""

    words: list[str]
    word_counts: list[int]
    word_vectors: np.ndarray  # (V, 384)
    titles: np.ndarray  # (N, L) vocabulary indices per text, -1 padded
    whitening: Whitening
    z: np.ndarray  # (N, I, d) whitened instances (slot 0 pooled when pooled_as_part)
    mask: np.ndarray  # (N, I)
    region_mask: np.ndarray  # (N, I) valid regions (mask without the pooled slot)
    centroids: np.ndarray  # (K, d)
    concepts: np.ndarray  # (N, I) concept per region, -1 elsewhere
    concept_structure: np.ndarray  # (K, K)
    word_structure: np.ndarray  # (V, V)
    concept_mass: np.ndarray  # (K,)
    word_mass: np.ndarray  # (V,)
    word_frequency: np.ndarray  # (V,) document frequency, normalised
    timings: dict[str, float] = field(default_factory=dict)


def prepare_inputs(cfg: AlignConfig, *, texts: list[str], parts: PartsFeatures,
                   encoder: TextEncoder) -> AlignInputs:
    """Vocabulary, word vectors, whitening, concepts and the two structures (no pairing)."""
    if len(texts) != len(parts):
        raise ValueError(f"{len(texts)} texts for {len(parts)} images: one text per image")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    vocab = build_vocabulary(texts, cfg.vocab_min_count, cfg.vocab_max_words, cfg.vocab_min_length)
    if len(vocab) < 2:
        raise ValueError(f"vocabulary of {len(vocab)} words: lower vocab_min_count")
    words = list(vocab.words)
    word_vectors = encoder.encode(words).astype(np.float32)
    titles = _title_words(texts, vocab.index(), cfg.vocab_min_length)
    timings["seconds_vocabulary"] = time.perf_counter() - t

    t = time.perf_counter()
    vectors, mask = instance_vectors(parts, cfg.pooled_as_part)  # (N,I,1280), (N,I)
    region_slots = np.ones(mask.shape[1], bool)
    region_slots[0] = not cfg.pooled_as_part
    region_mask = mask & region_slots[None, :]
    whitening = fit_whitening(vectors[region_mask], cfg.pca_dim, cfg.whiten_power)
    z = whitening.apply(vectors)  # (N,I,d)
    z[~mask] = 0.0
    k = int(max(2, min(cfg.num_concepts, int(region_mask.sum()) // 8)))
    centroids = fit_concepts(z[region_mask], k, cfg.seed, cfg.kmeans_iters)
    concepts = assign(z, centroids)  # (N,I)
    concepts[~region_mask] = -1  # the pooled slot has no concept
    timings["seconds_concepts"] = time.perf_counter() - t

    t = time.perf_counter()
    bags = concept_bags(concepts, region_mask)
    concept_structure, _, concept_mass = structure(bags, len(centroids), cfg.ppmi_context_power,
                                                   cfg.marginal_power)
    word_bags = [row[row >= 0] for row in titles]
    word_structure, _, word_mass = structure(word_bags, len(words), cfg.ppmi_context_power,
                                             cfg.marginal_power)
    word_frequency = np.asarray(vocab.counts, np.float64)
    timings["seconds_structures"] = time.perf_counter() - t
    return AlignInputs(
        words=words, word_counts=list(vocab.counts), word_vectors=word_vectors, titles=titles,
        whitening=whitening, z=z, mask=mask, region_mask=region_mask, centroids=centroids,
        concepts=concepts, concept_structure=concept_structure, word_structure=word_structure,
        concept_mass=concept_mass, word_mass=word_mass,
        word_frequency=word_frequency / word_frequency.sum(), timings=timings)


def train_alignment(cfg: AlignConfig, *, texts: list[str], parts: PartsFeatures,
                    encoder: TextEncoder, out_dir: Path, logger=None) -> AlignResult:
    """Train the part -> word alignment and save an `AlignmentModel` under `out_dir/model`.

    `texts[i]` is the training text of image `parts[i]` (the ad title; for title-less
    sources the caller passes that image's training captions joined). Both must come from
    the TRAINING split only. This function never sees tags, qrels, queries, or validation /
    test data: the only cross-modal signal is that image i and text i belong to the same
    ad, and with `mil_loss=False` not even that (the texts then only shape the language
    co-occurrence structure). Early stopping holds out a fraction of these same training
    ads. `logger` is an optional Lightning logger (e.g. MLFlowLogger).
    """
    previous_threads = torch.get_num_threads()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    try:
        return _train_alignment(cfg, texts=texts, parts=parts, encoder=encoder, out_dir=out_dir,
                                logger=logger)
    finally:
        torch.set_num_threads(previous_threads)


def _train_alignment(cfg: AlignConfig, *, texts: list[str], parts: PartsFeatures,
                     encoder: TextEncoder, out_dir: Path, logger) -> AlignResult:
    started = time.perf_counter()
    out_dir = Path(out_dir)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    inputs = prepare_inputs(cfg, texts=texts, parts=parts, encoder=encoder)
    timings = dict(inputs.timings)
    k, words = len(inputs.centroids), inputs.words
    num_regions = int(inputs.region_mask.sum())

    # Stage 1: Gromov-Wasserstein coupling of the two structures (no pairs).
    t = time.perf_counter()
    gw_info: dict[str, float] = {}
    targets = np.zeros((k, len(words)), np.float32)
    if cfg.structure_loss:  # the coupling is also a diagnostic: its cost vs a random one
        plan, gw_info = gromov_wasserstein(inputs.concept_structure, inputs.word_structure,
                                           inputs.concept_mass, inputs.word_mass, cfg)
        if cfg.gw_target_weight > 0:
            targets = (plan / np.maximum(plan.sum(axis=1, keepdims=True), 1e-30)).astype(np.float32)
    timings["seconds_gw"] = time.perf_counter() - t

    # Stage 2: the network, with early stopping on held-out training ads.
    t = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(parts))
    num_val = int(round(cfg.holdout_fraction * len(parts))) if cfg.mil_loss else 0
    val_idx, train_idx = np.sort(order[:num_val]), np.sort(order[num_val:])
    tensors = (torch.from_numpy(inputs.z), torch.from_numpy(inputs.mask),
               torch.from_numpy(inputs.concepts), torch.from_numpy(inputs.titles))

    def loader(index: np.ndarray, shuffle: bool) -> DataLoader:
        data = TensorDataset(*(x[torch.from_numpy(index)] for x in tensors))
        gen = torch.Generator().manual_seed(cfg.seed)
        return DataLoader(data, batch_size=min(cfg.batch_size, len(index)), shuffle=shuffle,
                          generator=gen, drop_last=shuffle and len(index) > cfg.batch_size)

    train_loader = loader(train_idx, shuffle=True)
    val_loader = loader(val_idx, shuffle=False) if num_val > 0 else None
    module = AlignmentModule(cfg.model_dump(), in_dim=inputs.whitening.dim, num_concepts=k,
                             num_words=len(words), word_dim=inputs.word_vectors.shape[1])
    module.set_arrays(word_vectors=inputs.word_vectors, centroids=inputs.centroids,
                      concept_structure=inputs.concept_structure,
                      word_structure=inputs.word_structure, concept_mass=inputs.concept_mass,
                      word_frequency=inputs.word_frequency, targets=targets)
    _fit(module, cfg, cfg.epochs, train_loader, val_loader, logger)
    module.cpu().eval()

    model = AlignmentModel(
        whitening=inputs.whitening, centroids=inputs.centroids, words=words,
        word_counts=inputs.word_counts, word_vectors=inputs.word_vectors, network=module.net,
        words_per_image=cfg.words_per_image, min_word_score=cfg.min_word_score,
        csls_k=cfg.csls_k, word_scoring=cfg.word_scoring, pooled_as_part=cfg.pooled_as_part,
        config=cfg.model_dump())
    reference = model.map(inputs.z[inputs.mask])  # every training instance, mapped
    model.fit_hubness(reference)

    # Stage 3 (optional): self-training on CSLS mutual nearest neighbours (MUSE); a round is
    # kept only if the mean CSLS of the dictionary rises (a label-free criterion).
    refine_history: list[float] = []
    best_mean = _mutual_nn_dictionary(model.concept_vectors(), model)[1]
    for _ in range(cfg.refinement_rounds):
        dictionary, _ = _mutual_nn_dictionary(model.concept_vectors(), model)
        before = copy.deepcopy(module.net.state_dict())
        module.set_arrays(dictionary=dictionary)
        _fit(module, cfg, cfg.refinement_epochs, train_loader, val_loader, logger)
        module.cpu().eval()
        model.fit_hubness(model.map(inputs.z[inputs.mask]))
        mean_csls = _mutual_nn_dictionary(model.concept_vectors(), model)[1]
        refine_history.append(mean_csls)
        if mean_csls <= best_mean:
            module.net.load_state_dict(before)
            model.fit_hubness(model.map(inputs.z[inputs.mask]))
            break
        best_mean = mean_csls
    timings["seconds_network"] = time.perf_counter() - t

    model_dir = model.save(out_dir / MODEL_SUBDIR)
    final: dict[str, float] = {}
    if module._trainer is not None:  # final losses, epoch means
        for key, value in module._trainer.callback_metrics.items():
            if key.endswith("_epoch") or key.startswith("val/"):
                final[key.removesuffix("_epoch")] = float(value)
    timings["seconds_total"] = time.perf_counter() - started
    metrics: dict[str, float | int] = {
        "num_images": len(parts), "num_words": len(words), "num_concepts": k,
        "num_regions": num_regions, "num_holdout_ads": num_val,
        "epochs_run": int(module.current_epoch) if module._trainer is not None else 0,
        "best_step": int(module.best_step),
        **gw_info, **{f"final_{k_}": v for k_, v in final.items()},
        **{k_: round(v, 3) for k_, v in timings.items()},
    }
    if np.isfinite(module.best_score):
        metrics["best_val_loss"] = float(module.best_score)
    if refine_history:
        metrics["refine_mean_csls"] = refine_history[-1]
        metrics["refine_rounds_run"] = len(refine_history)
    log.info("alignment trained: %s", metrics)
    return AlignResult(model_dir=model_dir, metrics=metrics)
