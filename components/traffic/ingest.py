"""Ingest: the logged searches and clicks become the next version of the dataset.

`ingest(base_dir, out_dir, store, cfg)` reads the events after the last ingest (the store's
`Watermark`) and writes, at `out_dir`, the base dataset (its ads, images hard-linked, queries
and qrels) plus what the events say, in the interchange format (docs/dataset-format.md):

- every search's query text, normalised (case and spacing); a text equal to a base query's
  reuses that query's id and split, a new one gets an id and a split from a hash of its text
  (by the base's split fractions), so the same text lands in the same split in every version;
- clicked ads are positives (relevance 1) whose `weight` is the sum of their clicks'
  inverse-propensity weights under the position-based model fitted by EM to every search
  ingested so far (`clickmodel.py`; Joachims, Swaminathan & Schnabel, WSDM 2017; Wang et al.,
  WSDM 2018); a pair the base already marks relevant keeps its relevance, its weight grows;
- shown-but-skipped ads are negatives (relevance 0, weight 1) by Joachims' "skip above" rule
  (KDD 2002; Joachims et al., SIGIR 2005): an ad shown above a clicked ad of the same search,
  not clicked there, and never clicked for that query in any search ingested;
- a query's qrels stay in its split: a click (or skip) on an ad of another split is dropped
  and counted.

Every search ingested is kept in the version (`traffic/observations.parquet`: one row per
shown ad, clicked or not), which is what the click model is fitted to and where a late click
(its own `seq`, after the watermark, on a search ingested earlier) finds its search. The
version is derived from (base, observations) alone, so ingesting the same events again
changes nothing; when nothing is new nothing is written. Writes go through `atomic_dir`: a
crash leaves the previous version as it was. Inside a DVC repository the new version is
tracked (`dvc add`), so an older one comes back with `git checkout <rev> -- <out>.dvc && dvc
checkout <out>.dvc`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.data.format import (
    ADS_FILE,
    QRELS_FILE,
    QUERIES_FILE,
    README_FILE,
    SPLITS,
    Dataset,
    dataset_hash,
    read_dataset,
    write_dataset,
)
from components.outputs import atomic_dir
from components.traffic.clickmodel import fit_pbm, ipw_weights
from components.traffic.config import TrafficConfig
from components.traffic.events import Events, EventStore, Watermark, utc_now

log = logging.getLogger(__name__)

STATE_FILE = "ingest.json"
TRAFFIC_DIR = "traffic"
OBSERVATIONS_FILE = f"{TRAFFIC_DIR}/observations.parquet"
STATE_FORMAT = 1
NEW_QUERY_PREFIX = "live-"
# One row per ad a search showed: the search, its normalised query, the ad, its position, and
# the click on it (click_id None when not clicked).
OBSERVATION_COLUMNS = {"event_id": "string", "time": "datetime64[us, UTC]", "query": "string",
                       "ad_id": "string", "position": "int64", "clicked": "bool", "click_id": "string"}
# Files of the version that ingest writes itself; everything else of the base is linked.
_OWN_NAMES = {ADS_FILE, QUERIES_FILE, QRELS_FILE, README_FILE, STATE_FILE, TRAFFIC_DIR}


@dataclasses.dataclass(frozen=True)
class IngestResult:
    """What an ingest did. `impressions` and `clicks`: events this ingest took in from the log
    (0 when nothing was new). `new_queries`, `positives`, `negatives`: what the version holds
    beyond the base dataset (queries the base does not have, qrels from clicks, qrels from
    skips). `changed`: a new version was written (False: the previous one is as it was)."""

    dataset_dir: Path
    dataset_hash: str
    changed: bool
    impressions: int
    clicks: int
    new_queries: int
    positives: int
    negatives: int
    cross_split_clicks: int = 0
    orphan_clicks: int = 0
    judged_irrelevant_clicks: int = 0  # clicks on a pair the base judges not relevant: the base wins

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["dataset_dir"] = str(self.dataset_dir)
        return out


def normalize_query(text: object) -> str:
    """The query text a dataset keeps: case folded, spacing collapsed ("Red  Car " -> "red car")."""
    return " ".join(str(text).casefold().split()) if isinstance(text, str) else ""


def _unit_hash(text: str, salt: str) -> float:
    """A number in [0, 1) fixed by `text` (the same on every machine and in every version)."""
    return int(hashlib.sha256(f"{salt}:{text}".encode()).hexdigest()[:15], 16) / 16**15


def split_fractions(queries: pd.DataFrame) -> dict[str, float]:
    """The base dataset's share of queries per split, what new queries are split by."""
    counts = queries["split"].astype(str).value_counts()
    total = int(counts.sum())
    if total == 0:
        raise ValueError("the base dataset has no queries: no split fractions to follow")
    return {s: int(counts.get(s, 0)) / total for s in SPLITS}


def query_split(text: str, fractions: dict[str, float]) -> str:
    """The split of a new query: a hash of its normalised text cut by the cumulative fractions."""
    u, start = _unit_hash(text, "split"), 0.0
    names = [s for s in SPLITS if fractions.get(s, 0) > 0]
    for name in names:
        start += fractions[name]
        if u < start:
            return name
    return names[-1]


def query_id_for(text: str, taken: set[str]) -> str:
    """The id of a new query: a hash of its normalised text (longer when that id is taken)."""
    digest = hashlib.sha256(text.encode()).hexdigest()
    for length in (12, 20, 64):
        query_id = f"{NEW_QUERY_PREFIX}{digest[:length]}"
        if query_id not in taken:
            return query_id
    raise ValueError(f"no free query id for {text!r}")


# --------------------------------------------------------------------------- state


def _settings(cfg: TrafficConfig) -> dict[str, Any]:
    """The settings a version depends on: another value gives another version."""
    return {"ipw_clip": cfg.ipw_clip, "em_max_iter": cfg.em_max_iter, "em_tol": cfg.em_tol}


def read_state(out_dir: Path) -> dict[str, Any] | None:
    """The state an ingest left in `out_dir` (None when none did)."""
    path = Path(out_dir) / STATE_FILE
    if not path.is_file():
        return None
    state = json.loads(path.read_text())
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: ingest state format {state.get('format')!r}, expected {STATE_FORMAT}")
    return state


def _empty_observations() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in OBSERVATION_COLUMNS.items()})


def read_observations(out_dir: Path) -> pd.DataFrame:
    """Every search ingested into the version at `out_dir` (OBSERVATION_COLUMNS), or none."""
    path = Path(out_dir) / OBSERVATIONS_FILE
    if not path.is_file():
        return _empty_observations()
    return pd.read_parquet(path).astype(OBSERVATION_COLUMNS)


def _impression_rows(impressions: pd.DataFrame) -> pd.DataFrame:
    """Observations (not clicked) of the ads each impression showed."""
    rows = [(event_id, time, normalize_query(query), str(hit["ad_id"]), int(hit["position"]), False, None)
            for event_id, time, query, hits in zip(impressions["event_id"], impressions["time"],
                                                   impressions["query"], impressions["hits"], strict=True)
            for hit in hits]
    frame = pd.DataFrame(rows, columns=list(OBSERVATION_COLUMNS))
    return frame.astype(OBSERVATION_COLUMNS) if len(frame) else _empty_observations()


def _find_searches(store: EventStore, request_ids: set[str], clicks: pd.DataFrame,
                   cfg: TrafficConfig, now: dt.datetime) -> pd.DataFrame:
    """Impressions of late clicks that neither this read nor an earlier ingest brought: first
    the log's last `click_window_s` before the clicks (a click is refused later than that after
    its search), then one by one (an imported click may be older)."""
    if not request_ids:
        return pd.DataFrame(columns=["event_id", "time", "query", "hits"])
    times = clicks.loc[clicks["request_id"].isin(request_ids), "time"]
    start = min(times.min().to_pydatetime(), now) - dt.timedelta(seconds=cfg.click_window_s)
    window = store.read(start=start).impressions
    found = window[window["event_id"].isin(request_ids)]
    rows = [found[["event_id", "time", "query", "hits"]]]
    for request_id in sorted(request_ids - set(found["event_id"])):
        impression = store.impression(request_id)
        if impression is not None:
            rows.append(pd.DataFrame([{
                "event_id": impression.event_id, "time": pd.Timestamp(impression.time), "query": impression.query,
                "hits": [{"ad_id": h.ad_id, "position": h.position} for h in impression.hits]}]))
    return pd.concat(rows, ignore_index=True)


def merge_events(previous: pd.DataFrame, events: Events, store: EventStore, cfg: TrafficConfig,
                 now: dt.datetime) -> tuple[pd.DataFrame, int, int]:
    """The observations of every search ingested so far with `events` added: new searches
    appended (a search already there stays as it was), new clicks marked on the ad of their
    search. Returns (observations, clicks taken in, clicks whose search or ad is not in the log)."""
    obs = pd.concat([previous, _impression_rows(events.impressions)], ignore_index=True)
    obs = obs.drop_duplicates(["event_id", "ad_id"], keep="first").reset_index(drop=True)
    clicks = events.clicks
    missing = set(clicks["request_id"].astype(str)) - set(obs["event_id"])
    if missing:
        obs = pd.concat([obs, _impression_rows(_find_searches(store, missing, clicks, cfg, now))], ignore_index=True)
        obs = obs.drop_duplicates(["event_id", "ad_id"], keep="first").reset_index(drop=True)
    row_of = {(e, a): i for i, (e, a) in enumerate(zip(obs["event_id"], obs["ad_id"], strict=True))}
    taken = orphans = 0
    clicked, click_id = obs["clicked"].to_numpy().copy(), obs["click_id"].astype(object).to_numpy().copy()
    for request_id, ad_id, cid in zip(clicks["request_id"].astype(str), clicks["ad_id"].astype(str),
                                      clicks["click_id"].astype(str), strict=True):
        row = row_of.get((request_id, ad_id))
        if row is None:  # its search was deleted by retention, or never showed that ad
            orphans += 1
        elif not clicked[row]:
            clicked[row], click_id[row] = True, cid
            taken += 1
    obs["clicked"], obs["click_id"] = clicked, pd.array(click_id, dtype="string")
    return obs.astype(OBSERVATION_COLUMNS), taken, orphans


# --------------------------------------------------------------------------- the version


@dataclasses.dataclass
class _Derived:
    queries: pd.DataFrame
    qrels: pd.DataFrame
    new_queries: int
    positives: int
    negatives: int
    cross_split_clicks: int
    unknown_ad_clicks: int
    judged_irrelevant_clicks: int
    propensities: list[float | None]


def skip_above(obs: pd.DataFrame) -> pd.DataFrame:
    """The skipped observations by Joachims' skip-above rule: in a search with a click, the ads
    shown above its lowest click and not clicked in that search (columns of `obs`)."""
    lowest_click = obs[obs["clicked"]].groupby("event_id")["position"].max()
    # No click at all (a first ingest of an empty log): map gives an untyped empty column.
    below = obs["event_id"].map(lowest_click).astype(float)
    return obs[below.notna() & (obs["position"] < below) & ~obs["clicked"]]


def derive(base: Dataset, obs: pd.DataFrame, cfg: TrafficConfig) -> _Derived:
    """The queries and qrels of the version: the base's plus what the observations say."""
    # A text may be a base query in several splits (each split has its own query ids): a shown
    # ad then belongs to that text's query in the ad's split, where there is one.
    existing: dict[str, dict[str, str]] = {}
    base_queries = base.queries.sort_values("query_id", kind="stable")
    for query_id, text, split in zip(base_queries["query_id"].astype(str), base_queries["text"],
                                     base_queries["split"].astype(str), strict=True):
        existing.setdefault(normalize_query(text), {}).setdefault(split, query_id)
    fractions = split_fractions(base.queries)
    taken_ids = set(base.queries["query_id"].astype(str))
    obs = obs[obs["query"].str.len() > 0]
    new_query: dict[str, tuple[str, str]] = {}
    for text in sorted(set(obs["query"]) - set(existing)):
        query_id = query_id_for(text, taken_ids)
        taken_ids.add(query_id)
        new_query[text] = (query_id, query_split(text, fractions))
    ad_split = dict(zip(base.ads["ad_id"].astype(str), base.ads["split"].astype(str), strict=True))

    def query_for(text: str, split_of_ad: str | None) -> tuple[str, str]:
        if text in new_query:
            return new_query[text]
        splits = existing[text]
        split = split_of_ad if split_of_ad in splits else next(s for s in SPLITS if s in splits)
        return splits[split], split

    def keyed(frame: pd.DataFrame) -> pd.DataFrame:
        """`frame` with the ad's split and the query (id, split) each row belongs to."""
        out = frame.assign(ad_split=frame["ad_id"].map(ad_split))
        keys = [query_for(t, s if isinstance(s, str) else None) for t, s in zip(out["query"], out["ad_split"],
                                                                                  strict=True)]
        return out.assign(query_id=[k[0] for k in keys], split=[k[1] for k in keys])

    # Positives: every click, with its inverse-propensity weight, summed per (query, ad).
    propensities: list[float | None] = []
    clicks = keyed(obs[obs["clicked"]])
    if len(clicks):
        model = fit_pbm(obs, max_iter=cfg.em_max_iter, tol=cfg.em_tol)
        propensities = [None if np.isnan(p) else float(p) for p in model.propensities]
        clicks = clicks.assign(weight=ipw_weights(clicks["position"].to_numpy(), model.propensities, cfg.ipw_clip))
    unknown_ad = clicks["ad_split"].isna()
    cross_split = ~unknown_ad & (clicks["ad_split"] != clicks["split"])
    clicks = clicks[~unknown_ad & ~cross_split]
    click_pairs = (clicks.groupby(["query_id", "ad_id", "split"], sort=True)["weight"].agg(["sum", "size"])
                   .reset_index() if len(clicks)
                   else pd.DataFrame(columns=["query_id", "ad_id", "split", "sum", "size"]))

    qrels = base.qrels.copy()
    qrels["weight"] = qrels["weight"].astype(float) if "weight" in qrels.columns else 1.0
    base_row = {(q, a): i for i, (q, a) in enumerate(zip(qrels["query_id"].astype(str), qrels["ad_id"].astype(str),
                                                         strict=True))}
    new_positive_rows = []
    weights = qrels["weight"].to_numpy().copy()
    relevance = qrels["relevance"].to_numpy()
    judged_irrelevant = 0
    for query_id, ad_id, split, weight, num_clicks in click_pairs.itertuples(index=False):
        row = base_row.get((query_id, ad_id))
        if row is None:
            new_positive_rows.append((query_id, ad_id, 1, split, float(weight)))
        elif relevance[row] > 0:  # the base's judgement stays; the clicks add to its weight
            weights[row] += float(weight)
        else:  # the base judged the pair not relevant: a judgement outweighs clicks (counted)
            judged_irrelevant += int(num_clicks)
    qrels["weight"] = weights

    # New queries: those with a positive from clicks (a query with no positive teaches nothing).
    new_ids = {q for q, _, _, _, _ in new_positive_rows} - set(base.queries["query_id"].astype(str))
    text_of = {query_id: text for text, (query_id, _) in new_query.items()}
    split_of = dict(new_query.values())
    new_queries = pd.DataFrame({"query_id": sorted(new_ids), "text": [text_of[q] for q in sorted(new_ids)],
                                "split": [split_of[q] for q in sorted(new_ids)]})
    kept_queries = set(base.queries["query_id"].astype(str)) | new_ids

    # Negatives: skip-above, never clicked for that query, not judged by the base, in the query's split.
    all_clicks = keyed(obs[obs["clicked"]])
    clicked_pairs = set(zip(all_clicks["query_id"], all_clicks["ad_id"], strict=True))
    skips = keyed(skip_above(obs))
    skips = skips[skips["query_id"].isin(kept_queries) & (skips["ad_split"] == skips["split"])]
    negatives = sorted({(q, a, s) for q, a, s in zip(skips["query_id"], skips["ad_id"], skips["split"], strict=True)
                        if (q, a) not in clicked_pairs and (q, a) not in base_row})
    added = pd.DataFrame(new_positive_rows + [(q, a, 0, s, 1.0) for q, a, s in negatives],
                         columns=["query_id", "ad_id", "relevance", "split", "weight"])
    out_qrels = pd.concat([qrels[["query_id", "ad_id", "relevance", "split", "weight"]], added], ignore_index=True)
    out_queries = pd.concat([base.queries[["query_id", "text", "split"]], new_queries], ignore_index=True)
    return _Derived(queries=out_queries, qrels=out_qrels, new_queries=len(new_queries),
                    positives=len(new_positive_rows), negatives=len(negatives),
                    cross_split_clicks=int(cross_split.sum()), unknown_ad_clicks=int(unknown_ad.sum()),
                    judged_irrelevant_clicks=judged_irrelevant, propensities=propensities)


def _link_or_copy(source: str, target: str) -> str:
    try:
        os.link(source, target)  # 3,000 images: a link each, no copy
    except OSError:  # another filesystem (or links refused): copy
        shutil.copy2(source, target)
    return target


def link_dataset_files(base_dir: Path, scratch: Path) -> None:
    """Everything of the base but the files the version writes itself, hard-linked."""
    for entry in sorted(base_dir.iterdir()):
        if entry.name in _OWN_NAMES:
            continue
        if entry.is_dir():
            shutil.copytree(entry, scratch / entry.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(scratch / entry.name))


def _readme(base_hash: str, state: dict[str, Any]) -> str:
    counts = state["counts"]
    return "\n".join([
        "alignsearch live dataset: the base dataset plus ingested searches and clicks (alignsearch traffic ingest).",
        "Interchange format: ads.parquet, queries.parquet, qrels.parquet (with weight), images/ (see the project README).",
        f"base dataset hash: {base_hash}",
        f"searches ingested: {counts['impressions']}, clicks: {counts['clicks']}",
        f"new queries: {counts['new_queries']}, positive qrels from clicks: {counts['positives']}, "
        f"negative qrels from skips: {counts['negatives']}",
        f"clicks dropped (ad of another split): {counts['cross_split_clicks']}, "
        f"(ad not in the base): {counts['unknown_ad_clicks']}, (search not in the log): {counts['orphan_clicks']}, "
        f"(pair the base judges not relevant): {counts.get('judged_irrelevant_clicks', 0)}",
        ""])


# --------------------------------------------------------------------------- DVC


def dvc_root(path: Path) -> Path | None:
    """The DVC repository `path` is inside (the nearest parent holding `.dvc/`), or None."""
    for parent in Path(path).resolve().parents:
        if (parent / ".dvc").is_dir():
            return parent
    return None


def _dvc_command() -> list[str]:
    beside = Path(sys.executable).with_name("dvc")  # the one installed with alignsearch
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("dvc")
    if found is None:
        raise FileNotFoundError("dvc is not installed (pip install dvc): needed to version the ingested dataset")
    return [found]


def dvc_track(path: Path, *, timeout_s: float = 600.0) -> Path | None:
    """`dvc add` the directory at `path` when it lies in a DVC repository (run in the
    repository, as a user would: DVC's Python API works relative to the working directory);
    returns the `.dvc` file written, None outside a repository."""
    root = dvc_root(path)
    if root is None:
        return None
    relative = Path(path).resolve().relative_to(root)
    done = subprocess.run([*_dvc_command(), "add", "--quiet", relative.as_posix()], cwd=root, capture_output=True,
                          text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"dvc add {relative} in {root} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-2000:]}")
    return root / relative.parent / f"{relative.name}.dvc"


# --------------------------------------------------------------------------- ingest


def ingest(base_dir: Path, out_dir: Path, store: EventStore, cfg: TrafficConfig, *,
           now: dt.datetime | None = None) -> IngestResult:
    """Turn the events logged since the last ingest into a new version of the dataset at
    `out_dir` (the base at `base_dir` plus every search and click ingested so far); nothing is
    written when nothing is new. See the module docstring for the rules."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    now = now or utc_now()
    if out_dir.resolve() == base_dir.resolve():
        raise ValueError(f"ingest would replace its base dataset {base_dir}: give another out_dir")
    base = read_dataset(base_dir)
    base_hash = dataset_hash(base_dir)
    state = read_state(out_dir)
    if state is None and out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} holds files but no {STATE_FILE}: not a dataset ingest wrote, left alone")
    since = Watermark(**state["watermark"]) if state else Watermark()
    events = store.read(since)
    same_base = state is not None and state["base_hash"] == base_hash and state["settings"] == _settings(cfg)
    if same_base and events.impressions.empty and events.clicks.empty:
        counts = state["counts"]
        log.info("ingest: nothing new since %s; %s stays as it was", since, out_dir)
        return IngestResult(out_dir, dataset_hash(out_dir), False, 0, 0, counts["new_queries"],
                            counts["positives"], counts["negatives"], counts["cross_split_clicks"],
                            counts["orphan_clicks"], counts.get("judged_irrelevant_clicks", 0))

    previous = read_observations(out_dir) if state else _empty_observations()
    obs, clicks_taken, orphans = merge_events(previous, events, store, cfg, now)
    derived = derive(base, obs, cfg)
    new_impressions = int(obs["event_id"].nunique() - previous["event_id"].nunique())
    counts = {"impressions": int(obs["event_id"].nunique()), "clicks": int(obs["clicked"].sum()),
              "new_queries": derived.new_queries, "positives": derived.positives, "negatives": derived.negatives,
              "cross_split_clicks": derived.cross_split_clicks, "unknown_ad_clicks": derived.unknown_ad_clicks,
              "judged_irrelevant_clicks": derived.judged_irrelevant_clicks,
              "orphan_clicks": orphans + (state["counts"]["orphan_clicks"] if state else 0)}
    new_state = {"format": STATE_FORMAT, "watermark": dataclasses.asdict(events.watermark),
                 "base_hash": base_hash, "settings": _settings(cfg), "counts": counts,
                 "propensities": derived.propensities}
    with atomic_dir(out_dir) as scratch:
        link_dataset_files(base_dir, scratch)
        write_dataset(Dataset(ads=base.ads, queries=derived.queries, qrels=derived.qrels), scratch)
        (scratch / TRAFFIC_DIR).mkdir()
        obs.to_parquet(scratch / OBSERVATIONS_FILE, index=False)
        (scratch / README_FILE).write_text(_readme(base_hash, new_state))
        (scratch / STATE_FILE).write_text(json.dumps(new_state, indent=2, sort_keys=True) + "\n")
    dvc_track(out_dir)
    result = IngestResult(out_dir, dataset_hash(out_dir), True, new_impressions, clicks_taken,
                          derived.new_queries, derived.positives, derived.negatives, derived.cross_split_clicks,
                          counts["orphan_clicks"], derived.judged_irrelevant_clicks)
    log.info("ingest: %d searches and %d clicks in; %s now has %d new queries, %d positive and %d negative qrels "
             "from traffic (%d clicks on ads of another split dropped) -> %s", result.impressions, result.clicks,
             out_dir, result.new_queries, result.positives, result.negatives, result.cross_split_clicks,
             result.dataset_hash)
    return result
