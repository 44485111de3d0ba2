"""Does the alignment carry more than late_fusion's probe? A three-way late fusion, per seed.

For each seed: the trained `text_only` matcher (at `--lr`), the `late_fusion` term probe on the
pooled image vector (its C picked on valid, as `late_fusion` does), and the alignment's word
evidence (the `align` stage at the params, scored as ours' word channel scores it: query terms
times centred per-word logits). Each score is z-scored per query, and

    z(text) + w_probe * z(probe) + w_channel * z(channel)

is ranked with the weights (each from `match.late_fusion_weights`) that maximise valid
ndcg@10, under three constraints: w_channel = 0 (late_fusion), w_probe = 0 (text + channel),
and both free. Prints valid ndcg@10 and test ndcg@10 all / image-only per seed and the means.
If the probe added anything the alignment lacks, the free fusion would pick w_probe > 0 on
valid and gain on test.

    .venv/bin/python infra/fusion_three_way.py data/openclipart --seeds 0,1,2

About 2.5 min per seed on 2 cores (one text_only training, one alignment).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from components.align.stage import load_ad_words, run_align
from components.config import load_params
from components.data.format import read_dataset
from components.evaluate.subsets import evaluate_scores, flatten_records
from components.match.data import match_data
from components.match.probe import zscore_rows
from components.match.systems import fit_late_fusion, train_system
from components.match.terms import query_term_weights
from components.metrics import ScoreMatrix
from components.vision.stage import load_features

CONSTRAINTS = {"late_fusion": lambda w: w[1] == 0, "text+channel": lambda w: w[0] == 0, "three_way": lambda w: True}


def run_seed(dataset_dir: Path, features, params, seed: int, lr: float, work: Path) -> list[dict]:
    dataset = read_dataset(dataset_dir)
    splits = {s: dataset.split(s) for s in ("train", "valid", "test")}
    data = {s: match_data(part, features=features.take(dataset.ad_rows(part))) for s, part in splits.items()}
    cfg = params.match.model_copy(update={"seed": seed, "lr": lr, "word_channel": False})
    text = train_system("text_only", cfg, data["train"], data["valid"], work / f"text-{seed}")
    probe = fit_late_fusion(cfg, data["train"], data["valid"], text).probe
    aligned = run_align(params.align.model_copy(update={"seed": seed}), dataset_dir=dataset_dir, features=features,
                        out_dir=work / f"align-{seed}", gallery_size=0, fraction=cfg.train_fraction, query_seed=seed)
    _, logits = load_ad_words(aligned.words_path)
    parts = {}
    for split in ("valid", "test"):
        d = data[split]
        evidence = logits.rows(d.ads.ad_ids) - logits.means
        parts[split] = (zscore_rows(text.score(d.queries, d.ads)),
                        zscore_rows(probe.query_scores(d.queries.texts, d.ads.pooled)),
                        zscore_rows(query_term_weights(d.queries.texts, logits.words) @ evidence.T))

    def ranked(split: str, weights: tuple[float, float]) -> dict[str, float]:
        text_z, probe_z, channel_z = parts[split]
        d = data[split]
        scores = text_z + weights[0] * probe_z + weights[1] * channel_z
        return flatten_records(evaluate_scores(splits[split], ScoreMatrix(d.queries.query_ids, d.ads.ad_ids, scores),
                                               seed))

    grid = cfg.late_fusion_weights
    valid = {(a, b): ranked("valid", (a, b))["ndcg@10"] for a in grid for b in grid}
    rows = []
    for name, allowed in CONSTRAINTS.items():
        weights = max((w for w in valid if allowed(w)), key=lambda w: (valid[w], -sum(w)))
        test = ranked("test", weights)
        rows.append({"seed": seed, "fusion": name, "w_probe": weights[0], "w_channel": weights[1],
                     "valid_ndcg@10": round(valid[weights], 4), "test_ndcg@10": round(test["ndcg@10"], 4),
                     "test_image_only_ndcg@10": round(test["image_only/ndcg@10"], 4)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr", type=float, default=3e-4, help="text_only's learning rate (the benchmark's pick)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--features", type=Path, default=None,
                        help="parts.npz of the dataset (default: params paths.features_dir)")
    args = parser.parse_args()
    params = load_params(args.params)
    features = load_features(args.features or Path(params.paths.features_dir) / "parts.npz")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for seed in (int(s) for s in args.seeds.split(",")):
            for row in run_seed(args.data, features, params, seed, args.lr, Path(work)):
                print(json.dumps(row), flush=True)
                rows.append(row)
    for name in CONSTRAINTS:
        mine = [r for r in rows if r["fusion"] == name]
        means = {k: round(float(np.mean([r[k] for r in mine])), 4)
                 for k in ("valid_ndcg@10", "test_ndcg@10", "test_image_only_ndcg@10")}
        print(f"{name:<13} mean over seeds: {means}")


if __name__ == "__main__":
    main()
