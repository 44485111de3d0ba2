"""Every choice of the alignment stage as a typed, ablatable parameter (`params.yaml: align`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class AlignConfig(BaseModel):
    """Parameters of `train_alignment` (components/align/train.py).

    Defaults are the measured choices (visual-word precision of held-out ads, see the
    README's alignment section and `alignsearch align compare`).
    """

    model_config = ConfigDict(extra="forbid")

    seed: int = 0

    # --- what the alignment may see (docs/method.md#what-the-alignment-may-see)
    click_text: bool = Field(True, description="the ad-level text of a training ad includes the training "
                             "queries with a positive qrel for it (at the run's training fraction); False = "
                             "titles (and captions of title-less sources) only, the strictly label-free variant")
    title_words: bool = Field(False, description="with click_text, the title's words count as ad-level "
                              "text too (False = the click queries alone say what an ad shows; titles "
                              "still do for ads of a title-only or caption source)")
    folds: int = Field(5, ge=0, description="k of the cross-fitting: training ads get words from a model "
                       "that did not see them; 0 or 1 = in-sample words (measured worse)")

    # --- instances and concepts
    pca_dim: int = Field(1280, ge=2, description="PCA dimension of the standardised instance vectors")
    num_concepts: int = Field(256, ge=2, description="K of k-means over parts; clamped to num_parts / 8")
    kmeans_iters: int = Field(25, ge=1)

    # --- words and structures (cooccurrence.py)
    vocab_min_count: int = Field(3, ge=1, description="document frequency in training ad-level texts")
    vocab_max_words: int = Field(2000, ge=2)
    vocab_min_length: int = Field(2, ge=1)
    ppmi_context_power: float = Field(0.75, gt=0, le=1, description="context smoothing of PPMI")
    marginal_power: float = Field(0.75, gt=0, le=1)

    # --- the per-word head (head.py)
    pooling: Literal["pooled", "pooled_parts", "max", "noisy_or", "attention"] = Field(
        "pooled", description="how an image's instances give its word logits: the pooled vector alone, "
        "the pooled vector beside the element-wise max over its parts (pooled_parts), or multiple-instance "
        "pooling of per-instance logits over pooled vector + parts")
    c: float = Field(0.1, gt=0, description="inverse L2 strength of the head (sklearn's C)")
    map_weight: float = Field(1.0, gt=0, description="L2 on the word-vector map A relative to the per-word "
                              "residual U; < 1 ties each word's weights to its word vector")
    max_iter: int = Field(100, ge=1, description="L-BFGS iterations")
    structure_weight: float = Field(0.0, ge=0, description="weight of the label-free structure-consistency "
                                    "term || S_v - P S_t P^T ||^2 (0 = off)")
    structure_temperature: float = Field(1.0, gt=0)
    attention_temperature: float = Field(1.0, gt=0)

    # --- visual neighbours' text voting (neighbours.py)
    neighbours: int = Field(0, ge=0, description="k of the visual-neighbour vote blended with the head "
                            "(0 = the head alone)")
    neighbour_weight: float = Field(0.5, ge=0, le=1, description="share of the vote in the blended "
                                    "word probability")
    neighbour_temperature: float = Field(0.05, gt=0, description="softmax temperature over the "
                                         "neighbours' cosines")

    # --- translation (model.py)
    words_per_image: int = Field(8, ge=1, description="m: words kept per image (the matcher reads the first "
                                 "match.words_per_ad of them)")
    words_shown: int = Field(3, ge=1, description="the first words of the list a person judges (the "
                             "alignment gallery, `align show`; search hits keep the whole list the matcher "
                             "read) and whose precision the reports lead with: an "
                             "openclipart test ad's held-out text has 1.7 tag stems, so over 8 words even an "
                             "oracle reaches only 0.20; capped at words_per_image")
    min_word_score: float = Field(0.0, ge=0, le=1, description="probability threshold of a kept word")
    device: str = Field("auto", description="auto | cpu | cuda[:n]")
    num_threads: int = Field(1, ge=0, description="CPU threads (torch, faiss, BLAS) while the alignment trains: "
                             "a fixed count gives the same words on every machine (parallel sums are "
                             "thread-order dependent); 0 = leave as is (faster on many cores, not reproducible "
                             "across core counts)")
