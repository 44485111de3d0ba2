"""One small pipeline in a fresh process (the stage functions the flow's tasks call, in the
flow's order and with the flow's arguments): `python repro_pipeline.py ROOT DATASET [--set k=v]`
prints every metric it produced as JSON. Used by test_reproducibility.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flows.runtime import setup_runtime  # noqa: E402


def main(root: Path, dataset_dir: Path, overrides: list[str]) -> dict:
    from ops_helpers import ops_params

    from components.align.stage import load_ad_words, run_align
    from components.evaluate.stage import run_evaluate
    from components.match.stage import run_train_matcher
    from components.vision.stage import load_features, run_features

    cfg = ops_params(root, dataset_dir, *overrides)
    cache_dir = Path(cfg.data.cache_dir)
    feats = run_features(cfg.vision, dataset_dir=dataset_dir, out_dir=root / "features", cache_dir=cache_dir)
    features = load_features(feats.features_path)
    aligned = run_align(cfg.align, dataset_dir=dataset_dir, features=features, out_dir=root / "align",
                        cache_dir=cache_dir, gallery_size=0, fraction=cfg.match.train_fraction,
                        query_seed=cfg.match.seed)
    words, word_logits = load_ad_words(aligned.words_path)
    matcher = run_train_matcher(cfg.match, dataset_dir=dataset_dir, out_dir=root / "matcher",
                                system=cfg.registry.system, features=features, words=words, word_logits=word_logits)
    evaluation = run_evaluate(dataset_dir=dataset_dir, scorer_dir=matcher.scorer_dir, out_dir=root / "evaluate",
                              features=features, words=words, word_logits=word_logits, seed=cfg.promote.seed,
                              match_cfg=cfg.match)
    timing = ("seconds",)  # how long a stage took is not a result
    return {
        "align": {k: v for k, v in aligned.metrics.items() if not any(t in k for t in timing)},
        "matcher": {k: v for k, v in matcher.metrics.items() if not any(t in k for t in timing)},
        "evaluate": evaluation.metrics,
    }


if __name__ == "__main__":
    setup_runtime()
    args = sys.argv[1:]
    sets = [value for flag, value in zip(args[2::2], args[3::2], strict=False) if flag == "--set"]
    print("METRICS " + json.dumps(main(Path(args[0]), Path(args[1]), sets), sort_keys=True))
