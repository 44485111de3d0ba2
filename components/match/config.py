"""Configuration of the matcher and its baselines (the `match` section of params.yaml).

One config for every system, so trained systems share the budget, the learning-rate
grid, the head-LR rule and the loss: the comparison is fair by construction.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class MatchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seed: int = 0
    train_fraction: float = Field(1.0, gt=0, le=1, description="share of training queries used")

    # Optimisation: the same for every trained system.
    lr: float | None = Field(None, gt=0, description="None = pick from lr_grid on the valid split")
    lr_grid: list[float] = [3e-5, 1e-4, 3e-4, 1e-3]
    head_lr_multiplier: float = Field(
        1.0, gt=0, description="new, randomly initialised layers (e.g. the fusion head) get lr x this; "
        "on openclipart val/ndcg@10 of implicit_fusion was 0.57 at x10, 0.64 at x3, 0.65 at x1")
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1, description="linear warm-up share of max_steps")
    batch_size: int = Field(64, ge=2)
    max_steps: int = Field(300, ge=1, description="the training budget, equal for all trained systems")
    eval_every: int = Field(50, ge=1, description="validate (and maybe checkpoint) every this many steps")
    patience: int | None = Field(
        None, ge=1, description="stop after this many evaluations without a better val/ndcg@10; None = use the whole budget")
    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature (scale 20, as sentence-transformers)")
    symmetric_loss: bool = Field(True, description="add the ad -> query InfoNCE direction")

    # What clicks say (qrels from `alignsearch traffic ingest`, docs/traffic.md#from-events-to-a-dataset).
    click_weights: bool = Field(True, description="weight each positive pair's loss by its qrels `weight` "
                                "(the clicks' inverse-propensity weight); false: every positive counts 1")
    explicit_negatives: bool = Field(True, description="qrels with relevance 0 (shown, skipped) join the "
                                     "batch as extra negatives of their query")

    # Warm start: a scheduled retrain continues from the champion instead of starting over.
    warm_start: bool = Field(True, description="the scheduled loop starts the matcher from the champion's "
                             "weights and learning rate (no learning-rate search); false: a cold run")
    warm_start_steps: int = Field(100, ge=1, description="training steps of a warm-started matcher")

    # Encoder.
    trainable_layers: int = Field(
        2, ge=0, le=6, description="top MiniLM layers fine-tuned (the rest is frozen and cached); 6 = all")
    max_query_len: int = Field(16, ge=4)
    max_ad_len: int = Field(48, ge=4)
    device: str = Field("auto", description="auto | cpu | cuda")

    # How `ours` (and `implicit_fusion_words`) read the aligned words.
    words_per_ad: int = Field(5, ge=0, description="m: aligned words appended to the title, most confident first")
    word_min_score: float = Field(0.0, ge=0, le=1, description="words below this probability stay out of the text")
    words_skip_title: bool = Field(False, description="leave out words whose stem is already in the title")
    word_dropout: float = Field(0.3, ge=0, lt=1, description="word-field dropout: a training ad's text is its "
                                "title alone with this probability")
    word_channel: bool = Field(True, description="ours scores query words against the ad's per-word visual "
                               "evidence too, with a learned weight (components/match/words.py)")
    word_channel_init: float = Field(0.05, gt=0, description="initial weight of the word channel")
    word_channel_lr: float = Field(0.01, gt=0, description="learning rate of the channel's weight (one scalar)")
    word_channel_joint: bool = Field(True, description="train the channel's weight with the matcher; False = the "
                                     "matcher trains on the ad text alone and the channel joins after "
                                     "training, calibrated (needs word_channel_calibration)")
    word_channel_calibration: bool = Field(True, description="after training, fuse the text and channel "
                                           "scores as per-query z-scores with a weight picked on valid "
                                           "(still one inner product; components/match/words.py)")
    word_channel_weights: list[float] = Field([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0], min_length=1,
                                              description="the calibration's weight grid")

    # implicit_fusion head.
    fusion: Literal["residual", "concat"] = Field(
        "residual", description="residual: normalise(title + image); concat: linear([title; image])")
    fusion_query: Literal["learned", "title"] = Field(
        "learned", description="attention-pooling query over parts: learned vector, or + title-conditioned")
    fusion_dropout: float = Field(0.3, ge=0, lt=1, description="dropout on image features and the head output")
    fusion_hidden: int = Field(384, ge=8)

    # late_fusion.
    late_fusion_weights: list[float] = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0]
    late_fusion_c: list[float] = [0.01, 0.03, 0.1]
    late_fusion_max_iter: int = Field(
        100, ge=1, description="L-BFGS iterations of the probe (100 ranks as well as 300 on openclipart)")
    late_fusion_pca: int | None = Field(None, ge=2, description="PCA dims of the standardised pooled vector; None = off")

    # lexical.
    bm25_k1: float = Field(1.2, gt=0)
    bm25_b: float = Field(0.75, ge=0, le=1)

    # Distribution: passed to Lightning's Trainer as they are (a GPU worker needs no change).
    accelerator: str = Field("auto", description="Lightning accelerator: auto | cpu | gpu | cuda | mps; "
                             "auto follows `device`")
    devices: int | str = Field("auto", description="devices per node: auto (1 on CPU, every GPU), a "
                               "number, or a list such as '0,1'")
    strategy: str = Field("auto", description="auto | ddp_spawn | ddp_fork | ddp ...; with more than one "
                          "process, auto and ddp become ddp_spawn (only the calling process goes on after fit)")
    num_nodes: int = Field(1, ge=1, description="machines taking part in one training")

    @model_validator(mode="after")
    def _check(self) -> MatchConfig:
        if not self.lr_grid:
            raise ValueError("lr_grid must not be empty")
        if not self.late_fusion_weights or not self.late_fusion_c:
            raise ValueError("late_fusion_weights and late_fusion_c must not be empty")
        return self
