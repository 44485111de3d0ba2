"""Which pooled image vector carries the most: the late_fusion term probe alone, per pooling.

For every ad image of a dataset, one EfficientNet-Lite0 pass per input size and flip gives the
last feature map pooled several ways (mean, max, GeM p=3) and two intermediate stages mean
pooled (112 and 192 channels). For each variant (names joined by '+' are concatenated; a
trailing '~' averages the image and its mirror) the probe of `late_fusion` is fitted on the
training ads' click-query terms (C picked on valid ndcg@10) and ranks the valid and test ads
by itself, no text. Prints ndcg@10, image-only ndcg@10 and AUC per split.

    .venv/bin/python infra/probe_pooling.py data/openclipart \
        mean224,mean224~,mean320,mean320~,gem224,mean224+max224,mean224+s6224+s5224,mean224~+mean320~

About 8 min of feature extraction on 2 cores for openclipart (cached in --cache, default
/tmp/probe-pooling.npz), then seconds per variant.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from components.data.format import read_dataset
from components.evaluate.subsets import evaluate_scores, flatten_records
from components.match.data import match_data, training_pairs
from components.match.probe import TermProbe, fit_logistic, term_labels
from components.metrics import ScoreMatrix
from components.vision.backbone import load_backbone, normalize
from components.vision.config import PartsConfig
from components.vision.parts import prepare_image

STAGE_CHANNELS = {"s5": 112, "s6": 192}  # the last block of each stage is pooled


def pooled_features(paths: list[Path]) -> dict[str, np.ndarray]:
    model = load_backbone("cpu", fold_bn=True)
    last_of = {}  # stage name -> index of its last block
    for i, block in enumerate(model._blocks):
        for name, channels in STAGE_CHANNELS.items():
            if block._project_conv.out_channels == channels:
                last_of[name] = i
    feats: dict[str, np.ndarray] = {}
    for size in (224, 320):
        cfg = PartsConfig(input_size=size)
        with ThreadPoolExecutor(2) as pool:
            pixels = np.stack([prepared.pixels for prepared in pool.map(prepare_image, paths, [cfg] * len(paths))])
        for flip in (False, True):
            rows: dict[str, list[np.ndarray]] = {k: [] for k in ("mean", "max", "gem", *STAGE_CHANNELS)}
            started = time.time()
            for start in range(0, len(pixels), 64):
                x = torch.from_numpy(pixels[start:start + 64]).permute(0, 3, 1, 2)
                x = normalize(x.flip(3) if flip else x)
                with torch.no_grad():
                    h = F.relu6(model._bn0(model._conv_stem(x)))
                    for i, block in enumerate(model._blocks):
                        h = block(h)
                        for name, last in last_of.items():
                            if i == last:
                                rows[name].append(h.mean((2, 3)).numpy())
                    fmap = F.relu6(model._bn1(model._conv_head(h)))
                rows["mean"].append(fmap.mean((2, 3)).numpy())
                rows["max"].append(fmap.amax((2, 3)).numpy())
                rows["gem"].append(fmap.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3).numpy())
            for name, parts in rows.items():
                feats[f"{name}{size}{'f' if flip else ''}"] = np.concatenate(parts)
            print(f"features at {size}{' mirrored' if flip else ''}: {time.time() - started:.1f} s", flush=True)
    return feats


def variant(feats: dict[str, np.ndarray], name: str) -> np.ndarray:
    pieces = []
    for piece in name.split("+"):
        pieces.append((feats[piece[:-1]] + feats[piece[:-1] + "f"]) / 2 if piece.endswith("~") else feats[piece])
    return np.concatenate(pieces, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("variants")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/probe-pooling.npz"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    dataset = read_dataset(args.data)
    if args.cache.is_file():
        feats = dict(np.load(args.cache))
    else:
        feats = pooled_features([args.data / p for p in dataset.ads["image_path"]])
        np.savez(args.cache, **feats)
    row_of = {a: i for i, a in enumerate(dataset.ads["ad_id"].astype(str))}
    splits = {s: dataset.split(s) for s in ("train", "valid", "test")}
    data = {s: match_data(part) for s, part in splits.items()}
    terms, labels = term_labels(data["train"], training_pairs(data["train"], 1.0, 0))
    keep = (labels.sum(0) > 0) & (labels.sum(0) < len(labels))
    terms, labels = [t for t, k in zip(terms, keep, strict=True) if k], labels[:, keep]
    rows = {s: np.array([row_of[a] for a in data[s].ads.ad_ids]) for s in splits}
    for name in args.variants.split(","):
        x = variant(feats, name)
        train = x[rows["train"]].astype(np.float64)
        mean, std = train.mean(0), np.maximum(train.std(0), 1e-3)
        fitted, results = None, []
        for c in (0.01, 0.03, 0.1):  # late_fusion's grid, warm-started as it does
            fitted = weights, intercepts = fit_logistic(TermProbe.features(train, mean, std, None), labels, c,
                                                        max_iter=100, init=fitted)
            probe = TermProbe(terms, mean, std, weights, intercepts, None)
            line = {}
            for split in ("valid", "test"):
                scores = probe.query_scores(data[split].queries.texts, x[rows[split]])
                matrix = ScoreMatrix(data[split].queries.query_ids, data[split].ads.ad_ids, scores)
                m = flatten_records(evaluate_scores(splits[split], matrix, 0))
                line[split] = (round(m["ndcg@10"], 4), round(m["image_only/ndcg@10"], 4), round(m["auc"], 4))
            results.append((c, line))
        c, best = max(results, key=lambda r: r[1]["valid"][0])
        print(f"{name:<24} dim {x.shape[1]:>5}  C {c}: valid ndcg/image-only/auc {best['valid']}  "
              f"test {best['test']}", flush=True)


if __name__ == "__main__":
    main()
