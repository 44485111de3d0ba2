"""The retraining flow: dataset → validation → visual features → alignment → matcher →
evaluation → registration in MLflow (alias `challenger`).

Tasks are thin wrappers around the component stage functions. Each is cached by Prefect on a
stage key: a hash of (DVC dataset hash, the stage's params, the code the stage runs, the upstream
stage keys). "The code the stage runs" is `components.stages.stage_code(stage)`, the same list
`dvc.yaml` declares as the stage's deps, plus the task's own source here: an edit to the HTTP
service does not retrain the alignment, an edit to validation re-validates.

Each stage writes into a temporary directory beside `paths.flow_dir/<stage>/<key>` and renames
it there when complete, so a killed run never leaves a half-written stage directory to be reused;
a finished directory is reused even when Prefect's own result record is gone. An unchanged rerun
reuses every output and goes straight to the registration check, which finds the identical
version already registered and adds none. One retrain at a time per `paths.flow_dir`: a second
one refuses with "already running" (an OS file lock, released when its holder dies, so a killed
run never blocks the next one).

Every flow run opens one MLflow run (params, dataset hash, git commit, per-stage metrics and
timings, validation report, alignment gallery, plots, model); Lightning logs into it too.
A run that fails anywhere is marked FAILED in MLflow and registers nothing.

With `loop=True` (the schedule, the prefect.yaml deployment, `--loop`) the flow closes the loop:
the `ingest` task turns the searches and clicks logged since the last ingest into the next
version of the dataset (`traffic.dataset_dir`), every later stage works on that version, and
the matcher warm-starts from the champion (its weights and learning rate, `match.warm_start_steps`
steps) when `match.warm_start` holds and the champion fits (`components.match.systems.
check_warm_start`); otherwise it trains cold and says why. The run and the registered version
carry `alignsearch.loop.*` tags: the dataset version it started from, the new one, how many
searches, clicks and new queries it learned from, and where the matcher started. No new events:
the same dataset hash, so every stage key is the same, every stage a cache hit, and the
registration finds the identical version (nothing registered).

The stage modules that load torch are imported inside the tasks, not at the top: torch reads
its CPU kernel settings when it is imported, and `setup_runtime` (called by the flow) must set
them first, or the same seed gives other numbers on another processor (flows/runtime.py).
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
import socket
import tempfile
import textwrap
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.context import TaskRunContext

from components.align.config import AlignConfig
from components.catalogue.pyfunc import log_search_model
from components.config import Params, load_params
from components.data.build import build_dataset
from components.data.config import DataConfig, ValidateConfig
from components.data.format import ADS_FILE, dataset_hash, read_dataset
from components.data.validate import ValidationError, validate_dataset
from components.evaluate.stage import choose_system, run_evaluate
from components.match.config import MatchConfig
from components.outputs import atomic_dir, is_scratch
from components.registry.card import refresh_card
from components.registry.config import RegistryConfig
from components.registry.models import open_model
from components.registry.tracking import client as mlflow_client
from components.registry.tracking import (
    code_version,
    configure_mlflow,
    git_state,
    log_dataset_input,
    log_metrics,
    log_params,
    numeric_metrics,
    redact_params,
    redact_uri,
    source_tags,
)
from components.registry.versions import CHAMPION, by_alias, registered
from components.registry.versions import register as register_version
from components.retrieve.config import IndexConfig
from components.search.bundle import SCORER_DIR, build_bundle
from components.stages import files_version, module_code, stage_code_version
from components.traffic.config import TrafficConfig
from components.vision.config import PartsConfig
from flows.runtime import setup_runtime

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DONE_FILE = "DONE"  # written last into a stage directory: its outputs are complete
LOCK_FILE = ".retrain.lock"
SOURCE_NAME = "flows/retrain.py:retrain_flow"  # the run page's Source, the same from CLI, schedule, deployment
LOOP_TAG = "alignsearch.loop"  # prefix of the loop's run and version tags
# On a version: the version its matcher warm-started from ("cold" when none): a loop run on the
# dataset that version was trained on repeats that start (the same key: a cache hit).
WARM_FROM_TAG = f"{LOOP_TAG}.warm_start_version"
# Settings that only say how the loop's matcher starts; the start itself is in the key.
WARM_START_KEYS = ("warm_start", "warm_start_steps")
LOOP_COUNTS = ("impressions", "clicks", "new_queries", "positives", "negatives")  # what an ingest learned from


@dataclass
class RetrainResult:
    run_id: str
    dataset_dir: str
    dataset_hash: str
    model_name: str
    version: str
    version_created: bool
    system: str = "ours"  # what was registered (on a title-less dataset, the better on valid)
    metrics: dict[str, float] = field(default_factory=dict)
    cached_stages: list[str] = field(default_factory=list)
    seconds: float = 0.0
    loop: dict[str, Any] = field(default_factory=dict)  # the loop's tags (empty when the loop is off)


# --------------------------------------------------------------------------- cache keys


def stage_key(*parts: Any) -> str:
    """A short, stable hash of the JSON of `parts` (configs, hashes, upstream keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _key_from_stage(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return f"alignsearch-{context.task.name}-{parameters['key']}"


def code_key(stage: str, task_fn) -> str:
    """The code version of `stage`: the components it runs (`components.stages`, the list
    dvc.yaml declares), the task wrapper's own source in this file, and any `flows.*` helper
    the wrapper imports (with the components that helper imports)."""
    wrapper = inspect.getsource(getattr(task_fn, "fn", task_fn))
    helpers = sorted({node.module for node in ast.walk(ast.parse(textwrap.dedent(wrapper)))
                      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flows.")})
    return stage_key(stage_code_version(stage), hashlib.sha256(wrapper.encode()).hexdigest()[:16],
                     files_version(module_code(tuple(helpers))) if helpers else None)


def _stage_dir(root: Path, stage: str, key: str) -> Path:
    return Path(root) / stage / key


def _done(out_dir: Path) -> dict | None:
    """The payload a complete stage directory recorded, or None."""
    try:
        return json.loads((Path(out_dir) / DONE_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def _is_done(out_dir: Path) -> bool:
    return _done(out_dir) is not None


def _stage(out_dir: Path):
    """Where a stage writes: a scratch directory renamed to `out_dir` when the stage finished
    (`components.outputs.atomic_dir`). A finished directory that another run published
    meanwhile (same key, same inputs) is kept; an unfinished leftover (a failed validation's
    report) is replaced."""
    return atomic_dir(Path(out_dir), keep_existing=_is_done)


def _mark_done(tmp: Path, out_dir: Path, payload: dict) -> None:
    """Record `payload` (paths under `tmp` rewritten to `out_dir`) as the last file of the stage."""
    payload = json.loads(json.dumps(payload, default=str).replace(str(tmp), str(out_dir)))
    (tmp / DONE_FILE).write_text(json.dumps(payload) + "\n")


def _reused(out_dir: Path) -> dict | None:
    """A finished stage directory's payload, marked as reused (Prefect's record of it may be gone)."""
    done = _done(out_dir)
    return None if done is None else {**done, "reused": True}


STAGE_TASK = {"cache_key_fn": _key_from_stage, "persist_result": True}


class RetrainAlreadyRunning(RuntimeError):
    """Another retrain holds the lock on the same `paths.flow_dir`."""


_held_locks: dict[Path, int] = {}  # flow dirs whose lock this process holds -> depth


@contextmanager
def retrain_lock(flow_dir: Path):
    """Hold the one-retrain-per-`flow_dir` lock (refuse with `RetrainAlreadyRunning` if taken).

    An OS lock (`flock`) on `flow_dir/.retrain.lock`: the kernel releases it when the holder
    exits, however it dies, so a stale lock never blocks. The file names the holder (pid,
    host, start time) for the message; a leftover file from a dead holder is simply taken over.
    Re-entrant within a process: the CLI takes it before starting the flow (so a refusal is one
    line, not a failed flow run), the flow takes it again for callers that start it directly.
    """
    flow_dir = Path(flow_dir).resolve()
    if _held_locks.get(flow_dir):
        _held_locks[flow_dir] += 1
        try:
            yield flow_dir / LOCK_FILE
        finally:
            _held_locks[flow_dir] -= 1
        return
    flow_dir.mkdir(parents=True, exist_ok=True)
    path = flow_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise RetrainAlreadyRunning(
                f"another retrain is already running on {flow_dir} ({holder}); wait for it to finish "
                f"(its lock is released when it exits) or use another paths.flow_dir") from None
        previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if previous:
            log.info("taking over the retrain lock left by %s (no longer running)", previous)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        # Temporary stage directories left here are from killed runs (only the holder writes).
        for tmp in flow_dir.glob("*/.*"):
            if is_scratch(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        _held_locks[flow_dir] = 1
        try:
            yield path
        finally:
            _held_locks.pop(flow_dir, None)
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------- tasks


def flow_dataset_dir(data) -> Path:
    """The dataset a flow works on: `data.path` as given, else `data/<source>` (beside `data.out_dir`)
    where the flow builds `data.source`."""
    return Path(data.path) if data.path is not None else Path(data.out_dir).parent / data.source


@task(name="resolve-dataset", retries=2, retry_delay_seconds=5)
def resolve_dataset(data: dict) -> dict:
    """Build `data.source` into `data/<source>` (beside `data.out_dir`), or take `data.path`."""

    cfg = DataConfig(**data)
    # Absolute: the run and version record it, and a server or `promote` started from another
    # working directory opens it from there.
    dataset_dir = flow_dataset_dir(cfg).resolve()
    if cfg.path is None:
        build_dataset(cfg, dataset_dir)
    dataset = read_dataset(dataset_dir, strict=False)
    return {"dataset_dir": str(dataset_dir), "dataset_hash": dataset_hash(dataset_dir), "counts": dataset.counts(),
            "title_less": dataset.title_less}


@task(name="ingest", retries=1, retry_delay_seconds=5)
def ingest_events(base_dir: str, traffic: dict) -> dict:
    """The loop's dataset: `base_dir` plus every search and click logged since the last ingest,
    as the next version in `traffic.dataset_dir` (`components.traffic.ingest`). Never cached:
    the log is read each time; with nothing new the version (and its hash) stays the same."""
    from components.traffic.events import open_store
    from components.traffic.ingest import ingest

    cfg = TrafficConfig(**traffic)
    out_dir = Path(cfg.dataset_dir).resolve()
    before = dataset_hash(out_dir) if (out_dir / ADS_FILE).is_file() else None
    with open_store(cfg) as store:
        result = ingest(Path(base_dir), out_dir, store, cfg)
    dataset_dir = Path(result.dataset_dir).resolve()
    dataset = read_dataset(dataset_dir, strict=False)
    return {**json.loads(json.dumps(result.as_dict(), default=str)), "dataset_dir": str(dataset_dir),
            "previous_hash": before, "counts": dataset.counts(), "title_less": dataset.title_less}


@task(name="champion", retries=2, retry_delay_seconds=5)
def champion_version(registry: dict) -> dict:
    """The champion as the loop needs it: version, run, the dataset hash it was trained on and
    the version its matcher started from (`WARM_FROM_TAG`); {} when there is no champion. A
    registry error raises: it is not "no champion"."""
    cfg = RegistryConfig(**registry)
    champion = by_alias(cfg.model_name, CHAMPION)
    if champion is None:
        return {}
    tags = champion.tags or {}
    return {"version": str(champion.version), "run_id": champion.run_id or "",
            "dataset_hash": tags.get("dataset_hash"), "warm_from": tags.get(WARM_FROM_TAG)}


@task(name="open-matcher", retries=2, retry_delay_seconds=5)
def open_matcher(model_name: str, version: str, cache_dir: str) -> dict:
    """A registered version's matcher on local disk (its bundle's scorer, downloaded once into
    the cache), with the version's identity."""
    ref = open_model(f"models:/{model_name}/{version}", Path(cache_dir))
    return {"version": ref.version, "run_id": ref.run_id, "scorer_dir": str(ref.bundle_dir / SCORER_DIR)}


@task(name="validate", **STAGE_TASK)
def validate(key: str, dataset_dir: str, validation: dict, report_dir: str) -> dict:
    """Great Expectations validation; raises `ValidationError` (stopping the flow) on failure,
    with its report left in `report_dir` (a failed validation is not cached)."""

    report = Path(report_dir)
    if (done := _reused(report)) is not None:
        return done
    with _stage(report) as tmp:
        result = validate_dataset(Path(dataset_dir), ValidateConfig(**validation), report_dir=tmp)
        if result.success:
            _mark_done(tmp, report, {"report_dir": report_dir, "num_rules": result.num_rules,
                                     "metrics": {"seconds": round(result.seconds, 2)}})
        # The report of a failure is published too, with no DONE file: it is never taken for a
        # pass, and the next run replaces it.
    if not result.success:
        raise ValidationError(result)
    return _done(report)


@task(name="features", **STAGE_TASK)
def features(key: str, vision: dict, dataset_dir: str, out_dir: str, cache_dir: str,
             compute: dict | None = None) -> dict:
    """In-process, or as shard tasks on Dask when `compute` asks (flows/compute.py): same file."""
    # torch-bound: imported once setup_runtime has set torch's kernel settings (see module notes)
    from flows.compute import extract_features

    if (done := _reused(Path(out_dir))) is not None:
        return done
    with _stage(Path(out_dir)) as tmp:
        _mark_done(tmp, Path(out_dir), extract_features(vision, dataset_dir, str(tmp), cache_dir, compute))
    return _done(Path(out_dir))


@task(name="align", **STAGE_TASK)
def align(key: str, align_cfg: dict, dataset_dir: str, features_path: str, out_dir: str, cache_dir: str,
          gallery_size: int, fraction: float, query_seed: int) -> dict:

    # torch-bound: imported once setup_runtime has set torch's kernel settings (see module notes)
    from components.align.stage import run_align
    from components.vision.stage import load_features

    if (done := _reused(Path(out_dir))) is not None:
        return done
    with _stage(Path(out_dir)) as tmp:
        result = run_align(AlignConfig(**align_cfg), dataset_dir=Path(dataset_dir),
                           features=load_features(Path(features_path)), out_dir=tmp,
                           cache_dir=Path(cache_dir), gallery_size=gallery_size, fraction=fraction,
                           query_seed=query_seed)
        _mark_done(tmp, Path(out_dir), {
            "model_dir": str(result.model_dir), "words_path": str(result.words_path),
            "gallery_path": str(result.gallery_path) if result.gallery_path else None, "metrics": result.metrics})
    return _done(Path(out_dir))


@task(name="train-matcher", **STAGE_TASK)
def train_matcher(key: str, match_cfg: dict, system: str, dataset_dir: str, features_path: str,
                  words_path: str, out_dir: str, mlflow_run_id: str | None = None,
                  tracking_uri: str | None = None, warm_start: dict | None = None) -> dict:
    """`warm_start`: a `WarmStart` as a dict (the loop's champion), whose identity is in `key`."""

    # torch-bound: imported once setup_runtime has set torch's kernel settings (see module notes)
    from components.align.stage import load_ad_words
    from components.match.stage import run_train_matcher
    from components.match.systems import WarmStart
    from components.vision.stage import load_features

    if (done := _reused(Path(out_dir))) is not None:
        return done
    words, word_logits = load_ad_words(Path(words_path))
    with _stage(Path(out_dir)) as tmp:
        result = run_train_matcher(MatchConfig(**match_cfg), dataset_dir=Path(dataset_dir), out_dir=tmp,
                                   system=system, features=load_features(Path(features_path)),
                                   words=words, word_logits=word_logits,
                                   logger=_lightning_logger("matcher", mlflow_run_id, tracking_uri),
                                   warm_start=None if warm_start is None else WarmStart(
                                       **{**warm_start, "scorer_dir": Path(warm_start["scorer_dir"])}))
        _mark_done(tmp, Path(out_dir), {"scorer_dir": str(result.scorer_dir), "metrics": result.metrics})
    return _done(Path(out_dir))


@task(name="evaluate", **STAGE_TASK)
def evaluate(key: str, match_cfg: dict, seed: int, dataset_dir: str, scorer_dir: str, features_path: str,
             words_path: str, out_dir: str) -> dict:

    # torch-bound: imported once setup_runtime has set torch's kernel settings (see module notes)
    from components.align.stage import load_ad_words
    from components.vision.stage import load_features

    if (done := _reused(Path(out_dir))) is not None:
        return done
    words, word_logits = load_ad_words(Path(words_path))
    with _stage(Path(out_dir)) as tmp:
        result = run_evaluate(dataset_dir=Path(dataset_dir), scorer_dir=Path(scorer_dir), out_dir=tmp,
                              features=load_features(Path(features_path)), words=words, word_logits=word_logits,
                              seed=seed, match_cfg=MatchConfig(**match_cfg))
        _mark_done(tmp, Path(out_dir), {"metrics_path": str(result.metrics_path), "metrics": result.metrics,
                                        "plots": {k: str(v) for k, v in result.plot_paths.items()}})
    return _done(Path(out_dir))


@task(name="register", retries=2, retry_delay_seconds=10)
def register(run_id: str, model_key: str, registry: dict, vision: dict, index: dict, dataset_dir: str,
             dataset_hash: str, align_dir: str, scorer_dir: str, words_path: str, features_path: str | None,
             tags: dict[str, str]) -> dict:
    """Bundle, log and register the model, unless an identical one (same model key) already is.
    `features_path` (the features stage's output): a system with an image head encodes the
    catalogue from it, and every system's bundle takes its ads' word regions from it."""
    import mlflow

    # torch-bound: imported once setup_runtime has set torch's kernel settings (see module notes)
    from components.align.stage import load_ad_words
    from components.vision.stage import load_features

    cfg = RegistryConfig(**registry)
    existing = registered(cfg.model_name, model_key)  # made challenger unless champion (a retried run)
    if existing is not None:
        get_run_logger().info("identical model already registered: %s v%s", cfg.model_name, existing.version)
        return {"version": existing.version, "created": False}
    words, word_logits = load_ad_words(Path(words_path))
    with tempfile.TemporaryDirectory() as scratch:
        bundle = build_bundle(Path(scratch) / "bundle", align_dir=Path(align_dir), scorer_dir=Path(scorer_dir),
                              dataset_dir=Path(dataset_dir), words=words, word_logits=word_logits,
                              vision=PartsConfig(**vision), index_cfg=IndexConfig(**index),
                              dataset_hash=dataset_hash,
                              features=load_features(Path(features_path)) if features_path else None)
        with mlflow.start_run(run_id=run_id):
            info = log_search_model(bundle)
    version = register_version(info.model_uri, cfg.model_name, model_key=model_key,
                               tags={**tags, "run_id": run_id})
    refresh_card(cfg.model_name, version.version, registration=True)  # its description (never fails the task)
    return {"version": version.version, "created": True}


def _lightning_logger(prefix: str, run_id: str | None, tracking_uri: str | None):
    """Lightning's MLflow logger writing into the flow's run (keys prefixed by the stage)."""
    # torch-bound: imported once setup_runtime has set torch's kernel settings (see module notes)
    from components.registry.lightning import RunLogger

    if run_id is None:
        return None

    return RunLogger(run_id=run_id, tracking_uri=tracking_uri, prefix=prefix)


# --------------------------------------------------------------------------- the flow


def _refreshed_if_missing(task_fn, out_dir: Path):
    """The task, forced to recompute when its outputs are gone (the cache would point at them)."""
    return task_fn.with_options(refresh_cache=not (out_dir / DONE_FILE).is_file())


def _close_interrupted_runs(client, experiment_id: str, flow_dir: str) -> None:
    """Mark FAILED the runs of this flow dir still RUNNING: we hold its lock, so their process
    is gone (killed, or its machine went down) and nothing else will ever end them."""
    stale = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and "
                               f"tags.`alignsearch.flow_dir` = '{flow_dir}'")
    for run in stale:
        holder = run.data.tags.get("alignsearch.holder", "its process")
        client.set_tag(run.info.run_id, "alignsearch.failure", f"interrupted: {holder} ended without finishing")
        client.set_terminated(run.info.run_id, "FAILED")
        log.warning("marked interrupted run %s FAILED (%s no longer running)", run.info.run_id, holder)


def _log_dir(client, run_id: str, local_dir: Path, artifact_path: str) -> None:
    if local_dir.is_dir():
        client.log_artifacts(run_id, str(local_dir), artifact_path)


@flow(name="alignsearch-retrain", log_prints=True)
def retrain_flow(params: dict[str, Any], loop: bool = False) -> dict:
    """Retrain on the dataset `params` describe and register the result as `challenger`.

    `params`: the full parameter set (`Params.model_dump(mode="json", by_alias=True)`).
    `loop`: first ingest the logged searches and clicks into the next dataset version and
    train on that, warm-starting from the champion (module notes).
    Returns a `RetrainResult` as a dict.
    """
    setup_runtime()  # also when a deployment's worker, not the CLI, starts the run
    cfg = Params.model_validate(params)
    with retrain_lock(Path(cfg.paths.flow_dir)):
        return _retrain(cfg, params, loop)


def _match_key_cfg(match_cfg: dict) -> dict:
    """The matcher settings a key names: all but how a loop run starts (`WARM_START_KEYS`),
    which the key names as the start itself (`_warm_start_plan`), so `--cold` and a cold
    fallback share the cold run's cache."""
    return {k: v for k, v in match_cfg.items() if k not in WARM_START_KEYS}


def _warm_source(cfg: Params, champion: dict, dhash: str) -> tuple[str | None, str]:
    """(the version whose matcher a loop run starts from, or None for cold; why). The champion,
    unless it was trained on this very dataset version: then there is nothing new to learn, and
    the run repeats the champion's own start (the version it warm-started from, or cold), so its
    stage keys are the champion's and every stage is a cache hit."""
    name = cfg.registry.model_name
    if not cfg.match.warm_start:
        return None, "match.warm_start is false (a cold run was asked for)"
    if not champion:
        return None, f"no {name}@{CHAMPION} to start from"
    if champion["dataset_hash"] != dhash:
        return champion["version"], f"{name}@{CHAMPION}"
    started = champion.get("warm_from")
    if not started or started == "cold":
        return None, (f"{CHAMPION} v{champion['version']} was trained cold on this dataset version "
                      f"({dhash}): nothing new to learn, its start is repeated")
    return started, f"where {CHAMPION} v{champion['version']} started on this dataset version ({dhash})"


def _warm_start_plan(cfg: Params, system: str, source: dict | None, why: str) -> tuple[dict | None, str]:
    """(the `WarmStart` of `system` as a dict, or None for a cold run; what the tag says)."""
    # torch-bound: imported once setup_runtime has set torch's kernel settings (see module notes)
    from components.match.systems import WarmStartRefused, check_warm_start

    if source is None:
        return None, f"cold: {why}"
    label = f"{cfg.registry.model_name} v{source['version']} (run {source['run_id']})"
    try:
        warm = check_warm_start(system, cfg.match, Path(source["scorer_dir"]), label)
    except WarmStartRefused as exc:
        return None, f"cold: {exc}"
    return warm.as_dict(), f"warm: {label} ({why}), lr {warm.lr:g}, {warm.steps} steps"


def _ingest_tags(ingested: dict, base_hash: str) -> dict[str, str]:
    """The loop's tags from what the ingest did: the version it started from (the live dataset
    before, or the base dataset on the first ingest), the new one, and what it learned from."""
    tags = {LOOP_TAG: "on", f"{LOOP_TAG}.dataset_before": ingested.get("previous_hash") or base_hash,
            f"{LOOP_TAG}.dataset_after": ingested["dataset_hash"], f"{LOOP_TAG}.base_dataset": base_hash,
            f"{LOOP_TAG}.changed": str(bool(ingested.get("changed"))).lower()}
    for name in LOOP_COUNTS:
        tags[f"{LOOP_TAG}.{name}"] = str(ingested.get(name, 0))
    return tags


def _set_tags(client, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def _retrain(cfg: Params, params: dict[str, Any], loop: bool = False) -> dict:
    import mlflow

    started = time.perf_counter()
    logger = get_run_logger()
    experiment_id = configure_mlflow(cfg.registry)
    client = mlflow_client()
    uri = mlflow.get_tracking_uri()
    # The whole code base, for the run page; each stage's key uses only the code it runs.
    code = code_version([REPO_ROOT / "components", Path(__file__)])
    flow_dir_tag = str(Path(cfg.paths.flow_dir).resolve())
    _close_interrupted_runs(client, experiment_id, flow_dir_tag)
    run = client.create_run(experiment_id, run_name=f"retrain-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={"alignsearch.code_version": code, **git_state(REPO_ROOT),
                                  **source_tags(SOURCE_NAME, REPO_ROOT), "alignsearch.system": cfg.registry.system,
                                  "alignsearch.flow_dir": flow_dir_tag,
                                  "alignsearch.holder": f"pid {os.getpid()} on {socket.gethostname()}"})
    run_id = run.info.run_id
    log_params(client, run_id, params)
    client.log_dict(run_id, redact_params(params), "params.json")
    root, cache_dir = Path(cfg.paths.flow_dir), str(cfg.data.cache_dir)
    timings: dict[str, float] = {}
    cached: list[str] = []

    def timed(stage: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        state = fn(*args, return_state=True, **kwargs)
        timings[stage] = round(time.perf_counter() - t0, 2)
        value = state.result()  # re-raises the task's exception when it failed
        if state.name == "Cached" or (isinstance(value, dict) and value.get("reused")):
            cached.append(stage)
        return value

    try:
        dataset = timed("dataset", resolve_dataset, cfg.data.model_dump(mode="json"))
        loop_tags: dict[str, str] = {}
        if loop:
            base_hash = dataset["dataset_hash"]
            dataset = timed("ingest", ingest_events, dataset["dataset_dir"], cfg.traffic.model_dump(mode="json"))
            loop_tags = _ingest_tags(dataset, base_hash)
        dataset_dir, dhash = dataset["dataset_dir"], dataset["dataset_hash"]
        warm_source, warm_why = None, ""
        if loop:
            champion = champion_version(cfg.registry.model_dump(mode="json"))
            loop_tags[f"{LOOP_TAG}.champion_dataset"] = (champion.get("dataset_hash") or "unknown") if champion \
                else "none"
            source_version, warm_why = _warm_source(cfg, champion, dhash)
            if source_version is not None:
                warm_source = open_matcher(cfg.registry.model_name, source_version, cache_dir)
            _set_tags(client, run_id, loop_tags)
            log_metrics(client, run_id, {f"loop/{name}": float(dataset.get(name) or 0) for name in LOOP_COUNTS})
            logger.info("loop: dataset %s -> %s (%s searches, %s clicks, %s new queries)",
                        loop_tags[f"{LOOP_TAG}.dataset_before"], dhash, dataset.get("impressions"),
                        dataset.get("clicks"), dataset.get("new_queries"))
        client.set_tag(run_id, "dataset_hash", dhash)
        client.set_tag(run_id, "dataset_dir", dataset_dir)
        client.log_param(run_id, "dataset_hash", dhash)
        log_dataset_input(client, run_id, Path(dataset_dir), dhash, dataset["counts"])
        validation = cfg.validation.model_dump(mode="json")
        valid_key = stage_key("validate", dhash, validation, code_key("validate", validate))
        report_dir = _stage_dir(root, "validation", valid_key)
        try:
            timed("validate", _refreshed_if_missing(validate, report_dir), valid_key, dataset_dir, validation,
                  str(report_dir))
        finally:  # the report matters most when validation failed
            _log_dir(client, run_id, report_dir, "validation")

        vision = cfg.vision.model_dump(mode="json")
        feat_key = stage_key("features", dhash, vision, code_key("features", features))
        feat_dir = _stage_dir(root, "features", feat_key)
        feats = timed("features", _refreshed_if_missing(features, feat_dir), feat_key, vision, dataset_dir, str(feat_dir),
                      cache_dir, compute=cfg.compute.model_dump(mode="json"))

        align_cfg = cfg.align.model_dump(mode="json")
        # The alignment sees the click text of the matcher's training queries (same fraction and seed).
        query_share = {"train_fraction": cfg.match.train_fraction, "seed": cfg.match.seed}
        align_key = stage_key("align", feat_key, align_cfg, query_share, cfg.benchmark.gallery_size,
                              code_key("align", align))
        align_dir = _stage_dir(root, "align", align_key)
        aligned = timed("align", _refreshed_if_missing(align, align_dir), align_key, align_cfg, dataset_dir,
                        feats["features_path"], str(align_dir), cache_dir, cfg.benchmark.gallery_size,
                        cfg.match.train_fraction, cfg.match.seed)

        match_cfg = cfg.match.model_dump(mode="json")
        match_key_cfg = _match_key_cfg(match_cfg)
        candidates = [cfg.registry.system]
        if dataset["title_less"] and cfg.registry.title_less_system not in (None, cfg.registry.system):
            candidates.append(cfg.registry.title_less_system)  # words alone may lose to image features there
        trained: dict[str, tuple[str, dict, dict]] = {}  # system -> (matcher key, matcher, evaluation)
        starts: dict[str, tuple[str, str]] = {}  # system -> (version it warm-started from or "cold", why)
        for position, candidate in enumerate(candidates):
            suffix = "" if position == 0 else f"/{candidate}"
            warm, start = _warm_start_plan(cfg, candidate, warm_source, warm_why) if loop else (None, "")
            # A warm start is named by the version it starts from (the run id is unique across
            # stores), its rate and steps; a cold run's key is the one a plain retrain has.
            warm_key = [] if warm is None else [{"from": (warm_source["version"], warm_source["run_id"]),
                                                 "lr": warm["lr"], "steps": warm["steps"]}]
            match_key = stage_key("matcher", align_key, match_key_cfg, candidate,
                                  code_key("train_matcher", train_matcher), *warm_key)
            match_dir = _stage_dir(root, "matcher", match_key)
            if loop:
                starts[candidate] = (warm_source["version"] if warm is not None else "cold", start)
                logger.info("loop: %s starts %s", candidate, start)
            matcher = timed(f"train_matcher{suffix}", _refreshed_if_missing(train_matcher, match_dir), match_key,
                            match_cfg, candidate, dataset_dir, feats["features_path"], aligned["words_path"],
                            str(match_dir), mlflow_run_id=run_id, tracking_uri=uri, warm_start=warm)
            eval_key = stage_key("evaluate", match_key, match_key_cfg, cfg.promote.seed,
                                 code_key("evaluate", evaluate))
            eval_dir = _stage_dir(root, "evaluate", eval_key)
            evaluation = timed(f"evaluate{suffix}", _refreshed_if_missing(evaluate, eval_dir), eval_key, match_cfg,
                               cfg.promote.seed, dataset_dir, matcher["scorer_dir"], feats["features_path"],
                               aligned["words_path"], str(eval_dir))
            trained[candidate] = (match_key, matcher, evaluation)
        choice = {c: e["metrics"].get(c, {}).get("valid", {}).get("ndcg@10") for c, (_, _, e) in trained.items()}
        system = choose_system(choice)
        match_key, matcher, evaluation = trained[system]
        if loop:  # the registered system's start is the one its version carries
            loop_tags[WARM_FROM_TAG], loop_tags[f"{LOOP_TAG}.warm_start"] = starts[system]
            _set_tags(client, run_id, loop_tags)
        if len(candidates) > 1:
            client.set_tag(run_id, "alignsearch.system", system)
            client.set_tag(run_id, "alignsearch.system_choice", json.dumps({"valid ndcg@10": choice, "chosen": system}))
            logger.info("title-less dataset: %s registered (valid ndcg@10 %s)", system, choice)

        metrics = {**numeric_metrics(feats["metrics"], "features/"), **numeric_metrics(aligned["metrics"], "align/"),
                   **numeric_metrics(matcher["metrics"], "matcher/"),
                   **{k: v for *_, e in trained.values() for k, v in numeric_metrics(e["metrics"], "eval/").items()},
                   **{f"{k}/seconds": v for k, v in timings.items()}}
        headline = evaluation["metrics"].get(system, {}).get("test", {})
        metrics.update(numeric_metrics(headline, "test/"))
        log_metrics(client, run_id, metrics)
        client.set_tag(run_id, "alignsearch.cached_stages", ",".join(cached) or "none")
        if aligned.get("gallery_path"):
            client.log_artifact(run_id, aligned["gallery_path"], "gallery")
        for plot in evaluation["plots"].values():
            client.log_artifact(run_id, plot, "plots")
        client.log_artifact(run_id, evaluation["metrics_path"], "evaluation")

        model_key = stage_key("model", match_key, vision, cfg.retrieve.model_dump(mode="json"),
                              cfg.registry.model_name, code_key("register", register))
        client.set_tag(run_id, "alignsearch.model_key", model_key)
        registered = timed("register", register, run_id, model_key, cfg.registry.model_dump(mode="json"), vision,
                           cfg.retrieve.model_dump(mode="json"), dataset_dir, dhash, aligned["model_dir"],
                           matcher["scorer_dir"], aligned["words_path"],
                           feats["features_path"],
                           {"dataset_hash": dhash, "dataset_dir": dataset_dir, "code_version": code,
                            **git_state(REPO_ROOT), **loop_tags})
        client.log_metric(run_id, "register/seconds", timings["register"])
        client.set_tag(run_id, "alignsearch.model_version", registered["version"])
        client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        client.set_tag(run_id, "alignsearch.failure", redact_uri(f"{type(exc).__name__}: {exc}")[:5000])
        client.set_terminated(run_id, "FAILED")
        logger.error("retraining failed; nothing registered (MLflow run %s)", run_id)
        raise
    result = RetrainResult(run_id=run_id, dataset_dir=dataset_dir, dataset_hash=dhash,
                           model_name=cfg.registry.model_name, version=registered["version"],
                           version_created=registered["created"], system=system, metrics=metrics,
                           cached_stages=cached,
                           seconds=round(time.perf_counter() - started, 2), loop=loop_tags)
    logger.info("registered %s v%s (%s) in %.0f s; cached stages: %s", result.model_name, result.version,
                "new" if result.version_created else "already registered", result.seconds, cached or "none")
    return result.__dict__


if __name__ == "__main__":  # python -m flows.retrain [--loop] [--set key=value ...]: one local run
    import sys

    args = [arg for arg in sys.argv[1:] if arg != "--loop"]
    overrides = [arg for flag, arg in zip(args[::2], args[1::2], strict=False) if flag == "--set"]
    print(json.dumps(retrain_flow(load_params(Path("params.yaml"), overrides).model_dump(mode="json", by_alias=True),
                                  loop="--loop" in sys.argv[1:]), indent=2, default=str))
