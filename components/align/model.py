"""The trained alignment: whitening, concepts, vocabulary, network, and image -> words.

`AlignmentModel.save(dir)` writes JSON, .npy and .npz only (no pickle); `load(dir)` reads
them back. `translate` picks each image's words by CSLS (cross-domain similarity local
scaling, Conneau et al. 2018), which discounts hub words close to everything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from components.align.concepts import Whitening, assign, instance_vectors
from components.align.network import AlignmentNetwork
from components.vision.parts import PartsFeatures

MODEL_FILE = "alignment.json"
ARRAY_FILES = ("whitening_mean", "whitening_matrix", "centroids", "word_vectors", "word_hubness")
NETWORK_FILE = "network.npz"
FORMAT_VERSION = 1


def top_k_mean(sims: np.ndarray, k: int) -> np.ndarray:
    """Mean of the k largest values of each row: (n, m) -> (n,)."""
    k = max(1, min(k, sims.shape[1]))
    part = np.partition(sims, sims.shape[1] - k, axis=1)[:, -k:]
    return part.mean(axis=1)


def csls_scores(queries: np.ndarray, words: np.ndarray, word_hubness: np.ndarray,
                k: int) -> np.ndarray:
    """CSLS(x, w) = 2 cos(x, w) - r_x - r_w: (n, D), (V, D), (V,) -> (n, V).

    r_x = mean cosine of x to its k nearest words; r_w (`word_hubness`) = mean cosine of w
    to its k nearest mapped visual instances.
    """
    cos = queries @ words.T
    r_x = top_k_mean(cos, k)
    return 2.0 * cos - r_x[:, None] - word_hubness[None, :]


def word_stem(word: str) -> str:
    """A crude lemma: possessive and plural endings off ("boxes" -> "box", "berries" -> "berry")."""
    w = word.lower().removesuffix("'s")
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("es") and w[:-2].endswith(("s", "x", "z", "ch", "sh")):
        return w[:-2]
    if len(w) > 3 and w.endswith("s") and not w.endswith(("ss", "us", "is")):
        return w[:-1]
    return w


def near_duplicates(a: str, b: str, min_prefix: int = 5) -> bool:
    """Same stem, or one stem a prefix (>= `min_prefix` letters) of the other."""
    sa, sb = word_stem(a), word_stem(b)
    if sa == sb:
        return True
    short, long = sorted((sa, sb), key=len)
    return len(short) >= min_prefix and long.startswith(short)


def dedupe(ranked: list[tuple[str, float]], limit: int) -> list[tuple[str, float]]:
    """The first `limit` words of a best-first list, dropping near-duplicates of kept ones."""
    kept: list[tuple[str, float]] = []
    for word, score in ranked:
        if any(near_duplicates(word, k) for k, _ in kept):
            continue
        kept.append((word, score))
        if len(kept) == limit:
            break
    return kept


@dataclass
class AlignmentModel:
    """Everything needed to turn part features into words; see `translate`."""

    whitening: Whitening
    centroids: np.ndarray  # (K, d) unit-norm visual concepts in whitened space
    words: list[str]  # vocabulary (V)
    word_counts: list[int]
    word_vectors: np.ndarray  # (V, 384) MiniLM vectors of the words, unit norm
    network: AlignmentNetwork
    word_hubness: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))  # (V,) r_w
    words_per_image: int = 8
    min_word_score: float = 0.0
    csls_k: int = 10
    word_scoring: str = "csls"  # or "cosine"
    pooled_as_part: bool = True
    config: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ mapping

    @torch.inference_mode()
    def map(self, whitened: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Whitened vectors (n, d) -> unit vectors in word space (n, 384)."""
        self.network.eval()
        device = next(self.network.parameters()).device
        out = np.zeros((len(whitened), self.network.out_dim), np.float32)
        for start in range(0, len(whitened), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(whitened[start:start + batch_size]))
            out[start:start + batch_size] = self.network(chunk.to(device)).float().cpu().numpy()
        return out

    def instances(self, parts: PartsFeatures) -> tuple[np.ndarray, np.ndarray]:
        """Whitened instances (N, I, d) and mask (N, I) (slot 0 pooled when `pooled_as_part`)."""
        vectors, mask = instance_vectors(parts, self.pooled_as_part)
        return self.whitening.apply(vectors), mask

    def mapped_instances(self, parts: PartsFeatures) -> tuple[np.ndarray, np.ndarray]:
        """Mapped instances (N, I, 384) and mask (N, I)."""
        z, mask = self.instances(parts)
        n, i, d = z.shape
        return self.map(z.reshape(n * i, d)).reshape(n, i, -1), mask

    def concept_vectors(self) -> np.ndarray:
        """(K, 384) mapped concept centroids."""
        return self.map(self.centroids)

    def fit_hubness(self, mapped_reference: np.ndarray) -> np.ndarray:
        """Set r_w (mean cosine of each word to its `csls_k` nearest mapped training
        instances, (n, 384)) and return it."""
        k = max(1, min(self.csls_k, len(mapped_reference)))
        best = np.full((len(self.words), k), -np.inf, np.float32)  # running top-k per word
        for start in range(0, len(mapped_reference), 8192):
            sims = self.word_vectors @ mapped_reference[start:start + 8192].T  # (V, c)
            both = np.concatenate([best, sims], axis=1)
            best = np.partition(both, both.shape[1] - k, axis=1)[:, -k:]
        self.word_hubness = best.mean(axis=1).astype(np.float32)
        return self.word_hubness

    # ------------------------------------------------------------------ outputs

    def score(self, mapped: np.ndarray) -> np.ndarray:
        """Word scores of mapped vectors (n, 384) -> (n, V): CSLS or cosine (`word_scoring`)."""
        if self.word_scoring == "cosine":
            return mapped @ self.word_vectors.T
        return csls_scores(mapped, self.word_vectors, self.word_hubness, self.csls_k)

    def word_scores(self, parts: PartsFeatures, batch_images: int = 256) -> np.ndarray:
        """(N, V) per image, the best CSLS score of each word over the image's parts."""
        out = np.zeros((len(parts), len(self.words)), np.float32)
        for start in range(0, len(parts), batch_images):
            chunk = parts.take(np.arange(start, min(start + batch_images, len(parts))))
            mapped, mask = self.mapped_instances(chunk)  # (n,I,D), (n,I)
            n, i, d = mapped.shape
            scores = self.score(mapped.reshape(n * i, d)).reshape(n, i, -1)
            scores[~mask] = -np.inf
            out[start:start + n] = scores.max(axis=1)
        return out

    def translate(self, parts: PartsFeatures, words_per_image: int | None = None,
                  min_word_score: float | None = None) -> list[list[tuple[str, float]]]:
        """Per image, up to m (word, score) pairs, best first: word scores (CSLS by default)
        maxed over the image's parts (pooled vector included), above `min_word_score`,
        near-duplicates (plurals, shared stems) dropped."""
        m = self.words_per_image if words_per_image is None else words_per_image
        threshold = self.min_word_score if min_word_score is None else min_word_score
        scores = self.word_scores(parts)
        out = []
        for row in scores:
            order = np.argsort(-row, kind="stable")[: 4 * m + 8]
            ranked = [(self.words[j], float(row[j])) for j in order if row[j] >= threshold]
            out.append(dedupe(ranked, m))
        return out

    def concept_words(self, top: int = 1) -> list[list[tuple[str, float]]]:
        """Per visual concept, its `top` (word, score) pairs for the mapped centroid."""
        scores = self.score(self.concept_vectors())
        order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
        return [[(self.words[j], float(scores[c, j])) for j in row] for c, row in enumerate(order)]

    def assign_concepts(self, parts: PartsFeatures) -> np.ndarray:
        """(N, P) concept of each region of `parts.parts` (the pooled vector excluded); -1 where
        the region is masked."""
        z = self.whitening.apply(parts.parts)
        out = assign(z, self.centroids)
        out[~parts.mask.astype(bool)] = -1
        return out

    # ------------------------------------------------------------------ persistence

    def save(self, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        arrays = {"whitening_mean": self.whitening.mean, "whitening_matrix": self.whitening.matrix,
                  "centroids": self.centroids, "word_vectors": self.word_vectors,
                  "word_hubness": self.word_hubness}
        for name, value in arrays.items():
            np.save(out_dir / f"{name}.npy", np.asarray(value, dtype=np.float32))
        state = {k: v.detach().cpu().numpy() for k, v in self.network.state_dict().items()}
        np.savez(out_dir / NETWORK_FILE, **state)
        meta = {
            "format_version": FORMAT_VERSION,
            "words": list(self.words), "word_counts": [int(c) for c in self.word_counts],
            "network": {"in_dim": self.network.in_dim, "out_dim": self.network.out_dim,
                        "hidden_dim": self.network.hidden_dim},
            "words_per_image": self.words_per_image, "min_word_score": self.min_word_score,
            "csls_k": self.csls_k, "word_scoring": self.word_scoring,
            "pooled_as_part": self.pooled_as_part, "config": self.config,
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
        arrays = {name: np.load(model_dir / f"{name}.npy", allow_pickle=False)
                  for name in ARRAY_FILES}
        net_cfg = meta["network"]
        network = AlignmentNetwork(net_cfg["in_dim"], net_cfg["out_dim"], net_cfg["hidden_dim"])
        with np.load(model_dir / NETWORK_FILE, allow_pickle=False) as data:
            state = {k: torch.from_numpy(data[k]) for k in data.files}
        network.load_state_dict(state)
        network.to(device).eval()
        return cls(whitening=Whitening(arrays["whitening_mean"], arrays["whitening_matrix"]),
                   centroids=arrays["centroids"], words=list(meta["words"]),
                   word_counts=list(meta["word_counts"]), word_vectors=arrays["word_vectors"],
                   network=network, word_hubness=arrays["word_hubness"],
                   words_per_image=int(meta["words_per_image"]),
                   min_word_score=float(meta["min_word_score"]), csls_k=int(meta["csls_k"]),
                   word_scoring=str(meta["word_scoring"]),
                   pooled_as_part=bool(meta["pooled_as_part"]), config=meta.get("config", {}))
