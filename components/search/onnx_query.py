"""The query tower as an ONNX Runtime session plus the `tokenizers` tokenizer: a one-off search
that imports neither torch nor transformers (together about 4 s of a 6-7 s search here).

`export(scorer_dir)` writes `scorer_dir/onnx/`: the text tower (MiniLM with the scorer's
fine-tuned layers, mean pooled, L2-normalised) traced on padded tokens, the tokenizer file,
and the word channel's query side (vocabulary, alpha, calibration) for
`components.match.terms`, the numpy code the trained channel itself runs. The local bundle
cache exports once per model version (`components.registry.models.fetch_bundle`); the
registered artifact does not carry the ~90 MB graph. `load` returns None when there is no
export or the runtime is missing, and the caller takes the torch path.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from components.match.data import normalize_text
from components.match.terms import calibrated_query, query_term_weights
from components.outputs import atomic_dir

log = logging.getLogger(__name__)

EXPORT_DIR = "onnx"
GRAPH_FILE = "query.onnx"
TOKENIZER_FILE = "tokenizer.json"
CHANNEL_FILE = "channel.npz"
META_FILE = "query.json"
FORMAT_VERSION = 1
OPSET = 17


def available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx", "tokenizers"))


def export(scorer_dir: Path) -> Path | None:
    """Write `scorer_dir/onnx/` (atomically) and return it; None when the scorer is not a
    two-tower system or ONNX is not installed. Already there: kept."""
    scorer_dir = Path(scorer_dir)
    target = scorer_dir / EXPORT_DIR
    if (target / META_FILE).is_file():
        return target
    if not available():
        return None
    # torch-bound modules: exporting traces the torch tower; loading an export never needs them.
    import torch

    from components.match.encoder import PaddedTextTower
    from components.match.scorers import TwoTowerScorer, load_scorer
    from components.text.encoder import minilm_dir

    scorer = load_scorer(scorer_dir, device="cpu", query_only=True)
    if not isinstance(scorer, TwoTowerScorer):
        return None
    net = scorer.net
    tower = net.tower
    with atomic_dir(target, keep_existing=lambda d: (d / META_FILE).is_file()) as out:
        sample = tower.tokenizer(["red star", "a christmas tree with lights"], padding=True, return_tensors="pt")
        with torch.no_grad():
            torch.onnx.export(PaddedTextTower(tower.bert), (sample["input_ids"], sample["attention_mask"]),
                              str(out / GRAPH_FILE), dynamo=False, opset_version=OPSET,
                              input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                              dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                            "attention_mask": {0: "batch", 1: "tokens"}, "embedding": {0: "batch"}})
        shutil.copyfile(minilm_dir() / TOKENIZER_FILE, out / TOKENIZER_FILE)
        channel = net.word_channel
        if channel is not None:
            np.savez(out / CHANNEL_FILE, vocabulary=np.array(channel.vocabulary, dtype=str),
                     scale=np.float32(channel.scale().detach()), calibrated=np.bool_(channel.calibrated),
                     text_covariance=channel.text_covariance.numpy(),
                     evidence_covariance=channel.evidence_covariance.numpy(),
                     weight=np.float32(channel.calibrated_weight))
        (out / META_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "dim": int(net.dim),
                                                 "max_query_len": int(tower.cfg.max_query_len),
                                                 "word_channel": channel is not None}, indent=2) + "\n")
    return target


class OnnxQueryTower:
    """`encode(texts) -> (Q, dim)` float32 from the export, equal to the torch tower's to ~1e-6."""

    def __init__(self, export_dir: Path) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        meta = json.loads((export_dir / META_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{export_dir}: export format {meta.get('format_version')}, expected {FORMAT_VERSION}")
        self.dim = int(meta["dim"])
        self.tokenizer = Tokenizer.from_file(str(export_dir / TOKENIZER_FILE))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(int(meta["max_query_len"]))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(export_dir / GRAPH_FILE), options, providers=["CPUExecutionProvider"])
        self.channel = dict(np.load(export_dir / CHANNEL_FILE)) if meta["word_channel"] else None
        self.vocabulary = [str(w) for w in self.channel["vocabulary"]] if self.channel else []

    def encode(self, texts: list[str]) -> np.ndarray:
        texts = [normalize_text(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        encoded = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encoded)
        ids = np.zeros((len(texts), width), np.int64)
        mask = np.zeros((len(texts), width), np.int64)
        for row, e in enumerate(encoded):
            ids[row, :len(e.ids)], mask[row, :len(e.ids)] = e.ids, 1
        text = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0].astype(np.float32)
        if self.channel is None:
            return text
        terms = query_term_weights(texts, self.vocabulary)
        if bool(self.channel["calibrated"]):
            return calibrated_query(text, terms, self.channel["text_covariance"], self.channel["evidence_covariance"],
                                    float(self.channel["weight"]))
        return np.hstack([text, float(self.channel["scale"]) * terms]).astype(np.float32)


def load(scorer_dir: Path) -> OnnxQueryTower | None:
    export_dir = Path(scorer_dir) / EXPORT_DIR
    if not (export_dir / META_FILE).is_file() or not available():
        return None
    try:
        return OnnxQueryTower(export_dir)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("%s: ONNX query tower unusable (%s); using the torch tower", export_dir, exc)
        return None
