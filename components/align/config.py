"""Every choice of the alignment stage as a typed, ablatable parameter (`params.yaml: align`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class AlignConfig(BaseModel):
    """Parameters of `train_alignment`.

    Defaults are the measured choices (synthetic precision@1 and openclipart visual-word
    precision, see the alignment report): plain PCA (whitening hurt badly), ad-side MIL,
    early stopping on held-out training ads, cosine word scores (CSLS did not help), the
    structure-consistency term on with the GW pseudo-target and marginal-KL terms at weight
    0 (they hurt on the synthetic set and were within noise on openclipart).
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = 0

    # --- visual concepts (concepts.py)
    pca_dim: int = Field(128, ge=2, description="PCA dimension of part vectors (clamped to data); "
                         "low dimensions are the low-capacity lever (METHOD 7)")
    whiten_power: float = Field(0.0, le=0, description="PCA axes scaled by eigenvalue^power: "
                                "-0.5 whitens, 0 keeps plain PCA")
    num_concepts: int = Field(256, ge=2, description="K of k-means; clamped to num_parts / 8")
    kmeans_iters: int = Field(25, ge=1)
    pooled_as_part: bool = Field(True, description="the whole-image vector is one more instance")

    # --- words and structures (cooccurrence.py)
    vocab_min_count: int = Field(3, ge=1, description="document frequency in training texts")
    vocab_max_words: int = Field(2000, ge=2)
    vocab_min_length: int = Field(3, ge=1)
    ppmi_context_power: float = Field(0.75, gt=0, le=1, description="context smoothing of PPMI")
    marginal_power: float = Field(0.75, gt=0, le=1, description="GW marginals ∝ freq^power")

    # --- network (network.py)
    hidden_dim: int = Field(512, ge=0, description="0 = a linear map (lowest capacity)")
    dropout: float = Field(0.1, ge=0, lt=1)
    temperature: float = Field(0.1, gt=0, description="tau of every softmax over cosines")

    # --- losses (losses.py); each family switchable
    mil_loss: bool = Field(True, description="multiple-instance ad loss (weak ad-level pairs)")
    mil_ad_weight: float = Field(1.0, ge=0, description="InfoNCE over the ads of a batch")
    mil_word_weight: float = Field(0.0, ge=0, description="InfoNCE over the vocabulary per ad")
    mil_word_prior: bool = Field(True, description="add log word frequency to the word-side "
                                 "logits, so frequent filler words do not pull the mapping")
    structure_loss: bool = Field(True, description="label-free structure consistency")
    gw_target_weight: float = Field(0.0, ge=0, description="CE to the GW coupling's soft targets")
    consistency_weight: float = Field(1.0, ge=0, description="|| S_v - A S_t A^T || on blocks")
    consistency_block: int = Field(64, ge=2, description="concepts per sub-sampled block")
    structure_source: Literal["cooccurrence", "mapped"] = Field(
        "cooccurrence", description="S in the consistency term: the visual co-occurrence "
        "structure of the concepts, or the cosine structure of the mapped concepts")
    marginal_kl_weight: float = Field(0.0, ge=0, description="KL(word freq || predicted usage)")
    entropy_weight: float = Field(0.0, ge=0, description="mean entropy of concept->word rows")

    # --- Gromov-Wasserstein (train.py, stage 1)
    gw_solver: Literal["exact", "entropic"] = "exact"
    gw_epsilon: float = Field(1e-3, gt=0, description="entropic GW only; 1e-2 blurs (STACK.md)")
    gw_restarts: int = Field(5, ge=1, description="random initial couplings; lowest cost kept")
    gw_max_iter: int = Field(500, ge=1)

    # --- optimisation (module.py)
    epochs: int = Field(200, ge=0, description="upper bound; early stopping ends sooner")
    max_steps: int = Field(-1, ge=-1, description="-1 = no step limit")
    batch_size: int = Field(64, ge=2)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    holdout_fraction: float = Field(
        0.1, ge=0, lt=1, description="training ads held out of the MIL loss for early stopping "
        "(label-free: their own titles); 0 = no early stopping")
    val_check_steps: int = Field(10, ge=1, description="held-out check every n training steps")
    patience: int = Field(8, ge=1, description="held-out checks without improvement")
    log_every_n_steps: int = Field(5, ge=1)
    refinement_rounds: int = Field(0, ge=0, description="CSLS mutual-NN self-training rounds")
    refinement_epochs: int = Field(5, ge=1)
    refinement_weight: float = Field(1.0, ge=0)

    # --- translation (model.py)
    word_scoring: Literal["csls", "cosine"] = Field(
        "cosine", description="how a mapped part scores a word: CSLS (hubness-corrected) or cosine")
    words_per_image: int = Field(8, ge=1, description="m: words kept per image")
    min_word_score: float = Field(0.0, description="threshold on the word score")
    csls_k: int = Field(10, ge=1)
    device: str = Field("auto", description="auto | cpu | cuda[:n]")
    num_threads: int = Field(
        1, ge=0, description="torch CPU threads while this stage runs (0 = leave as is); the "
        "network is tiny, and on a busy 2-core box one thread was ~20x faster than two")
