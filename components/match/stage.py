"""The `train_matcher` stage: one system (by default `ours`) trained on the training split,
with its learning rate picked on the valid split when the config leaves it open, or warm-started
from a saved matcher (`WarmStart`: the scheduled loop's champion)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from components.data.format import Dataset, read_dataset
from components.match.config import MatchConfig
from components.match.data import MatchData, match_data
from components.match.systems import WarmStart, train_system
from components.outputs import write_stable_json
from components.vision.parts import PartsFeatures

log = logging.getLogger(__name__)

SCORER_SUBDIR = "scorer"


@dataclass
class MatcherStageResult:
    scorer_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)


def split_data(dataset: Dataset, split_name: str, *, features: PartsFeatures | None,
               words: dict | None, word_logits=None) -> MatchData:
    """`MatchData` of one split, with the split's rows of the dataset-wide features (and the
    alignment's per-word logits, `components.align.stage.WordLogits`)."""
    split = dataset.split(split_name)
    split_features = None
    if features is not None:
        split_features = features.take(dataset.ad_rows(split))
    return match_data(split, words=words, features=split_features, word_logits=word_logits)


def run_train_matcher(cfg: MatchConfig, *, dataset_dir: Path, out_dir: Path, system: str = "ours",
                      features: PartsFeatures | None = None, words: dict | None = None,
                      word_logits=None, logger=None, warm_start: WarmStart | None = None) -> MatcherStageResult:
    """Train `system` on the training split (model selection on valid); save it under
    `out_dir/scorer`. `ours` needs the aligned `words` and `word_logits`; `implicit_fusion` and `late_fusion`
    need the image `features`. `warm_start` (`components.match.systems.check_warm_start`):
    start from a saved matcher at its learning rate, with no learning-rate search."""
    started = time.perf_counter()
    dataset = read_dataset(dataset_dir)
    train = split_data(dataset, "train", features=features, words=words, word_logits=word_logits)
    valid = split_data(dataset, "valid", features=features, words=words, word_logits=word_logits)
    out_dir = Path(out_dir)
    scorer = train_system(system, cfg, train, valid, out_dir, logger=logger, warm_start=warm_start)
    info = getattr(scorer, "info", {}) or {}
    metrics = {key: float(value) for key, value in info.items()
               if isinstance(value, int | float) and not isinstance(value, bool)}
    metrics["train_matcher_seconds"] = round(time.perf_counter() - started, 2)
    write_stable_json({"system": system, **metrics}, out_dir / "metrics.json")
    return MatcherStageResult(out_dir / SCORER_SUBDIR, metrics)
