"""The loop benchmark: each system learns from simulated people's clicks, round after round.

Offline benchmarks train on a fixed set of judged queries. A search team's model learns from
the week's clicks instead, so what matters is how fast it gets good from the clicks it causes.
`run_loop_benchmark` measures that on one dataset, for every system and seed:

- **Round 0.** The loop's base dataset keeps the qrels of `start_fraction` of the training
  queries (drawn by the seed) and of the valid and test splits; the other training queries stay
  in the dataset without qrels: only the simulated people know which ads are relevant to them.
  The system trains on it cold (the flow's trainer, `match` params) and becomes the champion.
- **Each round.** The champion serves the training catalogue over real HTTP (the service's
  FastAPI app on uvicorn, logging every search and click to a SQLite traffic log of its own);
  simulated people (`simulator.run_users`) type training-split queries only and click by the
  position-based model. The log is ingested into the next dataset version (`ingest.ingest`:
  inverse-propensity weighted positives, skip-above negatives), the system retrains warm from
  the champion (ours refits its alignment on the new version first), the challenger is scored
  on the untouched valid and test splits, then champion and challenger answer `online_searches`
  interleaved searches (team draft), and the promotion rule decides: the registry's own
  `compare` (offline, on `decide_split`: valid) and `online_rule` over the online verdict, as
  `alignsearch promote` does. The reported numbers are on `eval_split` (test): deciding on it
  would pick each round's champion by the very numbers the curves show.
- **At the end.** The final champions of every pair of systems (per seed) are interleaved for
  `final_searches` searches: whether the online verdict picks the system that is better on the
  evaluation split is the interleaving agreement.

Every system meets the same simulated people: the query draws and click draws depend on the
seed, the round and the phase, not on the system. What this leaves out of the real loop, and
why: nothing is registered in MLflow and no Prefect flow runs per round (the rule functions are
the registry's, the data path and the service are the product's); learning rates are the flow's
(`match.lr_grid` at round 0, then each warm start keeps its champion's rate).

`loop_report.py` turns the rows into tables, targets and learning curves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import random
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from components.data.format import Dataset, read_dataset, write_dataset
from components.evaluate.significance import RunDetail, paired_test, run_detail
from components.evaluate.subsets import IMAGE_ONLY, evaluate_scores, flatten_records
from components.match.data import match_data, normalize_text
from components.outputs import atomic_dir
from components.registry.config import PromoteConfig
from components.registry.promotion import (
    CHALLENGER_BETTER,
    CHAMPION_BETTER,
    OnlineVerdict,
    compare,
    online_rule,
    online_status,
    void_guardrail,
)
from components.search.config import ServeConfig
from components.search.interleave import contributor_label
from components.systems import WORD_SYSTEMS
from components.traffic.config import LoopBenchmarkConfig, TrafficConfig
from components.traffic.events import open_store, utc_now
from components.traffic.ingest import ingest, link_dataset_files
from components.traffic.interleaving import impression_preferences
from components.traffic.loop_report import LoopBenchmarkResult, write_reports
from components.traffic.simulator import UsersResult, run_users
from components.traffic.verdict import verdict_of

# The alignment, the matcher and the service's web stack load torch / uvicorn at import: they
# are imported where a loop starts, so importing this module (the CLI) stays light.

log = logging.getLogger(__name__)

CATALOGUE = "train"  # what the loop's service shows: the training split's ads
ROUND_ZERO = 0
PHASE_COLLECT, PHASE_ONLINE, PHASE_FINAL = 0, 1, 2
PROGRESS_FILE = "progress.json"


# --------------------------------------------------------------------------- the base dataset
def loop_base(full_dir: Path, out_dir: Path, fraction: float, seed: int) -> Path:
    """The loop's round-0 dataset at `out_dir`: the dataset at `full_dir` with the qrels of only
    `fraction` of its training queries that have any (at least one), drawn by `seed`; every query,
    ad and image stays (images hard-linked)."""
    full = read_dataset(full_dir)
    qrels = full.qrels
    judged = np.array(sorted(qrels.loc[qrels["split"] == "train", "query_id"].astype(str).unique()))
    if len(judged) == 0:
        raise ValueError(f"{full_dir}: no training query has qrels; the loop has nothing to start from")
    keep = max(1, round(fraction * len(judged)))
    kept = set(np.random.default_rng(seed).choice(judged, size=keep, replace=False).tolist())
    train = qrels["split"] == "train"
    base_qrels = qrels[~train | qrels["query_id"].astype(str).isin(kept)].reset_index(drop=True)
    with atomic_dir(out_dir) as scratch:
        link_dataset_files(full_dir, scratch)
        write_dataset(Dataset(ads=full.ads, queries=full.queries, qrels=base_qrels), scratch)
    log.info("loop base %s: qrels of %d of %d judged training queries (seed %d)", out_dir, keep, len(judged), seed)
    return Path(out_dir)


# --------------------------------------------------------------------------- models of a loop
@dataclasses.dataclass
class LoopModel:
    """One trained model of a loop: `version` is the round that trained it."""

    system: str
    version: int
    scorer_dir: Path
    metrics: dict[str, float]  # flat metrics on the evaluation split (reports/metrics.json layout)
    decide_metrics: dict[str, float]  # the same on the split the promotion rule reads
    people_metrics: dict[str, float]  # the same on what the simulated people search: the training queries
    detail: RunDetail  # per-query numbers behind them (paired tests)
    rankings: dict[str, list[tuple[str, float]]]  # normalised training query text -> ranked (ad, score)
    seconds: float

    @property
    def label(self) -> str:
        return contributor_label(self.system, self.version)


@dataclasses.dataclass(frozen=True)
class LoopInputs:
    """What every loop of one benchmark shares: the full dataset (the simulated people's truth and
    the evaluation split), its image features, and the settings."""

    full_dir: Path
    full: Dataset
    features: object  # components.vision.parts.PartsFeatures, in the full dataset's ad order
    cache_dir: Path
    align_cfg: object  # components.align.config.AlignConfig
    match_cfg: object  # components.match.config.MatchConfig
    traffic: TrafficConfig
    promote: PromoteConfig
    cfg: LoopBenchmarkConfig

    @functools.cached_property
    def titles(self) -> dict[str, str]:
        """ad id -> title, what the service shows beside each ad."""
        return dict(zip(self.full.ads["ad_id"].astype(str), self.full.ads["title"].fillna("").astype(str), strict=True))

    def split_features(self, name: str):
        return self.features.take(self.full.ad_rows(self.full.split(name)))


def _rankings(matrix, texts: dict[str, str], depth: int) -> dict[str, list[tuple[str, float]]]:
    """normalised query text -> the top `depth` (ad id, score) of its row of `matrix`."""
    out = {}
    for row, query_id in enumerate(matrix.query_ids):
        text = texts[query_id]
        if text in out:
            continue  # two queries with one text: the first one's ranking answers it
        scores = matrix.scores[row]
        top = np.argsort(-scores, kind="stable")[:depth]
        out[text] = [(matrix.ad_ids[j], float(scores[j])) for j in top]
    return out


def train_model(inputs: LoopInputs, system: str, version: int, dataset_dir: Path, seed: int, work_dir: Path, *,
                champion: LoopModel | None = None, text_scorer_dir: Path | None = None) -> LoopModel:
    """Train `system` on the dataset at `dataset_dir` (cold, or warm from `champion`), score the
    evaluation split of the full dataset and rank the training catalogue for every training query.
    `text_scorer_dir`: late_fusion's cold start reuses that trained text_only (same data, seed)."""
    from components.align.stage import run_align
    from components.evaluate.benchmark import load_ad_words
    from components.match.encoder import reset_shared_prefix
    from components.match.scorers import LATE_FUSION_TEXT_DIR, load_scorer
    from components.match.systems import check_warm_start, train_system

    started = time.perf_counter()
    dataset = read_dataset(dataset_dir)
    if dataset.ads["ad_id"].astype(str).tolist() != inputs.full.ads["ad_id"].astype(str).tolist():
        raise ValueError(f"{dataset_dir}: the loop's dataset must keep the full dataset's ads in their order")
    words = logits = None
    if system in WORD_SYSTEMS:  # the alignment refits on every version: the clicks bring new text
        align = run_align(inputs.align_cfg.model_copy(update={"seed": seed}), dataset_dir=dataset_dir,
                          features=inputs.features, out_dir=work_dir / "align", cache_dir=inputs.cache_dir,
                          gallery_size=0, query_seed=seed, metrics_split="valid")
        ad_words = load_ad_words(str(work_dir / "align"), str(align.model_dir))
        words, logits = ad_words.words, ad_words.logits

    def data_of(part: Dataset, name: str):
        return match_data(part, words=words, features=inputs.split_features(name), word_logits=logits)

    train, valid = data_of(dataset.split("train"), "train"), data_of(dataset.split("valid"), "valid")
    cfg = inputs.match_cfg.model_copy(update={"seed": seed})
    reset_shared_prefix()  # the same numbers whichever loops this process ran before
    if system == "late_fusion":
        warm = None if champion is None else check_warm_start(
            "text_only", cfg, champion.scorer_dir / "scorer" / LATE_FUSION_TEXT_DIR, f"{champion.label} (its text_only)")
        if warm is None and text_scorer_dir is not None:
            text = load_scorer(text_scorer_dir, cfg.device)
        else:
            text = train_system("text_only", cfg, train, valid, work_dir / "text_only", warm_start=warm)
        scorer = train_system("late_fusion", cfg, train, valid, work_dir, text_scorer=text)
    else:
        warm = None if champion is None else check_warm_start(system, cfg, champion.scorer_dir / "scorer",
                                                              champion.label)
        scorer = train_system(system, cfg, train, valid, work_dir, warm_start=warm)

    evaluation = inputs.full.split(inputs.cfg.eval_split)
    matrix = scorer.score_matrix(data_of(evaluation, inputs.cfg.eval_split))
    metrics = flatten_records(evaluate_scores(evaluation, matrix, seed))
    detail = run_detail(evaluation, matrix, seed)
    deciding = inputs.full.split(inputs.cfg.decide_split)
    decide_matrix = scorer.score_matrix(data_of(deciding, inputs.cfg.decide_split))
    decide_metrics = flatten_records(evaluate_scores(deciding, decide_matrix, seed))
    catalogue = inputs.full.split(CATALOGUE)
    texts = dict(zip(catalogue.queries["query_id"].astype(str), catalogue.queries["text"].map(normalize_text),
                     strict=True))
    served = scorer.score_matrix(data_of(catalogue, CATALOGUE))
    # judged by the full qrels: the relevance the simulated people click by (the loop's data holds less)
    people_metrics = flatten_records(evaluate_scores(catalogue, served, seed))
    model = LoopModel(system, version, work_dir, metrics, decide_metrics, people_metrics, detail,
                      _rankings(served, texts, inputs.traffic.simulator.k), time.perf_counter() - started)
    log.info("%s: %s %s ndcg@10 %.4f (image-only %.4f), %.1f s", model.label, "warm" if champion else "cold",
             inputs.cfg.eval_split, metrics["ndcg@10"], metrics.get(f"{IMAGE_ONLY}/ndcg@10", float("nan")),
             model.seconds)
    return model


# --------------------------------------------------------------------------- serving
class RankedModel:
    """A loop model as the service asks for one (`predict(frame)` as the registered pyfunc
    answers, and the challenger's `info`/`describe`), answered from its rankings of the training
    catalogue: the simulated people type training queries only."""

    def __init__(self, model: LoopModel, titles: dict[str, str]):
        self.model, self.titles = model, titles
        self.info = {"name": model.system, "version": str(model.version), "run_id": ""}

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        rows = []
        ks = frame["k"] if "k" in frame.columns else [10] * len(frame)
        for text, k in zip(frame["query"], ks, strict=True):
            ranked = self.model.rankings.get(normalize_text(str(text)))
            if ranked is None:
                raise ValueError(f"the loop benchmark's service answers training queries only, not {text!r}")
            rows += [{"query": text, "rank": rank, "ad_id": ad_id, "title": self.titles[ad_id], "score": score,
                      "visual_words": [], "matched_words": [], "catalogue_version": CATALOGUE}
                     for rank, (ad_id, score) in enumerate(ranked[:int(k)], start=1)]
        return pd.DataFrame(rows)

    def describe(self) -> dict:
        return {"challenger": self.model.label}


@contextlib.contextmanager
def serving(model: RankedModel, traffic: TrafficConfig, *, challenger: RankedModel | None = None,
            seed: int = 0) -> Iterator[str]:
    """The search service over `model` on a real uvicorn server on 127.0.0.1 (a free port),
    logging to `traffic.store_uri`; with `challenger`, every search is interleaved. Yields the
    base URL; on exit the server shuts down and the log has written everything queued."""
    # IPPROTO_TCP named: asyncio turns Nagle off only on sockets that say they are TCP.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    try:
        server, thread = _start_server(model, traffic, challenger, seed, sock)
    except BaseException:
        sock.close()
        raise
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def _start_server(model: RankedModel, traffic: TrafficConfig, challenger: RankedModel | None, seed: int,
                  sock: socket.socket):
    import uvicorn

    from components.catalogue.serving import TrafficLog
    from components.search.service import create_app

    cfg = ServeConfig(host="127.0.0.1", port=sock.getsockname()[1], batch_max=1, log_traffic=True,
                      interleave_share=1.0 if challenger is not None else 0.0)
    ids = random.Random(seed)  # request ids (and so the interleavings' coins) repeat by seed
    app = create_app(model, cfg, model_uri=f"loop:{model.model.label}", info=model.info,
                     search_log=TrafficLog(traffic), challenger=challenger, interleave_seed=seed,
                     new_request_id=lambda: f"{ids.getrandbits(128):032x}")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        server.should_exit = True
        raise RuntimeError("the loop benchmark's search service did not start")
    return server, thread


def simulator_seed(seed: int, round_: int, phase: int) -> int:
    """The simulated people of one phase: the same for every system (never its name)."""
    return 1_000_000 * seed + 1_000 * round_ + phase


def _simulate(inputs: LoopInputs, url: str, searches: int, seed: int) -> UsersResult:
    users = inputs.traffic.simulator.model_copy(update={"seed": seed, "num_searches": searches, "split": CATALOGUE})
    result = run_users(url, inputs.full.queries, inputs.full.qrels, users)
    if result.num_errors:
        raise RuntimeError(f"simulated users met {result.num_errors} errors: {dict(result.errors)}")
    return result


def interleave(inputs: LoopInputs, champion: LoopModel, challenger: LoopModel, traffic: TrafficConfig,
               searches: int, seed: int) -> tuple[OnlineVerdict, pd.DataFrame, UsersResult]:
    """`searches` simulated searches answered by a team-draft interleaving of the two models;
    the online verdict of `challenger` against `champion` over them, and its per-impression rows."""
    started = utc_now()  # the log holds earlier phases too: read this one's events only
    with serving(RankedModel(champion, inputs.titles), traffic, challenger=RankedModel(challenger, inputs.titles),
                 seed=seed) as url:
        users = _simulate(inputs, url, searches, seed)
    with open_store(traffic) as store:
        events = store.read(start=started)
    preferences = impression_preferences(events, challenger.label, champion.label)
    verdict = verdict_of(preferences, challenger.label, champion.label, inputs.promote.online_alpha,
                         min_impressions=inputs.promote.min_online_impressions)
    return verdict, preferences, users


def impressions_needed(preferences: pd.DataFrame, better: str, alpha: float) -> int | None:
    """The number of interleaved impressions from which on a sign test says `better`
    ("challenger" or "champion") wins at `alpha` and keeps saying it to the last impression
    (None: it does not say so at the end). Not the first time it is significant: a test read after
    every impression is significant early by chance more often than `alpha`."""
    from scipy.stats import binomtest

    wins = losses = 0
    needed = None
    for n, side in enumerate(preferences["preference"], start=1):
        wins += side == better
        losses += side not in (better, "tie")
        significant = wins > losses and binomtest(wins, wins + losses, 0.5).pvalue < alpha
        needed = (needed or n) if significant else None
    return needed


# --------------------------------------------------------------------------- one loop
@dataclasses.dataclass
class LoopResult:
    rows: list[dict]  # one per round: the champion after it
    decisions: list[dict]  # one per round > 0: the challenger, both verdicts, the outcome
    comparisons: list[dict]  # every interleaved comparison with its test-split deltas
    champion: LoopModel
    details: dict[int, RunDetail]  # round -> the champion's per-query numbers after it
    round_zero: LoopModel


def _counts(traffic: TrafficConfig) -> tuple[int, int]:
    with open_store(traffic) as store:
        counts = store.counts()
    return counts.impressions, counts.clicks


def _comparison(inputs: LoopInputs, kind: str, seed: int, challenger: LoopModel, champion: LoopModel,
                verdict: OnlineVerdict, preferences: pd.DataFrame, round_: int | None = None) -> dict:
    delta = challenger.metrics["ndcg@10"] - champion.metrics["ndcg@10"]
    people_delta = challenger.people_metrics["ndcg@10"] - champion.people_metrics["ndcg@10"]
    better = "challenger" if delta > 0 else "champion"
    test = paired_test([challenger.detail], [champion.detail], "all", "ndcg@10", samples=inputs.cfg.bootstrap_samples,
                       seed=seed)
    needed = impressions_needed(preferences, better, inputs.promote.online_alpha)
    online = {CHALLENGER_BETTER: 1, CHAMPION_BETTER: -1}.get(verdict.verdict, 0)  # significant, by side
    return {"kind": kind, "seed": seed, "round": round_, "challenger": challenger.label, "champion": champion.label,
            "test_delta": delta, "test_p_challenger_better": test["p"], "people_delta": people_delta, "impressions": verdict.impressions,
            "preferred": verdict.preferred, "challenger_wins": verdict.challenger_wins,
            "champion_wins": verdict.champion_wins, "win_share": verdict.win_share, "p_value": verdict.p_value,
            "verdict": verdict.verdict, "online_sign": online,
            # the rule gives no verdict below min_online_impressions, however clear the clicks
            "impressions_needed": None if needed is None else max(needed, inputs.promote.min_online_impressions)}


def run_loop(inputs: LoopInputs, system: str, seed: int, work_dir: Path, *,
             round_zero: Callable[[], LoopModel] | None = None) -> LoopResult:
    """One system's loop at one seed (see the module doc). `round_zero` gives the round-0 model
    when another loop already trained it (the benchmark shares text_only's with late_fusion)."""
    cfg, rule = inputs.cfg, inputs.promote
    if work_dir.exists():  # a loop starts from nothing: an earlier run's log would mix into this one's
        shutil.rmtree(work_dir)
    base_dir = loop_base(inputs.full_dir, work_dir / "base", cfg.start_fraction, seed)
    guardrail_void = void_guardrail(rule, inputs.full_dir)  # as `alignsearch promote` on a title-less dataset
    traffic = inputs.traffic.model_copy(update={"store_uri": f"sqlite:///{work_dir / 'traffic.db'}",
                                                "dataset_dir": str(work_dir / "live"), "retention_days": None})
    started = time.perf_counter()
    champion = zero = round_zero() if round_zero else train_model(inputs, system, ROUND_ZERO, base_dir, seed,
                                                                  work_dir / "round-0")
    rows = [_row(system, seed, ROUND_ZERO, champion, None, 0, 0, champion.seconds, "start")]
    details = {ROUND_ZERO: champion.detail}
    decisions, comparisons = [], []
    for round_ in range(1, cfg.rounds + 1):
        started = time.perf_counter()
        people = simulator_seed(seed, round_, PHASE_COLLECT)
        with serving(RankedModel(champion, inputs.titles), traffic, seed=people) as url:
            collected = _simulate(inputs, url, cfg.searches, people)
        with open_store(traffic) as store:
            ingested = ingest(base_dir, work_dir / "live", store, traffic)
        searches, clicks = _counts(traffic)  # what the round's retraining learns from: everything logged so far
        challenger = train_model(inputs, system, round_, ingested.dataset_dir, seed, work_dir / f"round-{round_}",
                                 champion=champion if inputs.match_cfg.warm_start else None)
        verdict, preferences, online_users = interleave(inputs, champion, challenger, traffic, cfg.online_searches,
                                                        simulator_seed(seed, round_, PHASE_ONLINE))
        offline = compare(challenger.decide_metrics, champion.decide_metrics, rule, guardrail_void)
        status = online_status(verdict, rule, (challenger.label, champion.label))
        promoted, reason = online_rule(offline, status, rule)
        comparison = _comparison(inputs, "challenger", seed, challenger, champion, verdict, preferences, round_)
        comparisons.append({**comparison, "system": system})
        worse = paired_test([champion.detail], [challenger.detail], "all", "ndcg@10", samples=cfg.bootstrap_samples,
                            seed=seed)
        decisions.append({"system": system, "seed": seed, "round": round_, "challenger": challenger.label,
                          "champion": champion.label, "promoted": promoted, "reason": reason,
                          "offline_promote": offline[0], "offline_reason": offline[1], "online_status": status[0],
                          "online": verdict.as_dict(), "challenger_ndcg@10": challenger.metrics["ndcg@10"],
                          "champion_ndcg@10": champion.metrics["ndcg@10"],
                          f"challenger_{cfg.decide_split}_ndcg@10": challenger.decide_metrics["ndcg@10"],
                          f"champion_{cfg.decide_split}_ndcg@10": champion.decide_metrics["ndcg@10"],
                          "challenger_significantly_worse": bool(worse["p"] < 0.05),
                          "searches_answered": collected.searches + online_users.searches,
                          "clicks_acknowledged": collected.clicks_acknowledged + online_users.clicks_acknowledged,
                          "online_clicks_acknowledged": online_users.clicks_acknowledged,
                          "ingest": ingested.as_dict()})
        if promoted:
            champion = challenger
        rows.append(_row(system, seed, round_, champion, challenger, searches, clicks,
                         time.perf_counter() - started, "promoted" if promoted else "kept"))
        details[round_] = champion.detail
    return LoopResult(rows, decisions, comparisons, champion, details, zero)


def _row(system: str, seed: int, round_: int, champion: LoopModel, challenger: LoopModel | None, searches: int,
         clicks: int, seconds: float, outcome: str) -> dict:
    """The champion after a round; `searches`/`clicks`: what the round's retraining learnt from."""
    return {"system": system, "seed": seed, "round": round_, "champion": champion.version,
            "searches": searches, "clicks": clicks,
            "ndcg@10": champion.metrics["ndcg@10"], "decide_ndcg@10": champion.decide_metrics["ndcg@10"],
            "people_ndcg@10": champion.people_metrics["ndcg@10"],
            "image_only/ndcg@10": champion.metrics.get(f"{IMAGE_ONLY}/ndcg@10", float("nan")),
            "challenger_ndcg@10": None if challenger is None else challenger.metrics["ndcg@10"],
            "outcome": outcome, "seconds": round(seconds, 1)}


# --------------------------------------------------------------------------- the benchmark
def run_loop_benchmark(cfg: LoopBenchmarkConfig, *, dataset_dir: Path, out_dir: Path, cache_dir: Path,
                       parts_cfg, align_cfg, match_cfg, traffic: TrafficConfig, promote: PromoteConfig,
                       work_dir: Path | None = None) -> LoopBenchmarkResult:
    """Every system's loop at every seed, then the final champions interleaved pairwise; the
    reports (`loop_report.write_reports`) go to `out_dir`. `work_dir` keeps the loops' datasets,
    models and traffic logs (default: a temporary directory, deleted at the end)."""
    from components.vision.stage import dataset_features

    started = time.perf_counter()
    dataset_dir = Path(dataset_dir)
    full = read_dataset(dataset_dir)  # a bad dataset fails before anything runs
    features = dataset_features(full, parts_cfg, cache_dir)
    inputs = LoopInputs(dataset_dir, full, features, Path(cache_dir), align_cfg, match_cfg, traffic, promote, cfg)
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="alignsearch-loop-")) if own_work else Path(work_dir)
    # text_only before late_fusion: late_fusion's round 0 fuses text_only's round-0 model.
    systems = sorted(cfg.systems, key=lambda s: s == "late_fusion")
    rows, decisions, comparisons, details, timings = [], [], [], {}, {}
    try:
        for seed in cfg.seeds:
            finals: dict[str, LoopModel] = {}
            text_zero: dict[str, LoopModel] = {}
            for system in systems:
                t = time.perf_counter()
                loop_dir = work / f"{system}-seed{seed}"
                zero = None
                if system == "late_fusion" and "text_only" in text_zero:
                    zero = functools.partial(_late_fusion_zero, inputs, loop_dir, seed, text_zero["text_only"])
                result = run_loop(inputs, system, seed, loop_dir, round_zero=zero)
                if system == "text_only":
                    text_zero["text_only"] = result.round_zero
                rows += result.rows
                decisions += result.decisions
                comparisons += result.comparisons
                details.update({(system, seed, r): d for r, d in result.details.items()})
                finals[system] = result.champion
                timings[f"{system}/seed{seed}"] = round(time.perf_counter() - t, 1)
                _progress(Path(out_dir), rows, decisions, comparisons, timings)
            t = time.perf_counter()
            comparisons += _final_comparisons(inputs, finals, seed, work / f"final-seed{seed}")
            timings[f"final/seed{seed}"] = round(time.perf_counter() - t, 1)
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - started
    result = LoopBenchmarkResult(rows, decisions, comparisons, details, seconds, timings)
    result.paths = write_reports(result, cfg, promote, out_dir=Path(out_dir))
    return result


def _late_fusion_zero(inputs: LoopInputs, loop_dir: Path, seed: int, text_only: LoopModel) -> LoopModel:
    """late_fusion's round 0 over text_only's round-0 model (the same data and seed: the model it
    would train itself); its time counts text_only's training."""
    model = train_model(inputs, "late_fusion", ROUND_ZERO, loop_dir / "base", seed, loop_dir / "round-0",
                        text_scorer_dir=text_only.scorer_dir / "scorer")
    model.seconds += text_only.seconds
    return model


def _progress(out_dir: Path, rows: list[dict], decisions: list[dict], comparisons: list[dict],
              timings: dict[str, float]) -> None:
    """What is done so far (an hour-long run shows its progress, and a failure keeps it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"rows": rows, "decisions": decisions, "comparisons": comparisons, "timings": timings}
    (out_dir / PROGRESS_FILE).write_text(json.dumps(payload, indent=1, default=str) + "\n")


def _final_comparisons(inputs: LoopInputs, finals: dict[str, LoopModel], seed: int, work_dir: Path) -> list[dict]:
    """Each pair of final champions interleaved on the same simulated people (the later system of
    `finals` as the challenger), each pair with a traffic log of its own."""
    if work_dir.exists():
        shutil.rmtree(work_dir)
    out = []
    names = list(finals)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            traffic = inputs.traffic.model_copy(update={
                "store_uri": f"sqlite:///{work_dir / f'{first}-{second}.db'}", "retention_days": None})
            work_dir.mkdir(parents=True, exist_ok=True)
            verdict, preferences, _ = interleave(inputs, finals[first], finals[second], traffic,
                                                 inputs.cfg.final_searches, simulator_seed(seed, 999, PHASE_FINAL))
            out.append({**_comparison(inputs, "final", seed, finals[second], finals[first], verdict, preferences),
                        "system": f"{second} vs {first}"})
    return out
