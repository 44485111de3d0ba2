"""Fitted matching systems (scorers) and their one loader, `load_scorer`, with no training
stack: serving, the query tower and training all load a saved scorer through it.

`scorer.score(queries, ads)` gives a (Q, A) relevance matrix; `scorer.save(dir)` /
`load_scorer(dir)` round-trip it (JSON + safetensors, never pickle). Two-tower systems
(`text_zero_shot`, `text_only`, `ours`, `implicit_fusion`, `implicit_fusion_words`) also
expose `encode_queries` / `encode_ads`, whose inner product is the score (the faiss index is
built over `encode_ads`). `load_scorer(dir, query_only=True)` leaves out what queries never
use (the image head): the light query tower of a one-off search.
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from components.device import resolve_device
from components.match.config import MatchConfig
from components.match.data import AdSide, MatchData, QuerySide
from components.match.encoder import TextTower, TowerConfig, TwoTowerMatcher
from components.match.fusion import ImageFusionHead
from components.match.lexical import bm25_scores
from components.match.probe import TermProbe, zscore_rows
from components.match.words import WordChannel
from components.metrics import ScoreMatrix
from components.outputs import write_stable_json
from components.systems import TWO_TOWER_SYSTEMS

log = logging.getLogger(__name__)


FORMAT_VERSION = 1
SCORER_FILE = "scorer.json"
WEIGHTS_FILE = "weights.safetensors"
PROBE_FILE = "probe.safetensors"
LATE_FUSION_TEXT_DIR = "text"  # late_fusion's trained text_only scorer, inside its own directory
_ENCODE_BATCH = 256


class Scorer(ABC):
    """A fitted system: scores every (query, ad) pair."""

    system: str
    info: dict

    @abstractmethod
    def score(self, queries: QuerySide, ads: AdSide) -> np.ndarray:
        """(len(queries), len(ads)) float64 scores, higher = more relevant."""

    def score_matrix(self, data: MatchData) -> ScoreMatrix:
        """Every (query, ad) score of `data`, labelled by ids: what evaluation ranks."""
        return ScoreMatrix(data.queries.query_ids, data.ads.ad_ids, self.score(data.queries, data.ads))

    @abstractmethod
    def _save(self, out_dir: Path) -> dict:
        """Write weights; return the JSON description (without system/version/info)."""

    def save(self, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, "system": self.system, **self._save(out_dir),
                "info": self.info}
        write_stable_json(meta, out_dir / SCORER_FILE)
        return out_dir


class LexicalScorer(Scorer):
    def __init__(self, k1: float = 1.2, b: float = 0.75, info: dict | None = None) -> None:
        self.system, self.k1, self.b, self.info = "lexical", k1, b, info or {}

    def score(self, queries: QuerySide, ads: AdSide) -> np.ndarray:
        return bm25_scores(queries.texts, ads.titles, self.k1, self.b)

    def _save(self, out_dir: Path) -> dict:
        return {"k1": self.k1, "b": self.b}


class TwoTowerScorer(Scorer):
    """Score = <encode_queries, encode_ads> (both L2-normalised: cosine)."""

    def __init__(self, system: str, net: TwoTowerMatcher, *, use_words: bool = False, words_per_ad: int = 5,
                 word_min_score: float = 0.0, words_skip_title: bool = False, trained: bool = False,
                 head_config: dict | None = None, device: str = "auto", info: dict | None = None) -> None:
        self.system, self.net = system, net
        self.use_words, self.words_per_ad = use_words, words_per_ad
        self.word_min_score, self.words_skip_title = word_min_score, words_skip_title
        self.trained, self.head_config = trained, head_config
        self.device = resolve_device(device)
        self.net.to(self.device).eval()
        self.info = info or {}

    @classmethod
    def zero_shot(cls, cfg: MatchConfig, system: str = "text_zero_shot") -> TwoTowerScorer:
        tower = TextTower(TowerConfig(trainable_layers=0, max_query_len=cfg.max_query_len,
                                      max_ad_len=cfg.max_ad_len))
        return cls(system, TwoTowerMatcher(tower), device=cfg.device)

    @torch.no_grad()
    def _encode(self, texts: list[str], encode, extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
        out = np.zeros((len(texts), self.net.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")  # less padding per batch
        for start in range(0, len(texts), _ENCODE_BATCH):
            rows = order[start:start + _ENCODE_BATCH]
            kwargs = {k: torch.from_numpy(v[rows]).to(self.device) for k, v in (extra or {}).items()}
            out[rows] = encode([texts[i] for i in rows], **kwargs).float().cpu().numpy()
        return out

    def encode_queries(self, queries: QuerySide) -> np.ndarray:
        """(Q,dim) float32: the L2-normalised text embedding (+ alpha * query terms with a word channel)."""
        return self._encode(queries.texts, self.net.encode_query)

    def ad_texts(self, ads: AdSide) -> list[str]:
        return ads.texts(self.use_words, self.words_per_ad, min_score=self.word_min_score,
                         skip_title_words=self.words_skip_title)

    def encode_ads(self, ads: AdSide) -> np.ndarray:
        """(A,dim) float32 (what the faiss index holds): the L2-normalised ad embedding (+ the
        centred word evidence with a word channel)."""
        extra = {}
        if self.head_config and self.net.image_head is None:
            raise ValueError(f"{self.system} was loaded query_only (no image head): it cannot encode ads")
        if self.net.image_head is not None:
            if not ads.has_images:
                raise ValueError(f"{self.system} needs image features of the ads (AdSide.pooled/parts)")
            extra.update({"pooled": ads.pooled, "parts": ads.parts, "parts_mask": ads.parts_mask})
        if self.net.word_channel is not None:
            if ads.evidence is None or ads.evidence_words != self.net.word_channel.vocabulary:
                raise ValueError(f"{self.system} needs the ads' word evidence over its own alignment vocabulary "
                                 "(AdSide.evidence from the alignment it was trained with)")
            extra["evidence"] = ads.evidence
        return self._encode(self.ad_texts(ads), self.net.encode_ad, extra)

    def score(self, queries: QuerySide, ads: AdSide) -> np.ndarray:
        return (self.encode_queries(queries) @ self.encode_ads(ads).T).astype(np.float64)

    def _save(self, out_dir: Path) -> dict:
        if self.trained:
            state = {k: v.detach().cpu().contiguous() for k, v in self.net.trainable_state_dict().items()}
            save_torch(state, str(out_dir / WEIGHTS_FILE))
        channel = self.net.word_channel
        return {"tower": asdict(self.net.tower.cfg), "head": self.head_config, "use_words": self.use_words,
                "words_per_ad": self.words_per_ad, "word_min_score": self.word_min_score,
                "words_skip_title": self.words_skip_title, "trained": self.trained,
                "word_channel": None if channel is None else {"vocabulary": channel.vocabulary}}

    @classmethod
    def _load(cls, out_dir: Path, meta: dict, device: str, query_only: bool = False) -> TwoTowerScorer:
        tower = TextTower(TowerConfig(**meta["tower"]))
        head = ImageFusionHead(**meta["head"]) if meta.get("head") and not query_only else None
        channel = WordChannel(meta["word_channel"]["vocabulary"]) if meta.get("word_channel") else None
        net = TwoTowerMatcher(tower, head, channel)
        if meta["trained"]:
            state = load_torch(str(out_dir / WEIGHTS_FILE))
            if query_only:  # the image head's tensors stay on disk
                state = {k: v for k, v in state.items() if not k.startswith("image_head.")}
            expected = set(net.trainable_state_dict())
            if channel is not None:  # a scorer saved before calibration existed: uncalibrated
                expected -= {f"word_channel.{b}" for b in WordChannel.CALIBRATION_BUFFERS} - set(state)
            if set(state) != expected:
                raise ValueError(f"{out_dir / WEIGHTS_FILE}: tensors do not match the model "
                                 f"({len(expected - set(state))} missing, {len(set(state) - expected)} unexpected)")
            net.load_state_dict(state, strict=False)
        return cls(meta["system"], net, use_words=meta["use_words"], words_per_ad=meta["words_per_ad"],
                   word_min_score=meta.get("word_min_score", 0.0), words_skip_title=meta.get("words_skip_title", False),
                   trained=meta["trained"], head_config=meta.get("head"), device=device, info=meta.get("info"))


class LateFusionScorer(Scorer):
    """z(trained text_only score) + weight * z(term-probe score), z-scored per query
    (docs/method.md#baselines: the text matcher a user would fuse is the trained one)."""

    def __init__(self, text: TwoTowerScorer, probe: TermProbe, weight: float, info: dict | None = None) -> None:
        self.system, self.text, self.probe, self.weight = "late_fusion", text, probe, float(weight)
        self.info = info or {}

    def parts(self, queries: QuerySide, ads: AdSide) -> tuple[np.ndarray, np.ndarray]:
        """(z text, z probe), each (Q,A)."""
        if ads.pooled is None:
            raise ValueError("late_fusion needs the ads' pooled image vectors (AdSide.pooled)")
        text = zscore_rows(self.text.score(queries, ads))
        probe = zscore_rows(self.probe.query_scores(queries.texts, ads.pooled))
        return text, probe

    def score(self, queries: QuerySide, ads: AdSide) -> np.ndarray:
        text, probe = self.parts(queries, ads)
        return text + self.weight * probe

    def _save(self, out_dir: Path) -> dict:
        arrays = {"mean": self.probe.mean, "std": self.probe.std, "weights": self.probe.weights,
                  "intercepts": self.probe.intercepts}
        if self.probe.components is not None:
            arrays["components"] = self.probe.components
        save_numpy({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(out_dir / PROBE_FILE))
        self.text.save(out_dir / LATE_FUSION_TEXT_DIR)
        return {"weight": self.weight, "terms": self.probe.terms}

    @classmethod
    def _load(cls, out_dir: Path, meta: dict, device: str) -> LateFusionScorer:
        arrays = load_numpy(str(out_dir / PROBE_FILE))
        probe = TermProbe(meta["terms"], arrays["mean"], arrays["std"], arrays["weights"], arrays["intercepts"],
                          arrays.get("components"))
        text = load_scorer(out_dir / LATE_FUSION_TEXT_DIR, device)
        if not isinstance(text, TwoTowerScorer):
            raise ValueError(f"{out_dir}: late_fusion's text scorer is {text.system}, not a two-tower system")
        return cls(text, probe, meta["weight"], info=meta.get("info"))


def read_meta(out_dir: Path) -> dict:
    """A saved scorer's `scorer.json`, checked against the format version."""
    meta = json.loads((Path(out_dir) / SCORER_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{out_dir}: scorer format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return meta


def load_scorer(out_dir: Path, device: str = "auto", *, query_only: bool = False) -> Scorer:
    """A scorer saved by `Scorer.save`. `query_only`: a two-tower scorer without its image head
    (what encoding queries needs; its `encode_ads` then refuses image systems' ads)."""
    out_dir = Path(out_dir)
    meta = read_meta(out_dir)
    system = meta["system"]
    if system == "lexical":
        return LexicalScorer(meta["k1"], meta["b"], info=meta.get("info"))
    if system == "late_fusion":
        return LateFusionScorer._load(out_dir, meta, device)
    if system in TWO_TOWER_SYSTEMS:
        return TwoTowerScorer._load(out_dir, meta, device, query_only)
    raise ValueError(f"{out_dir}: unknown system {system!r}")
