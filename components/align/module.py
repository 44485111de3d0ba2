"""The LightningModule of the alignment stage: the network f and its losses.

It receives plain config values (`save_hyperparameters`), so a checkpoint reloads on its
own; the fixed arrays it trains against (word vectors, concept centroids, the two
structures, the GW targets) are buffers set once with `set_arrays`.
"""

from __future__ import annotations

import copy

import numpy as np
import pytorch_lightning as pl
import torch

from components.align.config import AlignConfig
from components.align.losses import MILAdLoss, StructureLoss
from components.align.network import AlignmentNetwork

BUFFERS = ("word_vectors", "centroids", "concept_structure", "word_structure", "concept_mass",
           "word_frequency", "targets", "dictionary")


class AlignmentModule(pl.LightningModule):
    """Batches are (instances (B,I,d), mask (B,I), concepts (B,I), titles (B,L)).

    Logged keys: `train/loss`, `train/mil`, `train/mil_ad`, `train/structure`,
    `train/consistency`, ... and `val/loss` on held-out training ads (MIL terms only). The
    best held-out state is kept in memory (`best_state`) for early stopping.
    """

    def __init__(self, cfg: dict, in_dim: int, num_concepts: int, num_words: int,
                 word_dim: int = 384) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = AlignConfig(**cfg)
        c = self.cfg
        self.net = AlignmentNetwork(in_dim, word_dim, c.hidden_dim, c.dropout)
        self.mil = MILAdLoss(c.temperature, c.mil_ad_weight, c.mil_word_weight)
        self.structure = StructureLoss(c.temperature, c.gw_target_weight, c.consistency_weight,
                                       c.marginal_kl_weight, c.entropy_weight,
                                       c.consistency_block, c.structure_source)
        k, v = num_concepts, num_words
        self.register_buffer("word_vectors", torch.zeros(v, word_dim))
        self.register_buffer("centroids", torch.zeros(k, in_dim))
        self.register_buffer("concept_structure", torch.zeros(k, k))
        self.register_buffer("word_structure", torch.zeros(v, v))
        self.register_buffer("concept_mass", torch.ones(k) / k)
        self.register_buffer("word_frequency", torch.ones(v) / v)
        self.register_buffer("targets", torch.zeros(k, v))  # all zero = no GW targets
        self.register_buffer("dictionary", torch.full((k,), -1, dtype=torch.long))  # refinement
        self.best_score = float("inf")
        self.best_step = -1
        self.best_state: dict[str, torch.Tensor] | None = None

    def set_arrays(self, **arrays: np.ndarray) -> None:
        """Fill the fixed buffers (numpy arrays, same shapes as registered)."""
        for name, value in arrays.items():
            if name not in BUFFERS:
                raise KeyError(f"unknown buffer {name!r}; expected one of {BUFFERS}")
            buf = getattr(self, name)
            tensor = torch.as_tensor(np.asarray(value)).to(dtype=buf.dtype, device=buf.device)
            if tensor.shape != buf.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(buf.shape)}")
            buf.copy_(tensor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _losses(self, batch, train: bool) -> dict[str, torch.Tensor]:
        x, mask, concepts, titles = batch
        z = self.net(x)  # (B,I,D)
        c = self.cfg
        terms: dict[str, torch.Tensor] = {}
        loss = z.sum() * 0.0
        if c.mil_loss:
            prior = torch.log(self.word_frequency.clamp_min(1e-12)) if c.mil_word_prior else None
            mil = self.mil(z, mask, self.word_vectors, titles, word_log_prior=prior)
            terms.update(mil)
            loss = loss + mil["mil"]
        if train and c.structure_loss:
            has_targets = bool(self.targets.sum() > 0)
            valid = mask & (concepts >= 0)
            st = self.structure(
                self.net(self.centroids), self.word_vectors,
                concept_structure=self.concept_structure, word_structure=self.word_structure,
                concept_mass=self.concept_mass, word_frequency=self.word_frequency,
                targets=self.targets if has_targets else None,
                mapped_parts=z[valid], part_concepts=concepts[valid])
            terms.update(st)
            loss = loss + st["structure"]
        if train and bool((self.dictionary >= 0).any()) and c.refinement_weight > 0:
            keep = self.dictionary >= 0
            logits = self.net(self.centroids[keep]) @ self.word_vectors.T / c.temperature
            terms["refine"] = torch.nn.functional.cross_entropy(logits, self.dictionary[keep])
            loss = loss + c.refinement_weight * terms["refine"]
        terms["loss"] = loss
        return terms

    def training_step(self, batch, batch_idx):
        terms = self._losses(batch, train=True)
        size = batch[0].shape[0]
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), on_step=True, on_epoch=True,
                     batch_size=size, prog_bar=name == "loss")
        return terms["loss"]

    def validation_step(self, batch, batch_idx):
        terms = self._losses(batch, train=False)
        size = batch[0].shape[0]
        for name, value in terms.items():
            self.log(f"val/{name}", value, on_epoch=True, batch_size=size)
        return terms["loss"]

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        score = self.trainer.callback_metrics.get("val/loss")
        if score is not None and float(score) < self.best_score:
            self.best_score = float(score)
            self.best_step = int(self.global_step)
            self.best_state = copy.deepcopy(self.net.state_dict())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.cfg.lr,
                                 weight_decay=self.cfg.weight_decay)
