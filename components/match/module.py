"""Lightning training of every trained matcher (text_only, ours, implicit_fusion).

`MatcherModule` receives plain config values (so a checkpoint reloads on its own) and
owns the network, the loss, the optimiser and validation (`val/ndcg@10`: every valid ad
ranked for every valid query). `MatchBatches` turns (query, ad) positive pairs into
batches of texts (+ image features) with the in-batch false-negative mask.
Checkpoints hold only what training changes (top text layers, image head): the frozen
rest is the bundled MiniLM.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from components.lightning_logs import quiet_lightning
from components.match.data import MatchData
from components.match.encoder import TextTower, TowerConfig, TwoTowerMatcher
from components.match.fusion import ImageFusionHead
from components.match.losses import InfoNCELoss
from components.match.words import WordChannel
from components.metrics import ScoreMatrix, qrels_from_frame, ranking_metrics

log = logging.getLogger(__name__)

VAL_METRIC = "val/ndcg@10"
_ENCODE_CHUNK = 256


# --------------------------------------------------------------------------- batches


class MatchBatches(pl.LightningDataModule):
    """Training batches of positive pairs, and the whole valid split as one "batch".

    `ad_texts` are the texts the ad tower reads (titles, or title + words), row-aligned with
    `train.ads`; `valid_ad_texts` likewise for `valid.ads`. `use_images` adds features,
    `use_evidence` the ads' word evidence (the word channel). `word_dropout` > 0 replaces a
    training ad's text by its title alone with that probability (word-field dropout: the
    matcher must not lean on words that may be wrong).

    What clicks say (qrels of `alignsearch traffic ingest`): with `click_weights` and a qrels
    `weight` column, each row carries its pair's weight (`MatchData.pair_weights`); with
    `explicit_negatives`, each row whose query has relevance-0 qrels draws one of them (seeded,
    its own generator) and the batch's drawn ads join as extra negative columns for every query
    (masked where relevant to it). Without a weight column and relevance-0 qrels the batches
    are exactly those of plain in-batch InfoNCE.
    """

    def __init__(self, train: MatchData, pairs: np.ndarray, ad_texts: list[str], valid: MatchData,
                 valid_ad_texts: list[str], batch_size: int, seed: int, use_images: bool = False,
                 use_evidence: bool = False, word_dropout: float = 0.0, click_weights: bool = True,
                 explicit_negatives: bool = True) -> None:
        super().__init__()
        if len(pairs) == 0:
            raise ValueError("no training pairs")
        self.train_data, self.valid_data = train, valid
        self.pairs = np.asarray(pairs, dtype=np.int64)  # (M,2) query row, ad row
        self.ad_texts, self.valid_ad_texts = ad_texts, valid_ad_texts
        self.batch_size, self.seed, self.use_images = batch_size, seed, use_images
        self.use_evidence, self.word_dropout = use_evidence, word_dropout
        self._dropout_rng = np.random.default_rng(seed)
        if use_images and not (train.ads.has_images and valid.ads.has_images):
            raise ValueError("image features are needed for train and valid ads")
        if use_evidence and (train.ads.evidence is None or valid.ads.evidence is None):
            raise ValueError("word evidence is needed for train and valid ads (the word channel)")
        self.positive_ads: dict[int, set[int]] = {}
        for q, a in self.pairs:
            self.positive_ads.setdefault(int(q), set()).add(int(a))
        self.weights = train.pair_weights(self.pairs) if click_weights and train.has_weights else None  # (M,)
        self.negatives = train.explicit_negatives() if explicit_negatives else {}
        self.negatives = {q: ads for q, ads in self.negatives.items() if q in self.positive_ads}
        self._negative_rng = np.random.default_rng([seed, 1])  # apart: the other draws stay as they were
        self.relevant_ads: dict[int, set[int]] = {}  # every positive of the split, for the extra columns' mask
        for q, a in train.positives() if self.negatives else ():
            self.relevant_ads.setdefault(int(q), set()).add(int(a))

    def texts_to_cache(self) -> tuple[list[str], list[str]]:
        """(query texts, ad texts) the module will encode: their frozen prefix is cached once."""
        q = self.train_data.queries.texts
        queries = [q[i] for i in np.unique(self.pairs[:, 0])] + list(self.valid_data.queries.texts)
        rows = np.unique(self.pairs[:, 1])
        ads = [self.ad_texts[i] for i in rows] + list(self.valid_ad_texts)
        if self.word_dropout > 0:
            ads += [self.train_data.ads.titles[i] for i in rows]
        if self.negatives:
            negative_rows = np.unique(np.concatenate(list(self.negatives.values())))
            ads += [self.ad_texts[i] for i in negative_rows]
            if self.word_dropout > 0:
                ads += [self.train_data.ads.titles[i] for i in negative_rows]
        return queries, ads

    def _collate(self, rows: list[int]) -> dict:
        pairs = self.pairs[np.asarray(rows, dtype=np.int64)]  # (B,2)
        q_rows, a_rows = pairs[:, 0], pairs[:, 1]
        false_negative = torch.tensor([[int(a) in self.positive_ads[int(q)] for a in a_rows] for q in q_rows])
        ad_texts = [self.ad_texts[i] for i in a_rows]
        if self.word_dropout > 0:
            dropped = self._dropout_rng.random(len(a_rows)) < self.word_dropout
            ad_texts = [self.train_data.ads.titles[i] if d else t for i, d, t in zip(a_rows, dropped, ad_texts, strict=True)]
        batch = {
            "query_texts": [self.train_data.queries.texts[i] for i in q_rows],
            "ad_texts": ad_texts,
            "false_negative": false_negative,  # (B,B) ad j relevant to query i
        }
        if self.weights is not None:
            batch["weights"] = torch.from_numpy(self.weights[np.asarray(rows, dtype=np.int64)]).float()  # (B,)
        extra_rows = self._draw_negatives(q_rows)  # (E,)
        if len(extra_rows):
            # The drawn negatives ride along after the batch's ads (one encoding pass):
            # columns B.. of the ad side; extra_false_negative (B,E) masks those relevant to a row.
            extra_texts = [self.ad_texts[i] for i in extra_rows]
            if self.word_dropout > 0:
                dropped = self._negative_rng.random(len(extra_rows)) < self.word_dropout
                extra_texts = [self.train_data.ads.titles[i] if d else t
                               for i, d, t in zip(extra_rows, dropped, extra_texts, strict=True)]
            batch["ad_texts"] = ad_texts + extra_texts
            batch["num_extra"] = len(extra_rows)
            batch["extra_false_negative"] = torch.tensor(
                [[int(a) in self.relevant_ads.get(int(q), ()) for a in extra_rows] for q in q_rows]).reshape(
                len(q_rows), len(extra_rows))
            a_rows = np.concatenate([a_rows, extra_rows])
        if self.use_images:
            batch.update(_features(self.train_data, a_rows))
        if self.use_evidence:
            batch["evidence"] = torch.from_numpy(self.train_data.ads.evidence[a_rows])  # (B[+E],V)
        return batch

    def _draw_negatives(self, q_rows: np.ndarray) -> np.ndarray:
        """One explicit negative per row whose query has any (seeded), the batch's distinct ones."""
        if not self.negatives:
            return np.zeros(0, dtype=np.int64)
        drawn = [ads[self._negative_rng.integers(len(ads))] for ads in
                 (self.negatives.get(int(q)) for q in q_rows) if ads is not None]
        return np.unique(np.asarray(drawn, dtype=np.int64))

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        drop_last = len(self.pairs) >= 2 * self.batch_size  # never drop everything on tiny data
        return DataLoader(range(len(self.pairs)), batch_size=self.batch_size, shuffle=True,
                          generator=generator, drop_last=drop_last, collate_fn=self._collate)

    def val_dataloader(self) -> DataLoader:
        batch = {
            "query_texts": self.valid_data.queries.texts,
            "query_ids": self.valid_data.queries.query_ids,
            "ad_texts": self.valid_ad_texts,
            "ad_ids": self.valid_data.ads.ad_ids,
            "qrels": qrels_from_frame(self.valid_data.qrels),
        }
        if self.use_images:
            batch.update(_features(self.valid_data, np.arange(len(self.valid_data.ads))))
        if self.use_evidence:
            batch["evidence"] = torch.from_numpy(self.valid_data.ads.evidence)
        return DataLoader([batch], batch_size=None, collate_fn=lambda b: b)


def _features(data: MatchData, rows: np.ndarray) -> dict[str, torch.Tensor]:
    ads = data.ads
    return {"pooled": torch.from_numpy(ads.pooled[rows]),  # (B,D)
            "parts": torch.from_numpy(ads.parts[rows]),  # (B,P,D)
            "parts_mask": torch.from_numpy(ads.parts_mask[rows])}  # (B,P)


# --------------------------------------------------------------------------- module


class MatcherModule(pl.LightningModule):
    """One LightningModule for all trained matchers; `image_head=True` is implicit fusion."""

    def __init__(self, *, lr: float = 1e-4, head_lr_multiplier: float = 10.0, weight_decay: float = 0.01,
                 warmup_steps: int = 0, max_steps: int = 300, temperature: float = 0.05,
                 symmetric_loss: bool = True, trainable_layers: int = 2, max_query_len: int = 16,
                 max_ad_len: int = 48, image_head: bool = False, image_dim: int = 1280,
                 fusion: str = "residual", fusion_query: str = "title", fusion_dropout: float = 0.1,
                 fusion_hidden: int = 384, word_vocabulary: list[str] | None = None,
                 word_channel_init: float = 0.05, word_channel_lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        tower = TextTower(TowerConfig(trainable_layers=trainable_layers, max_query_len=max_query_len,
                                      max_ad_len=max_ad_len))
        head = (ImageFusionHead(image_dim=image_dim, hidden=fusion_hidden, fusion=fusion,
                                query=fusion_query, dropout=fusion_dropout) if image_head else None)
        channel = WordChannel(word_vocabulary, word_channel_init) if word_vocabulary else None
        self.net = TwoTowerMatcher(tower, head, channel)
        self.loss = InfoNCELoss(temperature=temperature, symmetric=symmetric_loss)
        self.val_history: list[tuple[int, float]] = []

    # -- data hooks -------------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "texts_to_cache"):
            queries, ads = datamodule.texts_to_cache()
            started = time.perf_counter()
            n = (self.net.tower.cache_texts(queries, self.hparams.max_query_len)
                 + self.net.tower.cache_texts(ads, self.hparams.max_ad_len))
            if n:
                log.info("cached the frozen prefix of %d texts in %.1f s", n, time.perf_counter() - started)

    # -- steps ----------------------------------------------------------------------------------

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.net(batch["query_texts"], batch["ad_texts"], batch.get("pooled"), batch.get("parts"),
                        batch.get("parts_mask"), batch.get("evidence"))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self(batch)
        bs = len(batch["query_texts"])
        extra = batch.get("num_extra", 0)
        ad, extra_ad = (out["ad"][:bs], out["ad"][bs:]) if extra else (out["ad"], None)  # (B,dim), (E,dim)
        losses = self.loss(out["query"], ad, batch["false_negative"], weights=batch.get("weights"),
                           extra_ad=extra_ad, extra_false_negative=batch.get("extra_false_negative"))
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs)
        self.log("train/query_to_ad", losses["query_to_ad"], batch_size=bs)
        return losses["loss"]

    @torch.no_grad()
    def encode_in_chunks(self, batch: dict, side: str) -> torch.Tensor:
        texts = batch[f"{side}_texts"]
        chunks = []
        for start in range(0, len(texts), _ENCODE_CHUNK):
            sl = slice(start, start + _ENCODE_CHUNK)
            if side == "query":
                chunks.append(self.net.encode_query(texts[sl]))
            else:
                feats = {k: batch[k][sl] for k in ("pooled", "parts", "parts_mask", "evidence") if k in batch}
                chunks.append(self.net.encode_ad(texts[sl], **feats))
        return torch.cat(chunks) if chunks else torch.zeros(0, self.net.dim, device=self.device)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        query = self.encode_in_chunks(batch, "query")  # (Q,dim)
        ad = self.encode_in_chunks(batch, "ad")  # (A,dim)
        scores = (query @ ad.T).double().cpu().numpy()  # (Q,A)
        matrix = ScoreMatrix(batch["query_ids"], batch["ad_ids"], scores)
        qrels = batch["qrels"]
        value = ranking_metrics(qrels, matrix.top_k_run(100, sorted(qrels)), ["ndcg@10"])["ndcg@10"]
        value = 0.0 if np.isnan(value) else value
        self.val_history.append((int(self.global_step), float(value)))
        self.log(VAL_METRIC, value, prog_bar=True, batch_size=1)

    # -- optimisation ----------------------------------------------------------------------------

    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": self.net.encoder_parameters(), "lr": hp.lr}]
        channel = [] if self.net.word_channel is None else list(self.net.word_channel.parameters())
        head = [p for p in self.net.head_parameters() if all(p is not c for c in channel)]
        if head:  # new layers: the same multiplier rule for every system that has them
            groups.append({"params": head, "lr": hp.lr * hp.head_lr_multiplier})
        if channel:  # one scalar: at the encoder's rate it could not move within the budget
            groups.append({"params": channel, "lr": hp.word_channel_lr, "weight_decay": 0.0})
        groups = [g for g in groups if g["params"]]
        optimizer = torch.optim.AdamW(groups, weight_decay=hp.weight_decay)
        warmup, total = max(0, hp.warmup_steps), max(1, hp.max_steps)

        def factor(step: int) -> float:  # linear warm-up, then linear decay to 0 at the budget
            if step < warmup:
                return (step + 1) / (warmup + 1)
            return max(0.0, (total - step) / max(1, total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ---------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = {f"net.{k}" for k in self.net.trainable_state_dict()}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Frozen tensors are not in the checkpoint: they are the bundled weights this module
        was just built with, so fill them in and keep loading strict."""
        for key, value in self.state_dict().items():
            checkpoint["state_dict"].setdefault(key, value)

    def load_trained_state(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a checkpoint's (partial) state dict; every trained tensor must be in it."""
        expected = {f"net.{k}" for k in self.net.trainable_state_dict()}
        missing = expected - set(state_dict)
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} trained tensors, e.g. {sorted(missing)[:3]}")
        self.load_state_dict(state_dict, strict=False)


# --------------------------------------------------------------------------- fitting


@dataclass
class FitResult:
    best_score: float
    best_step: int
    steps: int
    seconds: float
    checkpoint_path: Path | None
    history: list[tuple[int, float]]


def num_processes(accelerator: str, devices: int | str | list, num_nodes: int = 1) -> int:
    """How many training processes Lightning starts for these Trainer arguments."""
    gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if devices == "auto" or devices == -1 or devices == "-1":
        per_node = torch.cuda.device_count() if gpu else (1 if devices == "auto" else os.cpu_count() or 1)
    elif isinstance(devices, list | tuple):
        per_node = len(devices)
    elif isinstance(devices, str) and "," in devices:
        per_node = len([d for d in devices.split(",") if d.strip()])
    else:
        per_node = int(devices)
    return per_node * num_nodes


def trainer_strategy(strategy: str, accelerator: str, devices: int | str, num_nodes: int) -> str:
    """The strategy the Trainer gets: with more than one process, `auto` and `ddp` become
    `ddp_spawn`, so the extra ranks live only inside `fit` and the caller (a stage, a flow, a
    Prefect worker's engine process) goes on alone and writes its outputs once. Lightning's
    plain `ddp` re-runs the whole command line on every rank (and would run the flow twice)."""
    if strategy in ("auto", "ddp") and num_processes(accelerator, devices, num_nodes) > 1:
        return "ddp_spawn"
    return strategy


class _RankZeroHistory(pl.Callback):
    """Validation history and step count written by global rank 0 to a JSON file: with a
    spawned strategy the ranks' modules are copies, and this file is how the caller gets them."""

    def __init__(self, path: Path) -> None:
        self.path, self.history, self.steps = Path(path), [], 0

    def _write(self, trainer: pl.Trainer) -> None:
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"history": self.history, "steps": self.steps}))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and VAL_METRIC in trainer.callback_metrics:
            self.history.append((int(trainer.global_step), float(trainer.callback_metrics[VAL_METRIC])))
            self._write(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.steps = int(trainer.global_step)
        self._write(trainer)


def fit_matcher(module: MatcherModule, batches: MatchBatches, *, max_steps: int, eval_every: int,
                seed: int, out_dir: Path, patience: int | None = None, device: str = "auto",
                logger=None, accelerator: str = "auto", devices: int | str = 1, strategy: str = "auto",
                num_nodes: int = 1) -> FitResult:
    """Train for `max_steps` steps, validating every `eval_every`; restore the best weights.

    Deterministic for a seed (same data order, dropout and init). `logger` is any Lightning
    logger (e.g. `MLFlowLogger`), or None for no logging. `accelerator` ("auto" follows
    `device`), `devices`, `strategy` and `num_nodes` go to the Trainer; with more than one
    process the training runs on spawned ranks (`trainer_strategy`): only global rank 0
    writes checkpoints and logs (Lightning's loggers are rank-zero-only), and only this
    process returns.
    """
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    out_dir = Path(out_dir)
    if accelerator == "auto" and device != "auto":
        accelerator = device
    strategy = trainer_strategy(strategy, accelerator, devices, num_nodes)
    if strategy.startswith(("ddp_spawn", "ddp_fork", "ddp_notebook")):
        return _fit_spawned(module, batches, max_steps=max_steps, eval_every=eval_every, seed=seed,
                            out_dir=out_dir, patience=patience, logger=logger, accelerator=accelerator,
                            devices=devices, strategy=strategy, num_nodes=num_nodes)
    pl.seed_everything(seed, workers=True, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="best", monitor=VAL_METRIC,
                                 mode="max", save_top_k=1, save_weights_only=True,
                                 enable_version_counter=False)
    callbacks: list = [checkpoint]
    if patience is not None:
        callbacks.append(EarlyStopping(monitor=VAL_METRIC, mode="max", patience=patience,
                                       check_on_train_epoch_end=False))
    eval_every = min(eval_every, max_steps)
    quiet_lightning()
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=-1, val_check_interval=eval_every,
                         check_val_every_n_epoch=None, num_sanity_val_steps=0, accelerator=accelerator,
                         devices=devices, strategy=strategy, num_nodes=num_nodes, deterministic=True,
                         logger=logger if logger is not None else False,
                         log_every_n_steps=max(1, min(10, eval_every)), enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=out_dir)
    started = time.perf_counter()
    with warnings.catch_warnings():
        # The frozen layers are in eval mode on purpose (they match their cached states).
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        trainer.fit(module, datamodule=batches)
        # The budget may end between evaluations: validate the final weights too.
        if not module.val_history or module.val_history[-1][0] != module.global_step:
            trainer.validate(module, datamodule=batches, verbose=False)
            final_score = module.val_history[-1][1]
            best = checkpoint.best_model_score
            if best is None or final_score > float(best):
                trainer.save_checkpoint(out_dir / "checkpoints" / "best.ckpt", weights_only=True)
                checkpoint.best_model_path = str(out_dir / "checkpoints" / "best.ckpt")
                checkpoint.best_model_score = torch.tensor(final_score)
    seconds = time.perf_counter() - started
    best_path = Path(checkpoint.best_model_path) if checkpoint.best_model_path else None
    if best_path is not None and best_path.is_file():
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_trained_state(state)
    history = list(module.val_history)
    best_step, best_score = max(history, key=lambda sv: (sv[1], -sv[0])) if history else (0, float("nan"))
    module.net.tower.clear_cache()
    module.cpu().eval()
    return FitResult(best_score=float(best_score), best_step=int(best_step), steps=int(module.global_step),
                     seconds=seconds, checkpoint_path=best_path, history=history)


def _fit_spawned(module: MatcherModule, batches: MatchBatches, *, max_steps: int, eval_every: int, seed: int,
                 out_dir: Path, patience: int | None, logger, accelerator: str, devices: int | str,
                 strategy: str, num_nodes: int) -> FitResult:
    """`fit_matcher` on spawned ranks (DDP: each rank trains on its share of every epoch's
    pairs, gradients averaged). Lightning hands rank 0's final weights back to this process;
    the history comes from rank 0's file, and a budget that ends between evaluations is
    validated here, on one device, like the single-process path does on the trainer."""
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    pl.seed_everything(seed, workers=True, verbose=False)
    checkpoint = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="best", monitor=VAL_METRIC,
                                 mode="max", save_top_k=1, save_weights_only=True,
                                 enable_version_counter=False)
    record = _RankZeroHistory(out_dir / "val_history.json")
    callbacks: list = [checkpoint, record]
    if patience is not None:
        callbacks.append(EarlyStopping(monitor=VAL_METRIC, mode="max", patience=patience,
                                       check_on_train_epoch_end=False))
    eval_every = min(eval_every, max_steps)
    quiet_lightning()
    common = dict(accelerator=accelerator, deterministic=True, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=out_dir)
    trainer = pl.Trainer(max_steps=max_steps, max_epochs=-1, val_check_interval=eval_every,
                         check_val_every_n_epoch=None, num_sanity_val_steps=0, devices=devices,
                         strategy=strategy, num_nodes=num_nodes, callbacks=callbacks,
                         logger=logger if logger is not None else False,
                         log_every_n_steps=max(1, min(10, eval_every)), **common)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")
        trainer.fit(module, datamodule=batches)  # `module` now holds rank 0's final weights
        recorded = json.loads(record.path.read_text())
        history = [(int(step), float(value)) for step, value in recorded["history"]]
        steps = int(recorded["steps"])
        module.val_history = []
        final = None
        if not history or history[-1][0] != steps:
            final = pl.Trainer(devices=1, logger=False, **common)
            final.validate(module, datamodule=batches, verbose=False)
            history.append((steps, module.val_history[-1][1]))
    seconds = time.perf_counter() - started
    best_step, best_score = max(history, key=lambda sv: (sv[1], -sv[0]))
    best_path = out_dir / "checkpoints" / "best.ckpt"
    if final is not None and best_step == steps:  # the final weights, which `module` holds, are best
        final.save_checkpoint(best_path, weights_only=True)
    elif best_path.is_file():
        state = torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_trained_state(state)
    module.val_history = list(history)
    module.net.tower.clear_cache()
    module.cpu().eval()
    return FitResult(best_score=float(best_score), best_step=int(best_step), steps=steps, seconds=seconds,
                     checkpoint_path=best_path if best_path.is_file() else None, history=history)
