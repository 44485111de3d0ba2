"""Training the matching systems: `train_system(name, cfg, train, valid, out_dir)` returns a
fitted `Scorer` (`components.match.scorers`, which also loads saved ones).

- lexical: BM25 over titles.                 - text_zero_shot: MiniLM query vs title.
- text_only: the matcher trained on titles.  - ours: trained on title [SEP] aligned words.
- implicit_fusion: title tower + image head, trained end to end (same loss, budget, LR search).
- implicit_fusion_words: implicit_fusion whose ad text also carries the aligned words.
- late_fusion: z(trained text_only) + w * z(term probe on the pooled image vector).

The trained systems share `MatchConfig`: budget, LR grid (`select_learning_rate`), head-LR
rule, batch size, loss, checkpoint selection on the valid split.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from components.match.config import MatchConfig
from components.match.data import MatchData, training_pairs
from components.match.module import MatchBatches, MatcherModule, fit_matcher
from components.match.probe import TermProbe, fit_logistic, term_labels, zscore_rows
from components.match.scorers import (
    WEIGHTS_FILE,
    LateFusionScorer,
    LexicalScorer,
    Scorer,
    TwoTowerScorer,
    load_scorer,
)
from components.match.words import WordChannel, covariance
from components.metrics import ScoreMatrix, qrels_from_frame, ranking_metrics
from components.systems import IMAGE_SYSTEMS, SYSTEMS, TRAINED_SYSTEMS, WORD_SYSTEMS

log = logging.getLogger(__name__)


def _ndcg_at_10(query_ids: list[str], ad_ids: list[str], scores: np.ndarray, qrels: dict) -> float:
    if not qrels:
        return float("nan")
    matrix = ScoreMatrix(query_ids, ad_ids, scores)
    return ranking_metrics(qrels, matrix.top_k_run(100, sorted(qrels)), ["ndcg@10"])["ndcg@10"]


# --------------------------------------------------------------------------- training


def _check_name(name: str) -> None:
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; expected one of {SYSTEMS}")


def _lr_dir(out_dir: Path, lr: float) -> Path:
    return Path(out_dir) / f"lr-{lr:g}"


def _train_matcher(name: str, cfg: MatchConfig, lr: float, train: MatchData, valid: MatchData,
                   run_dir: Path, logger=None) -> TwoTowerScorer:
    """One fine-tune of a trained system at one learning rate (best valid checkpoint kept)."""
    use_words, use_images = name in WORD_SYSTEMS, name in IMAGE_SYSTEMS
    if use_words and train.ads.words is None:
        log.warning("%s without aligned words: the ad text is the title alone", name)
    use_channel = name == "ours" and cfg.word_channel and cfg.word_channel_joint and train.ads.evidence is not None
    if name == "ours" and cfg.word_channel and train.ads.evidence is None:
        log.warning("ours without word evidence: no word channel")
    pairs = training_pairs(train, cfg.train_fraction, cfg.seed)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the head's initialisation too
    image_dim = train.ads.pooled.shape[1] if use_images and train.ads.pooled is not None else 1280
    hparams = dict(lr=lr, head_lr_multiplier=cfg.head_lr_multiplier, weight_decay=cfg.weight_decay,
                   warmup_steps=int(cfg.warmup_fraction * cfg.max_steps), max_steps=cfg.max_steps,
                   temperature=cfg.temperature, symmetric_loss=cfg.symmetric_loss,
                   trainable_layers=cfg.trainable_layers, max_query_len=cfg.max_query_len,
                   max_ad_len=cfg.max_ad_len, image_head=use_images, image_dim=image_dim, fusion=cfg.fusion,
                   fusion_query=cfg.fusion_query, fusion_dropout=cfg.fusion_dropout,
                   fusion_hidden=cfg.fusion_hidden,
                   word_vocabulary=list(train.ads.evidence_words) if use_channel else None,
                   word_channel_init=cfg.word_channel_init, word_channel_lr=cfg.word_channel_lr)
    module = MatcherModule(**hparams)
    if use_images:
        if not (train.ads.has_images and valid.ads.has_images):
            raise ValueError("implicit_fusion needs image features for the train and valid ads")
        module.net.image_head.fit_statistics(train.ads.pooled, train.ads.parts, train.ads.parts_mask)
    text_options = dict(min_score=cfg.word_min_score, skip_title_words=cfg.words_skip_title)
    batches = MatchBatches(train, pairs, train.ads.texts(use_words, cfg.words_per_ad, **text_options), valid,
                           valid.ads.texts(use_words, cfg.words_per_ad, **text_options), batch_size=cfg.batch_size,
                           seed=cfg.seed, use_images=use_images, use_evidence=use_channel,
                           word_dropout=cfg.word_dropout if use_words else 0.0)
    result = fit_matcher(module, batches, max_steps=cfg.max_steps, eval_every=cfg.eval_every, seed=cfg.seed,
                         out_dir=run_dir, patience=cfg.patience, device=cfg.device, logger=logger,
                         accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
                         num_nodes=cfg.num_nodes)
    head_config = None
    if use_images:
        head_config = dict(image_dim=image_dim, hidden=cfg.fusion_hidden, fusion=cfg.fusion,
                           query=cfg.fusion_query, dropout=cfg.fusion_dropout)
    info = {"lr": lr, "val_ndcg@10": result.best_score, "best_step": result.best_step, "steps": result.steps,
            "train_seconds": round(result.seconds, 2), "num_pairs": int(len(pairs)),
            "num_train_queries": int(len(np.unique(pairs[:, 0]))), "val_history": result.history,
            "seed": cfg.seed, "train_fraction": cfg.train_fraction}
    log.info("%s lr=%g: best val/ndcg@10 %.4f at step %d of %d (%.1f s, %d pairs)", name, lr,
             result.best_score, result.best_step, result.steps, result.seconds, len(pairs))
    if use_channel:
        info["word_channel_weight"] = float(module.net.word_channel.scale().detach())
    scorer = TwoTowerScorer(name, module.net, use_words=use_words, words_per_ad=cfg.words_per_ad,
                            word_min_score=cfg.word_min_score, words_skip_title=cfg.words_skip_title, trained=True,
                            head_config=head_config, device=cfg.device, info=info)
    scorer.save(Path(run_dir) / "scorer")
    return scorer


def select_learning_rate(name: str, cfg: MatchConfig, train: MatchData, valid: MatchData, out_dir: Path,
                         logger=None) -> tuple[float, dict[float, float]]:
    """Train `name` at every lr of `cfg.lr_grid` (same budget each) and pick the best
    val/ndcg@10 (ties: the earlier grid entry). Each run is kept in `out_dir/lr-<lr>/`;
    the losers' weights are deleted (their scorer.json keeps the numbers)."""
    _check_name(name)
    if name not in TRAINED_SYSTEMS:
        raise ValueError(f"{name} is not trained; learning-rate search applies to {TRAINED_SYSTEMS}")
    values: dict[float, float] = {}
    for lr in cfg.lr_grid:
        # One curve per rate when the logger can branch (components.registry.lightning.RunLogger).
        run_logger = logger.child(f"lr{lr:g}") if hasattr(logger, "child") else logger
        scorer = _train_matcher(name, cfg, lr, train, valid, _lr_dir(out_dir, lr), run_logger)
        values[lr] = scorer.info["val_ndcg@10"]
        del scorer
    best_lr = max(cfg.lr_grid, key=lambda lr: (np.nan_to_num(values[lr], nan=-1.0), -cfg.lr_grid.index(lr)))
    for lr in cfg.lr_grid:
        if lr != best_lr:
            shutil.rmtree(_lr_dir(out_dir, lr) / "checkpoints", ignore_errors=True)
            (_lr_dir(out_dir, lr) / "scorer" / WEIGHTS_FILE).unlink(missing_ok=True)
    log.info("%s learning rates (val/ndcg@10): %s -> %g", name,
             ", ".join(f"{lr:g}: {v:.4f}" for lr, v in values.items()), best_lr)
    return best_lr, values


def fit_late_fusion(cfg: MatchConfig, train: MatchData, valid: MatchData, text: TwoTowerScorer) -> LateFusionScorer:
    """Term probe on the training ads' pooled vectors (C picked on valid) + the trained
    `text` matcher (text_only at the same fraction and seed), summed with the weight that
    maximises valid ndcg@10."""
    if train.ads.pooled is None or valid.ads.pooled is None:
        raise ValueError("late_fusion needs pooled image vectors for the train and valid ads")
    pairs = training_pairs(train, cfg.train_fraction, cfg.seed)
    terms, labels = term_labels(train, pairs)
    keep = (labels.sum(0) > 0) & (labels.sum(0) < len(labels))
    terms, labels = [t for t, k in zip(terms, keep, strict=True) if k], labels[:, keep]
    pooled = train.ads.pooled.astype(np.float64)
    mean, std = pooled.mean(0), np.maximum(pooled.std(0), 1e-3)
    components = None
    if cfg.late_fusion_pca:
        from sklearn.decomposition import PCA

        pca = PCA(n_components=min(cfg.late_fusion_pca, *pooled.shape), random_state=cfg.seed)
        pca.fit((pooled - mean) / std)
        components = pca.components_
    x = TermProbe.features(pooled, mean, std, components)
    qrels = qrels_from_frame(valid.qrels)
    valid_text = zscore_rows(text.score(valid.queries, valid.ads))
    grid: dict[tuple[float, float], float] = {}
    best: tuple[float, float, float, TermProbe | None] = (-1.0, 0.0, 0.0, None)
    fitted = None
    for c in sorted(cfg.late_fusion_c):  # weaker regularisation next: warm-start from the last fit
        fitted = weights, intercepts = fit_logistic(x, labels, c, max_iter=cfg.late_fusion_max_iter,
                                                    init=fitted)
        probe = TermProbe(terms, mean, std, weights, intercepts, components)
        valid_probe = zscore_rows(probe.query_scores(valid.queries.texts, valid.ads.pooled))
        for w in cfg.late_fusion_weights:
            value = _ndcg_at_10(valid.queries.query_ids, valid.ads.ad_ids, valid_text + w * valid_probe, qrels)
            grid[(c, w)] = value
            if np.nan_to_num(value, nan=-1.0) > best[0]:
                best = (float(np.nan_to_num(value, nan=-1.0)), c, w, probe)
    value, c, w, probe = best
    log.info("late_fusion: C=%g weight=%g val/ndcg@10 %.4f (%d terms)", c, w, value, len(terms))
    info = {"C": c, "weight": w, "val_ndcg@10": value, "num_terms": len(terms),
            "grid": {f"C={k[0]:g},w={k[1]:g}": v for k, v in grid.items()},
            "seed": cfg.seed, "train_fraction": cfg.train_fraction}
    return LateFusionScorer(text, probe, w, info=info)


def calibrate_word_channel(scorer: TwoTowerScorer, cfg: MatchConfig, train: MatchData,
                           valid: MatchData) -> TwoTowerScorer:
    """The z-score fusion of ours' text score and word-channel score (words.py): the
    training ads' covariances of both halves of the ad vector, and the channel weight of
    `cfg.word_channel_weights` that maximises valid ndcg@10 (ties: the smaller weight)."""
    channel = scorer.net.word_channel
    text_dim = scorer.net.dim - channel.dim
    dims = (channel.text_covariance.shape[0], channel.dim)
    channel.set_calibration(np.zeros((dims[0], dims[0])), np.zeros((dims[1], dims[1])), 0.0)  # uncalibrated
    train_ads = scorer.encode_ads(train.ads)
    valid_ads = scorer.encode_ads(valid.ads)
    uncalibrated = scorer.encode_queries(valid.queries)  # [text, learned weight * terms]
    text_query = torch.from_numpy(uncalibrated[:, :text_dim])
    terms = channel.query_terms(valid.queries.texts).cpu()
    text_cov, evidence_cov = covariance(train_ads[:, :text_dim]), covariance(train_ads[:, text_dim:])
    qrels = qrels_from_frame(valid.qrels)
    channel_cpu = WordChannel(channel.vocabulary, text_dim=text_dim)
    channel_cpu.set_calibration(text_cov, evidence_cov, 1.0)
    learned = _ndcg_at_10(valid.queries.query_ids, valid.ads.ad_ids, uncalibrated @ valid_ads.T, qrels)
    grid: dict[float, float] = {}
    for w in sorted(cfg.word_channel_weights):
        with torch.no_grad():
            queries = channel_cpu.calibrated_query(text_query, terms, weight=w).numpy()
        grid[w] = _ndcg_at_10(valid.queries.query_ids, valid.ads.ad_ids, queries @ valid_ads.T, qrels)
    best = max(grid, key=lambda w: (np.nan_to_num(grid[w], nan=-1.0), -w))
    record = {"weight": best, "val_ndcg@10": grid[best], "learned_val_ndcg@10": learned,
              "grid": {f"{w:g}": v for w, v in grid.items()}}
    if np.nan_to_num(grid[best], nan=-1.0) > np.nan_to_num(learned, nan=-1.0):
        channel.set_calibration(text_cov, evidence_cov, best)
        record["used"] = "calibrated"
    else:  # the weight learned in training ranks valid at least as well: keep it
        record["used"] = "learned"
    scorer.info["word_channel_calibration"] = record
    log.info("ours word channel: calibrated weight %g val/ndcg@10 %.4f, learned weight %.4f -> %s",
             best, grid[best], learned, record["used"])
    return scorer


def train_system(name: str, cfg: MatchConfig, train: MatchData, valid: MatchData, out_dir: Path,
                 logger=None, text_scorer: TwoTowerScorer | None = None) -> Scorer:
    """Fit one system on `train` (model selection on `valid`) and save it to `out_dir/scorer`.

    Trained systems use `cfg.lr`, or when it is None the best of `cfg.lr_grid`
    (`select_learning_rate`, the same search for each of them). `late_fusion` fuses
    `text_scorer` (a trained text_only); without it, text_only is trained first here.
    """
    _check_name(name)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if name == "lexical":
        scorer: Scorer = LexicalScorer(cfg.bm25_k1, cfg.bm25_b)
    elif name == "text_zero_shot":
        scorer = TwoTowerScorer.zero_shot(cfg)
    elif name == "late_fusion":
        if text_scorer is None:
            text_scorer = train_system("text_only", cfg, train, valid, out_dir / "text_only", logger)
        scorer = fit_late_fusion(cfg, train, valid, text_scorer)
    elif cfg.lr is None:
        best_lr, values = select_learning_rate(name, cfg, train, valid, out_dir, logger)
        scorer = load_scorer(_lr_dir(out_dir, best_lr) / "scorer", cfg.device)
        scorer.info["lr_search"] = {f"{lr:g}": v for lr, v in values.items()}
    else:
        scorer = _train_matcher(name, cfg, cfg.lr, train, valid, out_dir / "run", logger)
    scorer = finish_matcher(name, scorer, cfg, train, valid)
    scorer.save(out_dir / "scorer")
    return scorer


def finish_matcher(name: str, scorer: Scorer, cfg: MatchConfig, train: MatchData, valid: MatchData) -> Scorer:
    """What follows the training of a matcher, wherever it was trained (`train_system`, or a
    learning-rate search whose winner is reused): ours' word channel joins it when it was not
    trained jointly, and is calibrated on valid."""
    if not isinstance(scorer, TwoTowerScorer):
        return scorer
    if (name == "ours" and cfg.word_channel and not cfg.word_channel_joint and train.ads.evidence is not None
            and scorer.net.word_channel is None):
        # the channel joins the trained matcher: only its calibration decides its weight
        scorer.net.word_channel = WordChannel(train.ads.evidence_words).to(scorer.device)
    if scorer.net.word_channel is not None and cfg.word_channel_calibration:
        scorer = calibrate_word_channel(scorer, cfg, train, valid)
    return scorer
