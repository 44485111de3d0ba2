"""Only the query tower of a bundled two-tower matcher, loaded without the training stack.

`components.match.systems.load_scorer` imports PyTorch Lightning and the training module
(about 2-4 s here) although a query needs neither. This builds the same `TwoTowerMatcher`
from the public pieces the scorer is made of (`TextTower`, `WordChannel`), without the image
head (queries never use it), from the scorer's own `scorer.json` and weights. When the saved
scorer has anything this does not know, it falls back to `load_scorer`, and a test
(tests/catalogue/test_fast_search.py) asserts both give the same query vectors. Where the
scorer directory holds an ONNX export of this tower (`components.search.onnx_query`), that
runs instead, without importing torch or transformers.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_KNOWN_META = {"format_version", "system", "info", "tower", "head", "use_words", "words_per_ad", "word_min_score",
               "words_skip_title", "trained", "word_channel"}
_BATCH = 256


class QueryTower:
    """`encode(texts) -> (Q, dim)` float32, equal to `TwoTowerScorer.encode_queries`."""

    def __init__(self, encode, dim: int, source: str) -> None:
        self._encode, self.dim, self.source = encode, dim, source

    def encode(self, texts: list[str]) -> np.ndarray:
        return self._encode(texts)

    @classmethod
    def from_scorer(cls, scorer) -> QueryTower:
        from components.match.data import QuerySide

        def encode(texts: list[str]) -> np.ndarray:
            return scorer.encode_queries(QuerySide([str(i) for i in range(len(texts))], texts))

        return cls(encode, scorer.net.dim, "scorer")

    @classmethod
    def load(cls, scorer_dir: Path, device: str = "auto", onnx: bool = True) -> QueryTower:
        """The fastest tower that gives the scorer's vectors: its ONNX export when present (and
        `onnx`; CPU, which is also right on a GPU machine for a handful of queries), else the light
        torch tower, else the full scorer's."""
        scorer_dir = Path(scorer_dir)
        meta = light_meta(scorer_dir)
        if meta is not None:
            if onnx and device in ("auto", "cpu"):
                from components.search import onnx_query

                session = onnx_query.load(scorer_dir)
                if session is not None:
                    return cls(session.encode, session.dim, "onnx")
            try:
                return cls._light(scorer_dir, meta, device)
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("%s: light query tower failed (%s); loading the full scorer", scorer_dir, exc)
        from components.match.systems import load_scorer

        return cls.from_scorer(load_scorer(scorer_dir, device=device))

    @classmethod
    def _light(cls, scorer_dir: Path, meta: dict, device: str) -> QueryTower:
        import torch

        from components.match.data import normalize_text

        net = light_net(scorer_dir, meta, device)

        @torch.no_grad()
        def encode(texts: list[str]) -> np.ndarray:
            texts = [normalize_text(t) for t in texts]
            out = np.zeros((len(texts), net.dim), dtype=np.float32)
            order = np.argsort([len(t) for t in texts], kind="stable")
            for start in range(0, len(texts), _BATCH):
                rows = order[start:start + _BATCH]
                out[rows] = net.encode_query([texts[i] for i in rows]).float().cpu().numpy()
            return out

        return cls(encode, net.dim, "light")


def light_net(scorer_dir: Path, meta: dict, device: str = "cpu"):
    """The scorer's `TwoTowerMatcher` without its image head, in eval mode on `device`."""
    from safetensors.torch import load_file

    from components.device import resolve_device
    from components.match.encoder import TextTower, TowerConfig, TwoTowerMatcher

    channel = None
    if meta.get("word_channel"):
        from components.match.words import WordChannel

        channel = WordChannel(meta["word_channel"]["vocabulary"])
    net = TwoTowerMatcher(TextTower(TowerConfig(**meta["tower"])), None, channel)
    if meta["trained"]:
        state = load_file(str(Path(scorer_dir) / "weights.safetensors"))
        wanted = set(net.trainable_state_dict())
        missing = wanted - set(state)
        if channel is not None:  # a scorer saved before calibration existed: uncalibrated (as load_scorer)
            missing -= {f"word_channel.{b}" for b in getattr(channel, "CALIBRATION_BUFFERS", ())}
        if missing:
            raise ValueError(f"weights lack {sorted(missing)[:3]}")
        net.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=False)
    return net.to(resolve_device(device)).eval()


def light_meta(scorer_dir: Path) -> dict | None:
    """The scorer's `scorer.json` when the light tower (and its ONNX export) can rebuild it, else None."""
    meta = json.loads((Path(scorer_dir) / "scorer.json").read_text())
    light = set(meta) <= _KNOWN_META and meta.get("format_version") == 1 and isinstance(meta.get("tower"), dict)
    return meta if light else None
