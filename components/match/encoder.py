"""The text tower of every MiniLM system: all-MiniLM-L6-v2, mean pooling, L2 norm.

Query and ad towers share these weights (a symmetric two-tower model: the ad side can be
indexed in faiss). Only the top `trainable_layers` transformer layers are fine-tuned; the
embeddings and the bottom layers are frozen, so their output per text never changes and
is computed once and cached (`cache_texts`). A training step then runs only the top
layers, on packed tokens (no compute on padding): on 2 CPU cores that is what makes a
fine-tune of 300 steps x 64 pairs fit in about a minute (a full fine-tune: ~90 pairs/s).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from components.match.data import normalize_text
from components.text.encoder import EMBEDDING_DIM, load_minilm, mean_pool

log = logging.getLogger(__name__)

_PREFIX_BATCH = 128


@dataclass
class TowerConfig:
    trainable_layers: int = 2
    max_query_len: int = 16
    max_ad_len: int = 48


def load_minilm_eager():
    """(tokenizer, model) of the bundled MiniLM with eager attention, the plain softmax(QK^T)V
    that `packed_layer` reproduces (so the HF forward is an exact reference for it); a fresh
    copy of the weights each call."""
    return load_minilm("cpu", attn_implementation="eager")


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B,T) 1/0 -> (B,1,1,T): 0 where attended, a large negative number on padding."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


@dataclass
class Packing:
    """Where the real tokens of B texts sit in a padded (B,T) grid.

    Linear layers (most of the cost) run on the N real tokens only, "packed" as (N,D);
    attention re-pads them. Titles average 5.5 tokens but a batch pads to its longest
    (up to 21), so packing roughly halves a step.
    """

    lengths: torch.Tensor  # (B,) tokens per text
    flat_index: torch.Tensor  # (N,) positions b*T+t of the real tokens
    seq_id: torch.Tensor  # (N,) the text each real token belongs to
    mask: torch.Tensor  # (B,1,1,T) additive attention mask

    @classmethod
    def of(cls, lengths: torch.Tensor, dtype: torch.dtype) -> Packing:
        batch, width = len(lengths), int(lengths.max()) if len(lengths) else 0
        grid = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]  # (B,T)
        flat_index = grid.flatten().nonzero().squeeze(1)
        seq_id = torch.repeat_interleave(torch.arange(batch, device=lengths.device), lengths)
        return cls(lengths, flat_index, seq_id, additive_mask(grid.long(), dtype))

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def width(self) -> int:
        return self.mask.shape[-1]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N,D) -> (B,T,D) with zeros on padding."""
        out = x.new_zeros(self.batch * self.width, x.shape[-1]).index_copy(0, self.flat_index, x)
        return out.view(self.batch, self.width, x.shape[-1])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B,T,D) -> (N,D)."""
        return x.reshape(self.batch * self.width, x.shape[-1])[self.flat_index]

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of each text's tokens: (N,D) -> (B,D) (= `mean_pool` on the padded grid)."""
        total = x.new_zeros(self.batch, x.shape[-1]).index_add(0, self.seq_id, x)
        return total / self.lengths.clamp(min=1)[:, None].to(x.dtype)


def packed_layer(layer: nn.Module, x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """One BertLayer on packed tokens (N,384) -> (N,384): the eager layer's exact computation
    (attention, dropouts, residuals, LayerNorms), with its linear layers on real tokens only."""
    attn = layer.attention.self
    heads, head_dim = attn.num_attention_heads, attn.attention_head_size

    def split_heads(t: torch.Tensor) -> torch.Tensor:  # (N,D) -> (B,h,T,d)
        return packing.pad(t).view(packing.batch, packing.width, heads, head_dim).transpose(1, 2)

    q, k, v = split_heads(attn.query(x)), split_heads(attn.key(x)), split_heads(attn.value(x))
    weights = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + packing.mask  # (B,h,T,T)
    weights = attn.dropout(weights.softmax(dim=-1))
    context = torch.matmul(weights, v).transpose(1, 2).reshape(packing.batch, packing.width, -1)  # (B,T,D)
    attended = layer.attention.output(packing.unpad(context), x)  # dense, dropout, residual, LN
    return layer.output(layer.intermediate(attended), attended)  # (N,D)


class PaddedTextTower(nn.Module):
    """MiniLM on a padded (B,T) batch, mean pooled and L2-normalised: the eager layers'
    computation that `packed_layer` runs on packed tokens, with padding masked instead of
    removed. Plain tensor ops end to end, so it traces to ONNX (`components.search.onnx_query`)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.bert.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))  # (B,T,D)
        mask = additive_mask(attention_mask, x.dtype)
        for layer in self.bert.encoder.layer:
            attn = layer.attention.self
            shape = (x.shape[0], -1, attn.num_attention_heads, attn.attention_head_size)
            q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (attn.query, attn.key, attn.value))  # (B,h,T,d)
            weights = torch.matmul(q, k.transpose(2, 3)) * attn.scaling + mask
            context = torch.matmul(weights.softmax(dim=-1), v).transpose(1, 2).reshape(x.shape[0], -1, x.shape[-1])
            attended = layer.attention.output(context, x)  # dense, dropout, residual, LN
            x = layer.output(layer.intermediate(attended), attended)
        keep = attention_mask.unsqueeze(-1).to(x.dtype)
        return F.normalize((x * keep).sum(1) / keep.sum(1).clamp(min=1.0), dim=-1)


# Frozen-prefix states shared by every tower built from the bundled weights in this process
# (the frozen layers never change, so LR-grid runs, seeds and systems reuse them):
# (device, num_frozen, max_length, text) -> (L,384).
_SHARED_PREFIX: dict[tuple[str, int, int, str], torch.Tensor] = {}


def reset_shared_prefix() -> None:
    """Forget the process-wide frozen-prefix states. A state's last bits depend on which texts
    shared its batch (GEMM blocking, up to ~2e-6 measured), so work that must give the same
    numbers wherever it runs (a benchmark cell, in process or on a Dask worker) starts empty."""
    _SHARED_PREFIX.clear()


class TextTower(nn.Module):
    """MiniLM sentence embeddings: frozen prefix (embeddings + bottom layers) then the
    trainable top layers.

    `encode_text(texts, max_length)` -> (B,384). Frozen-prefix states of texts registered
    with `cache_texts` are computed once and reused; other texts go through the whole
    model. Either way the numbers equal the unmodified HF forward (tested).
    """

    def __init__(self, cfg: TowerConfig | None = None, tokenizer=None, bert=None) -> None:
        super().__init__()
        self.cfg = cfg or TowerConfig()
        # Towers on the bundled weights share the process-wide prefix cache; a caller's own
        # model gets a private one.
        self.shared_prefix = tokenizer is None or bert is None
        if self.shared_prefix:
            tokenizer, bert = load_minilm_eager()
        self.tokenizer = tokenizer
        self.bert = bert
        num_layers = len(bert.encoder.layer)
        if not 0 <= self.cfg.trainable_layers <= num_layers:
            raise ValueError(f"trainable_layers must be in [0, {num_layers}], got {self.cfg.trainable_layers}")
        self.num_frozen = num_layers - self.cfg.trainable_layers
        for p in self.bert.parameters():
            p.requires_grad_(False)
        for layer in self.top_layers:
            for p in layer.parameters():
                p.requires_grad_(True)
        # The bundled copy comes in eval mode: start in training mode like any new module
        # (top layers with dropout), whatever the shared prefix cache already holds.
        self.train()
        self._private_prefix: dict[tuple[str, int, int, str], torch.Tensor] = {}

    # -- structure --------------------------------------------------------------------------

    @property
    def top_layers(self) -> list[nn.Module]:
        return list(self.bert.encoder.layer[self.num_frozen:])

    @property
    def bottom_layers(self) -> list[nn.Module]:
        return list(self.bert.encoder.layer[:self.num_frozen])

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors fine-tuning can change (the rest equals the bundled model)."""
        prefix = "bert.encoder.layer."
        keep = {f"{prefix}{i}." for i in range(self.num_frozen, len(self.bert.encoder.layer))}
        return {k: v for k, v in self.state_dict().items() if any(k.startswith(p) for p in keep)}

    @property
    def device(self) -> torch.device:
        return next(self.bert.parameters()).device

    def train(self, mode: bool = True) -> TextTower:
        """Frozen layers always stay in eval mode (no dropout): they match their cache."""
        super().train(mode)
        self.bert.embeddings.eval()
        for layer in self.bottom_layers:
            layer.eval()
        return self

    # -- the frozen prefix ------------------------------------------------------------------------

    @property
    def _prefix(self) -> dict[tuple[str, int, int, str], torch.Tensor]:
        return _SHARED_PREFIX if self.shared_prefix else self._private_prefix

    def _key(self, max_length: int, text: str) -> tuple[str, int, int, str]:
        return (str(self.device), self.num_frozen, max_length, text)

    @torch.no_grad()
    def _compute_prefix(self, texts: list[str], max_length: int) -> list[torch.Tensor]:
        """Embeddings + frozen layers of each text: a list of (L_i,384)."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        result: dict[int, torch.Tensor] = {}
        for start in range(0, len(order), _PREFIX_BATCH):
            rows = order[start:start + _PREFIX_BATCH]
            batch = self.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                   max_length=max_length, return_tensors="pt").to(self.device)
            embedded = self.bert.embeddings(input_ids=batch["input_ids"],
                                            token_type_ids=batch.get("token_type_ids"))  # (B,T,D)
            packing = Packing.of(batch["attention_mask"].sum(1), embedded.dtype)
            x = packing.unpad(embedded)  # (N,D)
            for layer in self.bottom_layers:
                x = packed_layer(layer, x, packing)
            for i, state in zip(rows, torch.split(x, packing.lengths.tolist()), strict=True):
                result[i] = state.clone()
        return [result[i] for i in range(len(texts))]

    def cache_texts(self, texts: Sequence[str], max_length: int) -> int:
        """Compute and keep the frozen-prefix states of texts not cached yet; returns how many."""
        scope = self._key(max_length, "")[:3]
        todo = sorted({normalize_text(t) for t in texts} - {k[3] for k in self._prefix if k[:3] == scope})
        if not todo:
            return 0
        was_training = self.training
        self.eval()
        for text, state in zip(todo, self._compute_prefix(todo, max_length), strict=True):
            self._prefix[self._key(max_length, text)] = state
        self.train(was_training)
        return len(todo)

    def clear_cache(self) -> None:
        """Forget this tower's cached states (the shared cache stays for other towers)."""
        self._private_prefix.clear()

    def prefix_states(self, texts: Sequence[str], max_length: int) -> list[torch.Tensor]:
        """(L_i,384) frozen-prefix states of each text: cached ones reused, others computed."""
        cache = self._prefix
        states: list[torch.Tensor | None] = [cache.get(self._key(max_length, t)) for t in texts]
        missing = [i for i, s in enumerate(states) if s is None]
        if missing:
            for i, state in zip(missing, self._compute_prefix([texts[i] for i in missing], max_length),
                                strict=True):
                states[i] = state
        return states  # type: ignore[return-value]

    # -- encoding -------------------------------------------------------------------------------

    def encode_text(self, texts: Sequence[str], max_length: int, normalize: bool = True) -> torch.Tensor:
        """(B,384) sentence embeddings (mean pooling, L2-normalised on request).

        Repeated texts are encoded once; the top layers run on packed tokens.
        """
        texts = [normalize_text(t) for t in texts]
        if not texts:
            return torch.zeros(0, EMBEDDING_DIM, device=self.device)
        unique = list(dict.fromkeys(texts))
        states = self.prefix_states(unique, max_length)
        packing = Packing.of(torch.tensor([len(s) for s in states], device=self.device), states[0].dtype)
        x = torch.cat(states)  # (N,384)
        for layer in self.top_layers:
            x = packed_layer(layer, x, packing)
        pooled = packing.mean(x)  # (U,384)
        if normalize:
            pooled = F.normalize(pooled, dim=-1)
        position = {t: i for i, t in enumerate(unique)}
        return pooled[torch.tensor([position[t] for t in texts], device=self.device)]  # (B,384)

    def encode_query(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        return self.encode_text(texts, self.cfg.max_query_len, normalize)

    def encode_ad_text(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        return self.encode_text(texts, self.cfg.max_ad_len, normalize)

    def full_model_embedding(self, texts: Sequence[str], max_length: int) -> torch.Tensor:
        """Reference path: the unmodified HF forward (mean pooled, normalised), for tests."""
        batch = self.tokenizer([normalize_text(t) for t in texts], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt").to(self.device)
        hidden = self.bert(**batch).last_hidden_state
        return F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)


class TwoTowerMatcher(nn.Module):
    """Query tower and ad tower over one shared `TextTower`, plus optional heads.

    `image_head` (implicit fusion) maps (title embedding, image features) to the fused ad
    embedding; without it the ad embedding is the ad text's embedding. `word_channel`
    (`components.match.words.WordChannel`) appends alpha * query terms to the query vector
    and the ad's centred per-word evidence to the ad vector, so the score (one inner
    product) adds the learned word-match term.
    """

    def __init__(self, tower: TextTower, image_head: nn.Module | None = None,
                 word_channel: nn.Module | None = None) -> None:
        super().__init__()
        self.tower = tower
        self.image_head = image_head
        self.word_channel = word_channel

    @property
    def dim(self) -> int:
        """Width of the query and ad vectors (384, plus the vocabulary with a word channel)."""
        return EMBEDDING_DIM + (self.word_channel.dim if self.word_channel is not None else 0)

    def encode_query(self, texts: Sequence[str]) -> torch.Tensor:
        query = self.tower.encode_query(texts)  # (B,384)
        if self.word_channel is None:
            return query
        if self.word_channel.calibrated and not self.training:  # z-score fusion (words.py)
            return self.word_channel.calibrated_query(query, self.word_channel.query_terms(texts))
        return torch.cat([query, self.word_channel.query_part(texts)], dim=1)  # (B,384+V)

    def encode_ad(self, texts: Sequence[str], pooled: torch.Tensor | None = None,
                  parts: torch.Tensor | None = None, parts_mask: torch.Tensor | None = None,
                  evidence: torch.Tensor | None = None) -> torch.Tensor:
        """(B,dim) ad vectors from ad texts (+ image features for fusion, + word evidence)."""
        if self.image_head is None:
            ad = self.tower.encode_ad_text(texts)
        else:
            if pooled is None or parts is None:
                raise ValueError("this matcher fuses image features: pass pooled and parts")
            ad = self.image_head(self.tower.encode_ad_text(texts), pooled, parts, parts_mask)  # (B,384)
        if self.word_channel is None:
            return ad
        if evidence is None:
            raise ValueError("this matcher has a word channel: pass the ads' word evidence")
        return torch.cat([ad, evidence.to(ad.dtype)], dim=1)  # (B,384+V)

    def forward(self, query_texts: Sequence[str], ad_texts: Sequence[str], pooled: torch.Tensor | None = None,
                parts: torch.Tensor | None = None, parts_mask: torch.Tensor | None = None,
                evidence: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        query = self.encode_query(query_texts)  # (B,dim)
        ad = self.encode_ad(ad_texts, pooled, parts, parts_mask, evidence)  # (B,dim)
        return {"query": query, "ad": ad, "scores": query @ ad.T}  # scores (B,B)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a fine-tune changes: top text layers + the image head and word channel."""
        out = {f"tower.{k}": v for k, v in self.tower.trainable_state_dict().items()}
        for name in ("image_head", "word_channel"):
            head = getattr(self, name)
            if head is not None:
                out.update({f"{name}.{k}": v for k, v in head.state_dict().items()})
        return out

    def head_parameters(self) -> list[nn.Parameter]:
        heads = [h for h in (self.image_head, self.word_channel) if h is not None]
        return [p for h in heads for p in h.parameters() if p.requires_grad]

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.tower.parameters() if p.requires_grad]
