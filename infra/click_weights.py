"""Do click weights and explicit negatives help the matcher? Simulated clicks, ingested, trained on.

The training queries of a dataset are searched offline: the zero-shot text matcher ranks the
training ads, with Gaussian noise on its scores so an ad's position varies between searches
(`--noise`), and simulated people (components/traffic/simulator.simulate_clicks: position k
examined with probability 1/k^eta, relevant ads clicked with probability 0.9, others 0.05)
click the top `--k`. The searches and clicks go into a SQLite traffic log and through
`alignsearch traffic ingest`'s function, onto a base whose training qrels are removed (the
matcher learns from the clicks alone; `--keep-train-qrels` keeps them). text_only is then
trained four times on the ingested version, click weights on/off x explicit negatives on/off
(off: the `weight` column, or the relevance-0 qrels, left out of the training data), and the
best valid nDCG@10 of each is printed, per seed and averaged. Valid and test are never
clicked on: their qrels are the base's.

    .venv/bin/python infra/click_weights.py --quick                       # synthetic, ~10 min on 2 cores
    .venv/bin/python infra/click_weights.py --dataset data/openclipart --quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from components.data.build import build_dataset
from components.data.config import DataConfig, SyntheticConfig
from components.data.format import Dataset, read_dataset, write_dataset
from components.match.config import MatchConfig
from components.match.data import match_data
from components.match.scorers import TwoTowerScorer
from components.match.systems import train_system
from components.traffic.config import SimulatorConfig, TrafficConfig
from components.traffic.events import Click, EventStore, Hit, Impression
from components.traffic.ingest import ingest, read_state
from components.traffic.simulator import relevant_by_query, simulate_clicks

T0 = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
SETTINGS = [(False, False), (True, False), (False, True), (True, True)]  # (click_weights, explicit_negatives)


def base_without_train_qrels(dataset_dir: Path, out_dir: Path) -> Path:
    """The dataset with its training qrels removed (images linked): what the clicks must teach."""
    dataset = read_dataset(dataset_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(dataset_dir, out_dir, copy_function=lambda s, d: Path(d).hardlink_to(s))
    for name in ("ads.parquet", "queries.parquet", "qrels.parquet"):  # links: writing them would write the original
        (out_dir / name).unlink()
    qrels = dataset.qrels[dataset.qrels["split"] != "train"]
    write_dataset(Dataset(ads=dataset.ads, queries=dataset.queries, qrels=qrels), out_dir)
    return out_dir


def simulate(dataset: Dataset, store: EventStore, *, searches: int, k: int, noise: float, eta: float,
             seed: int) -> tuple[int, int]:
    """Searches of the training queries ranked by the zero-shot matcher (+ noise) and the
    simulated people's clicks, written to `store`. Returns (searches, clicks)."""
    train = dataset.split("train")
    data = match_data(train)
    relevant = relevant_by_query(train.qrels)
    rows = [i for i, q in enumerate(data.queries.query_ids) if q in relevant]
    scores = TwoTowerScorer.zero_shot(MatchConfig(device="cpu")).score(data.queries, data.ads)  # (Q,A)
    scores = (scores - scores.mean(1, keepdims=True)) / scores.std(1, keepdims=True)
    rng = np.random.default_rng(seed)
    cfg = SimulatorConfig(eta=eta, seed=seed)
    events: list = []
    clicks = 0
    for n in range(searches):
        q = rows[int(rng.integers(len(rows)))]
        order = np.argsort(-(scores[q] + rng.normal(0.0, noise, scores.shape[1])))[:k]
        shown = [data.ads.ad_ids[a] for a in order]
        event_id = f"s{seed}-{n}"
        time_ = T0 + dt.timedelta(seconds=n)
        events.append(Impression(event_id, data.queries.texts[q], k,
                                 tuple(Hit(a, p, float(-p)) for p, a in enumerate(shown, start=1)), time=time_))
        for position in simulate_clicks(shown, relevant[data.queries.query_ids[q]], rng, cfg):
            events.append(Click(f"{event_id}-c{position}", event_id, shown[position - 1], position,
                                time=time_ + dt.timedelta(seconds=5)))
            clicks += 1
    store.append(events)
    return searches, clicks


def training_view(dataset: Dataset, *, weights: bool, negatives: bool) -> Dataset:
    """The ingested dataset as one setting trains on it."""
    qrels = dataset.qrels
    if not negatives:
        qrels = qrels[qrels["relevance"] > 0]
    if not weights:
        qrels = qrels.drop(columns="weight")
    return Dataset(ads=dataset.ads, queries=dataset.queries, qrels=qrels.reset_index(drop=True), root=dataset.root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=None, help="default: a synthetic dataset built here")
    parser.add_argument("--work", type=Path, default=Path("/tmp/alignsearch-click-weights"))
    parser.add_argument("--searches", type=int, default=2000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--noise", type=float, default=0.5, help="std of the score noise, in per-query std units")
    parser.add_argument("--eta", type=float, default=1.0, help="examination propensity 1/k^eta")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--keep-train-qrels", action="store_true")
    parser.add_argument("--quick", action="store_true", help="max_steps 100, lr 3e-4, batch 32")
    parser.add_argument("--num-ads", type=int, default=300, help="ads of the synthetic dataset")
    args = parser.parse_args()

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    dataset_dir = args.dataset
    if dataset_dir is None:
        dataset_dir = work / "synthetic"
        if not (dataset_dir / "ads.parquet").is_file():
            build_dataset(DataConfig(source="synthetic", out_dir=dataset_dir, seed=0, max_ads=None,
                                     synthetic=SyntheticConfig(num_ads=args.num_ads, image_size=64)))
    full = read_dataset(dataset_dir)
    base_dir = dataset_dir if args.keep_train_qrels else base_without_train_qrels(dataset_dir, work / "base")
    match = dict(lr=3e-4, max_steps=100, eval_every=25, batch_size=32) if args.quick else dict(lr=1e-4)
    results: dict[str, list[float]] = {}
    for seed in args.seeds:
        live = work / f"live-{seed}"
        shutil.rmtree(live, ignore_errors=True)
        (work / f"traffic-{seed}.db").unlink(missing_ok=True)
        with EventStore(f"sqlite:///{work / f'traffic-{seed}.db'}") as store:
            searches, clicks = simulate(full, store, searches=args.searches, k=args.k, noise=args.noise,
                                        eta=args.eta, seed=seed)
            result = ingest(base_dir, live, store, TrafficConfig())
        theta = read_state(live)["propensities"]
        print(f"seed {seed}: {searches} searches, {clicks} clicks -> {result.positives} positive and "
              f"{result.negatives} negative qrels; fitted propensities "
              f"{[round(t, 3) for t in theta]} (true {[round(k ** -args.eta, 3) for k in range(1, args.k + 1)]})",
              flush=True)
        ingested = read_dataset(live)
        for weights, negatives in SETTINGS:
            view = training_view(ingested, weights=weights, negatives=negatives)
            cfg = MatchConfig(device="cpu", seed=seed, **match)
            started = time.perf_counter()
            scorer = train_system("text_only", cfg, match_data(view.split("train")), match_data(view.split("valid")),
                                  work / f"run-{seed}-{int(weights)}{int(negatives)}")
            name = f"click_weights={'on' if weights else 'off'} explicit_negatives={'on' if negatives else 'off'}"
            value = float(scorer.info["val_ndcg@10"])
            results.setdefault(name, []).append(value)
            print(f"  {name}: valid nDCG@10 {value:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    print("\nmean over seeds", args.seeds)
    table = pd.DataFrame({"valid nDCG@10": {n: float(np.mean(v)) for n, v in results.items()},
                          "per seed": {n: " ".join(f"{x:.4f}" for x in v) for n, v in results.items()}})
    print(table.to_string(float_format=lambda x: f"{x:.4f}"))
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
