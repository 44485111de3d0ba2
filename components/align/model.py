"""The trained alignment: projection, vocabulary, the per-word head, and image -> words.

`AlignmentModel.save(dir)` writes JSON, .npy and safetensors only (no pickle); `load(dir)`
reads them back. `translate` gives each image its most probable words with their
probability and the part each word came from; `word_logits` gives the whole per-word
evidence the matcher's word channel reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from components.align.concepts import assign, instance_vectors
from components.align.head import Projection, WordHead, predict_logits
from components.align.neighbours import NeighbourMemory, blend_logits
from components.text.stems import word_stem
from components.vision.parts import PartsFeatures

MODEL_FILE = "alignment.json"
HEAD_FILE = "head.safetensors"
ARRAY_FILES = ("projection_mean", "projection_scale", "projection_components", "centroids",
               "concept_means", "word_vectors", "word_logit_means")
NEIGHBOUR_FILES = ("neighbour_vectors", "neighbour_labels")  # present when the model votes by neighbours
FORMAT_VERSION = 2
WHOLE_IMAGE = 0  # instance index of the pooled vector


def words_shown_of(meta: dict) -> int:
    """How many of an ad's words a person sees, from an alignment's `alignment.json`; a model
    saved before `words_shown` existed showed its whole list."""
    return int(meta.get("words_shown", meta["words_per_image"]))


def read_words_shown(model_dir: Path) -> int:
    """`words_shown` of a saved alignment, without loading its arrays."""
    return words_shown_of(json.loads((Path(model_dir) / MODEL_FILE).read_text()))


def near_duplicates(a: str, b: str, min_prefix: int = 5) -> bool:
    """Same stem, or one stem a prefix (>= `min_prefix` letters) of the other."""
    sa, sb = word_stem(a), word_stem(b)
    if sa == sb:
        return True
    short, long = sorted((sa, sb), key=len)
    return len(short) >= min_prefix and long.startswith(short)


@dataclass(frozen=True)
class VisualWord:
    """One aligned word of an image: its probability and the instance it came from
    (0 = the whole image, j >= 1 = part j-1 of `PartsFeatures.parts`)."""

    word: str
    score: float
    part: int = WHOLE_IMAGE


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))


def select_words(logits: np.ndarray, sources: np.ndarray, words: list[str], limit: int,
                 min_score: float) -> list[VisualWord]:
    """The `limit` most probable words of one image (V,) above `min_score`, near-duplicates
    (plurals, shared stems) dropped."""
    order = np.argsort(-logits, kind="stable")
    kept: list[VisualWord] = []
    for j in order:
        p = float(sigmoid(logits[j]))
        if p < min_score or len(kept) == limit:
            break
        if any(near_duplicates(words[j], k.word) for k in kept):
            continue
        kept.append(VisualWord(words[j], p, int(sources[j])))
    return kept


@dataclass
class AlignmentModel:
    """Everything needed to turn part features into words; see `translate`."""

    projection: Projection
    words: list[str]  # vocabulary (V)
    word_counts: list[int]  # ads whose training text holds the word
    word_vectors: np.ndarray  # (V, 384) MiniLM vectors of the words, unit norm
    head: WordHead
    centroids: np.ndarray  # (K, d) unit-norm visual concepts (spherical k-means of projected parts)
    concept_means: np.ndarray  # (K, d) the mean projected part of each concept (what the head scores)
    word_logit_means: np.ndarray  # (V,) mean training logit of each word (the channel is centred on it)
    words_per_image: int = 8
    min_word_score: float = 0.0
    words_shown: int = 3  # the first words a person sees (AlignConfig.words_shown)
    pooled_as_part: bool = True
    config: dict = field(default_factory=dict)
    neighbours: NeighbourMemory | None = None  # the training images' vote (neighbours.py), if used

    # ------------------------------------------------------------------ instances

    def instances(self, parts: PartsFeatures) -> tuple[np.ndarray, np.ndarray]:
        """Projected instances (N, I, d) and mask (N, I); slot 0 is the pooled vector."""
        vectors, mask = instance_vectors(parts, True)
        z = self.projection.apply(vectors)
        z[~mask] = 0.0
        return z, mask

    # ------------------------------------------------------------------ outputs

    def word_logits(self, parts: PartsFeatures) -> np.ndarray:
        """(N, V) per-image logit of every word."""
        z, mask = self.instances(parts)
        return self._evidence(z, mask)

    def _evidence(self, z: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The head's logits, blended with the neighbours' vote when the model has one."""
        logits = predict_logits(self.head, z, mask)
        if self.neighbours is None:
            return logits
        k, temperature = int(self.config["neighbours"]), float(self.config["neighbour_temperature"])
        votes = self.neighbours.votes(z[:, 0], k, temperature)
        return blend_logits(logits, votes, float(self.config["neighbour_weight"]))

    def word_sources(self, parts: PartsFeatures) -> np.ndarray:
        """(N, V) the instance each word responds to most (0 = the whole image)."""
        return self._sources(*self.instances(parts))

    def logits_and_sources(self, parts: PartsFeatures) -> tuple[np.ndarray, np.ndarray]:
        """`word_logits` and `word_sources` from one projection of the instances."""
        z, mask = self.instances(parts)
        return self._evidence(z, mask), self._sources(z, mask)

    @torch.inference_mode()
    def _sources(self, z: np.ndarray, mask: np.ndarray) -> np.ndarray:
        out = np.zeros((len(z), len(self.words)), np.int64)
        for start in range(0, len(z), 512):
            sl = slice(start, start + 512)
            out[sl] = self.head.source_instances(torch.as_tensor(z[sl]),
                                                 torch.as_tensor(mask[sl])).numpy()
        return out

    @torch.inference_mode()
    def word_parts(self, parts: PartsFeatures, words: list[list[str]]) -> np.ndarray:
        """(N, W) for image i's words `words[i]` (W = the longest list): the index into
        `parts.parts[i]` of the part the head scores highest for that word; -1 where the image
        has no valid part, the word is not in the vocabulary, or past the list's end.

        A part is scored as the head scores an instance, z_part . w (the word's visual weights;
        its bias is the same for every part, so left out). With `pooled_parts`, whose weights
        have one half for the pooled vector and one for the element-wise max over parts, the
        part half alone: the part that carries the word most through the max. The neighbour
        vote, if the model has one, is image-level and takes no part here."""
        z, mask = self.instances(parts)  # (N, I, d), slot 0 = the pooled vector
        width = max((len(ws) for ws in words), default=0)
        out = np.full((len(z), width), -1, np.int64)
        if width == 0 or z.shape[1] < 2:
            return out
        row = {w: j for j, w in enumerate(self.words)}
        index = np.full((len(z), width), -1, np.int64)
        for i, ws in enumerate(words):
            index[i, :len(ws)] = [row.get(w, -1) for w in ws]
        weights = self.head.weights()  # (V, F)
        if self.head.pooling == "pooled_parts":
            weights = weights[:, self.head.in_dim:]  # (V, d): the half that reads the parts
        for start in range(0, len(z), 512):
            sl = slice(start, start + 512)
            z_parts = torch.as_tensor(z[sl, 1:])  # (B, P, d)
            part_mask = torch.as_tensor(mask[sl, 1:])  # (B, P)
            chosen = torch.as_tensor(index[sl])  # (B, W)
            scores = torch.einsum("bpd,bwd->bpw", z_parts, weights[chosen.clamp(min=0)])  # (B, P, W)
            best = scores.masked_fill(~part_mask[:, :, None], float("-inf")).argmax(dim=1)  # (B, W)
            known = (chosen >= 0) & part_mask.any(dim=1, keepdim=True)
            out[sl] = torch.where(known, best, torch.full_like(best, -1)).numpy()
        return out

    def translate_logits(self, logits: np.ndarray, sources: np.ndarray | None = None,
                         words_per_image: int | None = None,
                         min_word_score: float | None = None) -> list[list[VisualWord]]:
        """`translate` from precomputed (N, V) logits (e.g. out-of-fold ones)."""
        m = self.words_per_image if words_per_image is None else words_per_image
        threshold = self.min_word_score if min_word_score is None else min_word_score
        sources = np.zeros(logits.shape, np.int64) if sources is None else sources
        return [select_words(row, src, self.words, m, threshold) for row, src in zip(logits, sources, strict=True)]

    def translate(self, parts: PartsFeatures, words_per_image: int | None = None,
                  min_word_score: float | None = None) -> list[list[VisualWord]]:
        """Per image, up to m visual words, most probable first, with their probability and
        the part they came from."""
        return self.translate_logits(*self.logits_and_sources(parts), words_per_image, min_word_score)

    def concept_words(self, top: int = 1) -> list[list[tuple[str, float]]]:
        """Per visual concept, its `top` (word, probability) pairs: the head applied to the
        concept's mean part."""
        with torch.inference_mode():
            logits = self.head.instance_logits(torch.as_tensor(self.concept_means)).numpy()
        order = np.argsort(-logits, axis=1, kind="stable")[:, :top]
        return [[(self.words[j], float(sigmoid(logits[c, j]))) for j in row] for c, row in enumerate(order)]

    def assign_concepts(self, parts: PartsFeatures) -> np.ndarray:
        """(N, P) concept of each region of `parts.parts` (the pooled vector excluded); -1 where
        the region is masked."""
        z = self.projection.apply(parts.parts)
        z = z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
        out = assign(z, self.centroids)
        out[~parts.mask.astype(bool)] = -1
        return out

    # ------------------------------------------------------------------ persistence

    def save(self, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        arrays = {"projection_mean": self.projection.mean, "projection_scale": self.projection.scale,
                  "projection_components": self.projection.components, "centroids": self.centroids,
                  "concept_means": self.concept_means, "word_vectors": self.word_vectors,
                  "word_logit_means": self.word_logit_means}
        for name, value in arrays.items():
            np.save(out_dir / f"{name}.npy", np.asarray(value, dtype=np.float32))
        if self.neighbours is not None:
            vectors_file, labels_file = NEIGHBOUR_FILES
            np.save(out_dir / f"{vectors_file}.npy", self.neighbours.vectors.astype(np.float32))
            np.save(out_dir / f"{labels_file}.npy", self.neighbours.labels.astype(np.uint8))
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(out_dir / HEAD_FILE))
        meta = {
            "format_version": FORMAT_VERSION,
            "words": list(self.words), "word_counts": [int(c) for c in self.word_counts],
            "head": {"in_dim": self.head.in_dim, "pooling": self.head.pooling,
                     "attention_temperature": self.head.attention_temperature},
            "words_per_image": self.words_per_image, "min_word_score": self.min_word_score,
            "words_shown": self.words_shown, "config": self.config,
        }
        (out_dir / MODEL_FILE).write_text(json.dumps(meta, indent=1))
        return out_dir

    @classmethod
    def load(cls, model_dir: Path, device: str | torch.device = "cpu") -> AlignmentModel:
        model_dir = Path(model_dir)
        meta = json.loads((model_dir / MODEL_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{model_dir}: alignment format {meta.get('format_version')} "
                             f"is not {FORMAT_VERSION}")
        arrays = {name: np.load(model_dir / f"{name}.npy", allow_pickle=False) for name in ARRAY_FILES}
        head_cfg = meta["head"]
        head = WordHead(int(head_cfg["in_dim"]), arrays["word_vectors"], head_cfg["pooling"],
                        float(head_cfg["attention_temperature"]))
        head.load_state_dict(load_file(str(model_dir / HEAD_FILE)))
        head.to(device).eval()
        projection = Projection(arrays["projection_mean"], arrays["projection_scale"],
                                arrays["projection_components"])
        neighbours = None
        if (model_dir / f"{NEIGHBOUR_FILES[0]}.npy").exists():
            vectors, labels = (np.load(model_dir / f"{name}.npy", allow_pickle=False) for name in NEIGHBOUR_FILES)
            neighbours = NeighbourMemory(vectors, labels)
        return cls(projection=projection, words=list(meta["words"]), word_counts=list(meta["word_counts"]),
                   word_vectors=arrays["word_vectors"], head=head, centroids=arrays["centroids"],
                   concept_means=arrays["concept_means"], word_logit_means=arrays["word_logit_means"],
                   words_per_image=int(meta["words_per_image"]), min_word_score=float(meta["min_word_score"]),
                   words_shown=words_shown_of(meta), config=meta.get("config", {}), neighbours=neighbours)
