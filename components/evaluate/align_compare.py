"""`alignsearch align compare`: alignment variants side by side, without retraining a matcher each.

Per variant (a set of `align` overrides) the align stage runs as usual, and the variant is
scored twice:
- its visual words against the held-out query words of the valid split's ads
  (precision, lift over a constant list, coverage; `components.align.evaluation`);
- as the word channel of one trained `text_only` shared by every variant, calibrated on
  valid exactly as `ours` calibrates its channel (`calibrate_word_channel`), then ranked on
  the evaluation split: the `ours_channel_only` system, whose only moving part is the alignment.

Everything is seeded, so the table is a function of the dataset, the params and the variants.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from components.align.config import AlignConfig
from components.align.stage import load_ad_words, run_align
from components.data.format import read_dataset
from components.evaluate.config import Variant
from components.evaluate.subsets import evaluate_scores
from components.match.config import MatchConfig
from components.match.data import match_data
from components.match.scorers import load_scorer
from components.match.systems import calibrate_word_channel, train_system
from components.match.words import WordChannel
from components.vision.parts import PartsFeatures

log = logging.getLogger(__name__)

TEXT_ONLY_DIR = "text_only"
TABLE_FILE = "align_compare.csv"


def compare_alignments(variants: list[Variant], *, align_cfg: AlignConfig, match_cfg: MatchConfig,
                       dataset_dir: Path, features: PartsFeatures, out_dir: Path,
                       cache_dir: Path | None = None, eval_split: str = "test") -> pd.DataFrame:
    """One row per variant: word precision on valid, calibrated channel weight, valid and
    `eval_split` ndcg@10 (all / image-only / title-overlap queries). Writes `align_compare.csv`."""
    # an unknown or invalid key fails here, by name, before anything is trained
    configs = [AlignConfig.model_validate({**align_cfg.model_dump(), **v.overrides}) for v in variants]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = read_dataset(dataset_dir)
    splits = {name: dataset.split(name) for name in ("train", "valid", eval_split)}
    split_features = {name: features.take(dataset.ad_rows(split)) for name, split in splits.items()}
    plain = {name: match_data(split, features=split_features[name]) for name, split in splits.items()}
    text_cfg = match_cfg.model_copy(update={"word_channel": False})
    train_system("text_only", text_cfg, plain["train"], plain["valid"], out_dir / TEXT_ONLY_DIR)

    rows = []
    for variant, cfg in zip(variants, configs, strict=True):
        align_dir = out_dir / "align" / variant.name.replace("/", "_")
        result = run_align(cfg, dataset_dir=dataset_dir, features=features, out_dir=align_dir, cache_dir=cache_dir,
                           gallery_size=0, fraction=match_cfg.train_fraction, query_seed=match_cfg.seed,
                           metrics_split="valid")
        _, logits = load_ad_words(result.words_path)
        data = {name: match_data(split, features=split_features[name], word_logits=logits)
                for name, split in splits.items()}
        scorer = load_scorer(out_dir / TEXT_ONLY_DIR / "scorer", match_cfg.device)
        scorer.net.word_channel = WordChannel(logits.words).to(scorer.device)
        calibrate_word_channel(scorer, match_cfg, data["train"], data["valid"])
        calibration = scorer.info["word_channel_calibration"]
        test = data[eval_split]
        matrix = scorer.score_matrix(test)
        ranking = {f"{eval_split}/{r['subset']}/ndcg@10": r["value"]
                   for r in evaluate_scores(splits[eval_split], matrix, match_cfg.seed) if r["metric"] == "ndcg@10"}
        row = {"variant": variant.name, "overrides": ",".join(f"{k}={v}" for k, v in variant.overrides.items()),
               "num_words": result.metrics.get("align/num_words"),
               **{k: v for k, v in result.metrics.items() if k.startswith("visual_word_")},
               "channel_weight": calibration["weight"] if calibration["used"] == "calibrated" else 0.0,
               "valid/ndcg@10": max(calibration["val_ndcg@10"], calibration["learned_val_ndcg@10"]), **ranking}
        log.info("align compare %s: %s", variant.name, row)
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / TABLE_FILE, index=False)
    return table
