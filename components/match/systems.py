"""Training the matching systems: `train_system(name, cfg, train, valid, out_dir)` returns a
fitted `Scorer` (`components.match.scorers`, which also loads saved ones).

- lexical: BM25 over titles.                 - text_zero_shot: MiniLM query vs title.
- text_only: the matcher trained on titles.  - ours: trained on title [SEP] aligned words.
- implicit_fusion: title tower + image head, trained end to end (same loss, budget, LR search).
- implicit_fusion_words: implicit_fusion whose ad text also carries the aligned words.
- late_fusion: z(trained text_only) + w * z(term probe on the pooled image vector).

The trained systems share `MatchConfig`: budget, LR grid (`select_learning_rate`), head-LR
rule, batch size, loss, checkpoint selection on the valid split.

A warm start (`WarmStart`, checked by `check_warm_start`) fine-tunes from a saved matcher (the
scheduled loop's champion) instead of the pretrained encoder: its trained tensors, its learning
rate, `match.warm_start_steps` steps, no learning-rate search.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from safetensors.torch import load_file as load_tensors

from components.match.config import MatchConfig
from components.match.data import MatchData, training_pairs
from components.match.encoder import TowerConfig
from components.match.module import MatchBatches, MatcherModule, fit_matcher
from components.match.probe import TermProbe, fit_logistic, term_labels, zscore_rows
from components.match.scorers import (
    WEIGHTS_FILE,
    LateFusionScorer,
    LexicalScorer,
    Scorer,
    TwoTowerScorer,
    load_scorer,
    read_meta,
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


@dataclass(frozen=True)
class WarmStart:
    """Fine-tune from a saved matcher instead of the pretrained encoder: its trained tensors
    (`scorer_dir`), at its learning rate `lr`, for `steps` steps; `source` says whose they are
    (logs, tags). Made by `check_warm_start`, which refuses what would not load."""

    scorer_dir: Path
    lr: float
    steps: int
    source: str

    def as_dict(self) -> dict:
        return {**asdict(self), "scorer_dir": str(self.scorer_dir)}


class WarmStartRefused(ValueError):
    """The saved matcher cannot start this training (another system or architecture, no
    recorded learning rate, no weights); the message says why."""


def check_warm_start(name: str, cfg: MatchConfig, scorer_dir: Path, source: str) -> WarmStart:
    """A warm start of `name` (trained with `cfg`) from the matcher saved in `scorer_dir`, or
    `WarmStartRefused` naming every setting that differs. What must match is what decides the
    tensors and what they mean: the system, the tower (trainable layers, text lengths), the ad
    text (words per ad and their filters), the image head, the word channel. The image head's
    input width is checked against the data when the tensors load. The learning rate is the
    one the saved matcher trained with (`info.lr` of its scorer.json)."""
    scorer_dir = Path(scorer_dir)
    if name not in TRAINED_SYSTEMS:
        raise WarmStartRefused(f"{name} is not fine-tuned (warm starts apply to {', '.join(TRAINED_SYSTEMS)})")
    try:
        meta = read_meta(scorer_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise WarmStartRefused(f"{scorer_dir}: no readable matcher ({exc})") from exc
    if meta.get("system") != name:
        raise WarmStartRefused(f"{source} is {meta.get('system')}, this run trains {name}")
    if not meta.get("trained") or not (scorer_dir / WEIGHTS_FILE).is_file():
        raise WarmStartRefused(f"{source} has no trained weights ({scorer_dir / WEIGHTS_FILE})")
    use_words = name in WORD_SYSTEMS
    wanted = {f"tower.{k}": v for k, v in asdict(TowerConfig(trainable_layers=cfg.trainable_layers,
                                                              max_query_len=cfg.max_query_len,
                                                              max_ad_len=cfg.max_ad_len)).items()}
    saved = {f"tower.{k}": v for k, v in (meta.get("tower") or {}).items()}
    wanted["use_words"], saved["use_words"] = use_words, meta.get("use_words")
    if use_words:
        wanted.update(words_per_ad=cfg.words_per_ad, word_min_score=cfg.word_min_score,
                      words_skip_title=cfg.words_skip_title)
        saved.update(words_per_ad=meta.get("words_per_ad"), word_min_score=meta.get("word_min_score", 0.0),
                     words_skip_title=meta.get("words_skip_title", False))
    if name in IMAGE_SYSTEMS:
        head = meta.get("head") or {}
        wanted.update({"fusion_hidden": cfg.fusion_hidden, "fusion": cfg.fusion, "fusion_query": cfg.fusion_query,
                       "fusion_dropout": cfg.fusion_dropout})
        saved.update({"fusion_hidden": head.get("hidden"), "fusion": head.get("fusion"),
                      "fusion_query": head.get("query"), "fusion_dropout": head.get("dropout")})
    if name == "ours":
        wanted["word_channel"], saved["word_channel"] = cfg.word_channel, meta.get("word_channel") is not None
    differ = [f"{key} {saved.get(key)!r} (this run: {value!r})" for key, value in wanted.items()
              if saved.get(key) != value]
    if differ:
        raise WarmStartRefused(f"{source} was trained with other settings: {', '.join(differ)}")
    lr = (meta.get("info") or {}).get("lr")
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not lr > 0:
        raise WarmStartRefused(f"{source} does not record the learning rate it trained with "
                               f"(info.lr of {scorer_dir / 'scorer.json'})")
    return WarmStart(scorer_dir, float(lr), cfg.warm_start_steps, source)


def _load_warm_state(module: MatcherModule, warm_start: WarmStart) -> None:
    """Put the saved matcher's trained tensors into `module`'s network. The word channel's
    calibration (covariances of the old ads, fitted after training) is left out: it is fitted
    again after this training, and the vocabulary may have changed; its learned weight loads."""
    path = warm_start.scorer_dir / WEIGHTS_FILE
    calibration = {f"word_channel.{b}" for b in WordChannel.CALIBRATION_BUFFERS}
    state = {k: v for k, v in load_tensors(str(path)).items() if k not in calibration}
    target = {k: v for k, v in module.net.trainable_state_dict().items() if k not in calibration}
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    reshaped = sorted(k for k in set(state) & set(target) if state[k].shape != target[k].shape)
    if missing or unexpected or reshaped:
        raise WarmStartRefused(f"{path}: the tensors do not fit this matcher ({len(missing)} missing, "
                               f"{len(unexpected)} unexpected, {len(reshaped)} of another shape, e.g. "
                               f"{(missing + unexpected + reshaped)[:3]})")
    module.net.load_state_dict(state, strict=False)


def init_matcher(name: str, cfg: MatchConfig, lr: float, train: MatchData, *, max_steps: int,
                 warm_start: WarmStart | None = None) -> MatcherModule:
    """The module a fine-tune of `name` starts from: the pretrained encoder (new heads seeded by
    `cfg.seed`), or with `warm_start` the saved matcher's trained tensors."""
    use_images = name in IMAGE_SYSTEMS
    use_channel = _uses_channel(name, cfg, train)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the head's initialisation too
    image_dim = train.ads.pooled.shape[1] if use_images and train.ads.pooled is not None else 1280
    hparams = dict(lr=lr, head_lr_multiplier=cfg.head_lr_multiplier, weight_decay=cfg.weight_decay,
                   warmup_steps=int(cfg.warmup_fraction * max_steps), max_steps=max_steps,
                   temperature=cfg.temperature, symmetric_loss=cfg.symmetric_loss,
                   trainable_layers=cfg.trainable_layers, max_query_len=cfg.max_query_len,
                   max_ad_len=cfg.max_ad_len, image_head=use_images, image_dim=image_dim, fusion=cfg.fusion,
                   fusion_query=cfg.fusion_query, fusion_dropout=cfg.fusion_dropout,
                   fusion_hidden=cfg.fusion_hidden,
                   word_vocabulary=list(train.ads.evidence_words) if use_channel else None,
                   word_channel_init=cfg.word_channel_init, word_channel_lr=cfg.word_channel_lr)
    module = MatcherModule(**hparams)
    if use_images and train.ads.has_images:
        module.net.image_head.fit_statistics(train.ads.pooled, train.ads.parts, train.ads.parts_mask)
    if warm_start is not None:
        _load_warm_state(module, warm_start)  # the image head keeps the statistics it was trained with
    return module


def _uses_channel(name: str, cfg: MatchConfig, train: MatchData) -> bool:
    return name == "ours" and cfg.word_channel and cfg.word_channel_joint and train.ads.evidence is not None


def _train_matcher(name: str, cfg: MatchConfig, lr: float, train: MatchData, valid: MatchData,
                   run_dir: Path, logger=None, warm_start: WarmStart | None = None) -> TwoTowerScorer:
    """One fine-tune of a trained system at one learning rate (best valid checkpoint kept);
    with `warm_start`, from its tensors for its number of steps."""
    use_words, use_images = name in WORD_SYSTEMS, name in IMAGE_SYSTEMS
    if use_words and train.ads.words is None:
        log.warning("%s without aligned words: the ad text is the title alone", name)
    use_channel = _uses_channel(name, cfg, train)
    if name == "ours" and cfg.word_channel and train.ads.evidence is None:
        log.warning("ours without word evidence: no word channel")
    if use_images and not (train.ads.has_images and valid.ads.has_images):
        raise ValueError("implicit_fusion needs image features for the train and valid ads")
    max_steps = cfg.max_steps if warm_start is None else warm_start.steps
    pairs = training_pairs(train, cfg.train_fraction, cfg.seed)
    module = init_matcher(name, cfg, lr, train, max_steps=max_steps, warm_start=warm_start)
    text_options = dict(min_score=cfg.word_min_score, skip_title_words=cfg.words_skip_title)
    batches = MatchBatches(train, pairs, train.ads.texts(use_words, cfg.words_per_ad, **text_options), valid,
                           valid.ads.texts(use_words, cfg.words_per_ad, **text_options), batch_size=cfg.batch_size,
                           seed=cfg.seed, use_images=use_images, use_evidence=use_channel,
                           word_dropout=cfg.word_dropout if use_words else 0.0,
                           click_weights=cfg.click_weights, explicit_negatives=cfg.explicit_negatives)
    result = fit_matcher(module, batches, max_steps=max_steps, eval_every=cfg.eval_every, seed=cfg.seed,
                         out_dir=run_dir, patience=cfg.patience, device=cfg.device, logger=logger,
                         accelerator=cfg.accelerator, devices=cfg.devices, strategy=cfg.strategy,
                         num_nodes=cfg.num_nodes)
    head_config = None
    if use_images:
        head_config = dict(image_dim=module.hparams.image_dim, hidden=cfg.fusion_hidden, fusion=cfg.fusion,
                           query=cfg.fusion_query, dropout=cfg.fusion_dropout)
    info = {"lr": lr, "val_ndcg@10": result.best_score, "best_step": result.best_step, "steps": result.steps,
            "train_seconds": round(result.seconds, 2), "num_pairs": int(len(pairs)),
            "num_train_queries": int(len(np.unique(pairs[:, 0]))), "val_history": result.history,
            "seed": cfg.seed, "train_fraction": cfg.train_fraction}
    if warm_start is not None:
        info["warm_start"] = {"source": warm_start.source, "lr": warm_start.lr, "steps": warm_start.steps}
    log.info("%s lr=%g%s: best val/ndcg@10 %.4f at step %d of %d (%.1f s, %d pairs)", name, lr,
             f" (warm start from {warm_start.source})" if warm_start else "", result.best_score,
             result.best_step, result.steps, result.seconds, len(pairs))
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
                 logger=None, text_scorer: TwoTowerScorer | None = None,
                 warm_start: WarmStart | None = None) -> Scorer:
    """Fit one system on `train` (model selection on `valid`) and save it to `out_dir/scorer`.

    Trained systems use `cfg.lr`, or when it is None the best of `cfg.lr_grid`
    (`select_learning_rate`, the same search for each of them). `late_fusion` fuses
    `text_scorer` (a trained text_only); without it, text_only is trained first here.
    `warm_start` (a trained system only): one fine-tune from its tensors, at its rate, for its
    steps, in `out_dir/warm`.
    """
    _check_name(name)
    if warm_start is not None and name not in TRAINED_SYSTEMS:
        raise WarmStartRefused(f"{name} is not fine-tuned: no warm start")
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
    elif warm_start is not None:
        scorer = _train_matcher(name, cfg, warm_start.lr, train, valid, out_dir / "warm", logger, warm_start)
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
