"""The `evaluate` stage: score a trained system (and the untrained references) on the valid
and test splits; write `metrics.json` (per system, per split) and the plots DVC shows."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from components.data.format import read_dataset
from components.evaluate.plots import plot_subset_bars
from components.evaluate.subsets import evaluate_scores, flatten_records
from components.match.config import MatchConfig

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REFERENCE_SYSTEMS = ("lexical", "text_zero_shot")


@dataclass
class EvaluateResult:
    metrics_path: Path
    metrics: dict[str, dict] = field(default_factory=dict)
    plot_paths: dict[str, Path] = field(default_factory=dict)


def run_evaluate(*, dataset_dir: Path, scorer_dir: Path, out_dir: Path, features=None, words=None, word_logits=None,
                 splits: tuple[str, ...] = ("valid", "test"), seed: int = 0,
                 references: tuple[str, ...] = REFERENCE_SYSTEMS, match_cfg=None) -> EvaluateResult:
    """Metrics of the trained scorer in `scorer_dir` and of the reference systems.

    `metrics.json` maps system -> split -> `{metric: value}` for the whole split and
    `{subset}/{metric}` for the image-only and title-overlap subsets.
    """
    from components.match.stage import split_data  # torch: imported when a scorer is evaluated
    from components.match.systems import load_scorer, train_system

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dataset = read_dataset(dataset_dir)
    scorer = load_scorer(scorer_dir)
    systems = {scorer.system: scorer}
    with tempfile.TemporaryDirectory() as scratch:  # untrained references: nothing worth keeping
        for name in references:
            systems[name] = train_system(name, match_cfg or MatchConfig(), None, None, Path(scratch) / name)
    metrics: dict[str, dict] = {}
    rows = []
    for split_name in splits:
        data = split_data(dataset, split_name, features=features, words=words, word_logits=word_logits)
        for name, system in systems.items():
            matrix = system.score_matrix(data)
            records = evaluate_scores(dataset.split(split_name), matrix, seed)
            metrics.setdefault(name, {})[split_name] = flatten_records(records)
            if split_name == "test":
                rows += [{"system": name, "fraction": 1.0, "seed": seed, **r} for r in records]
    metrics_path = out_dir / METRICS_FILE
    metrics_path.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    plots_dir = out_dir / "plots"
    plot_paths = {}
    if rows:
        plot_paths["auc"] = plot_subset_bars(rows, plots_dir / "subsets_auc.png", metric="auc")
        plot_paths["ndcg"] = plot_subset_bars(rows, plots_dir / "subsets_ndcg.png", metric="ndcg@10")
    log.info("evaluated %s in %.1f s", list(systems), time.perf_counter() - started)
    return EvaluateResult(metrics_path, metrics, plot_paths)



def choose_system(valid: dict[str, float | None]) -> str:
    """The system with the best valid value (`valid`: system -> its valid metric, in candidate
    order); ties and missing values keep the earlier one. Selection on valid, so the test
    split stays for promotion."""
    def value(system: str) -> float:
        return float("-inf") if valid[system] is None else float(valid[system])

    candidates = list(valid)
    best = candidates[0]
    for candidate in candidates[1:]:
        if value(candidate) > value(best):
            best = candidate
    return best
