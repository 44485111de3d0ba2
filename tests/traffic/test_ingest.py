"""Ingest: logged searches and clicks become the next dataset version. Events are written
straight into a SQLite log; the base is the tests' synthetic dataset; every version is read
back through the interchange format (and validated by the project's validation)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from traffic_helpers import T0, click, impression

from components.data.config import ValidateConfig
from components.data.format import QRELS_FILE, Dataset, dataset_hash, read_dataset, write_dataset
from components.data.validate import validate_dataset
from components.traffic import ingest as ingest_module
from components.traffic.config import TrafficConfig
from components.traffic.events import Events, EventStore, Watermark
from components.traffic.ingest import (
    OBSERVATIONS_FILE,
    STATE_FILE,
    ingest,
    merge_events,
    normalize_query,
    query_split,
    read_observations,
    read_state,
    split_fractions,
)

CFG = TrafficConfig()


@pytest.fixture
def store(tmp_path):
    with EventStore(f"sqlite:///{tmp_path / 'traffic.db'}") as log_store:
        yield log_store


@pytest.fixture(scope="module")
def base(synthetic_dataset_dir):
    return read_dataset(synthetic_dataset_dir)


def _relevant(base, query_id: str) -> list[str]:
    qrels = base.qrels[(base.qrels["query_id"] == query_id) & (base.qrels["relevance"] > 0)]
    return sorted(qrels["ad_id"].astype(str))


def _others(base, query_id: str, split: str) -> list[str]:
    relevant = set(_relevant(base, query_id))
    return sorted(a for a in base.split(split).ads["ad_id"].astype(str) if a not in relevant)


def _qrels(out_dir: Path) -> dict[tuple[str, str], tuple[int, float]]:
    qrels = read_dataset(out_dir).qrels
    return {(q, a): (int(r), float(w)) for q, a, r, w in zip(qrels["query_id"], qrels["ad_id"], qrels["relevance"],
                                                             qrels["weight"], strict=True)}


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _traffic(base, rng: np.random.Generator, num: int, *, start: dt.datetime = T0) -> list:
    """`num` searches of train queries (ads in a random order, so positions vary), clicked by
    position-based people: position k examined with probability 1/k, relevant ads clicked."""
    train = base.split("train")
    queries = train.queries[train.queries["query_id"].isin(train.qrels["query_id"])].reset_index(drop=True)
    events = []
    for n in range(num):
        row = queries.iloc[int(rng.integers(len(queries)))]
        relevant = _relevant(base, row["query_id"])
        shown = list(rng.permutation(relevant[:3] + _others(base, row["query_id"], "train")[:7]))
        search = impression(row["text"], tuple(shown), time=start + dt.timedelta(seconds=10 * n))
        events.append(search)
        for position, ad_id in enumerate(shown, start=1):
            if ad_id in relevant and rng.random() < 1.0 / position:
                events.append(click(search, ad_id))
    return events


# --------------------------------------------------------------------------- accounting


def test_the_version_holds_exactly_the_clicks_with_their_weights(base, synthetic_dataset_dir, store, tmp_path):
    events = _traffic(base, np.random.default_rng(0), 200)
    store.append(events)
    clicks = [e for e in events if not hasattr(e, "hits")]
    out = tmp_path / "live"
    result = ingest(synthetic_dataset_dir, out, store, CFG)

    assert result.changed and result.impressions == 200 and result.clicks == len(clicks) > 50
    assert result.cross_split_clicks == 0 and result.orphan_clicks == 0
    obs = read_observations(out)
    assert sorted(obs.loc[obs["clicked"], "click_id"]) == sorted(c.click_id for c in clicks)  # none lost, none doubled
    assert len(obs) == sum(len(e.hits) for e in events if hasattr(e, "hits"))

    # Each clicked pair's weight: 1 for the base's judgement plus, per click, 1/propensity of
    # its position (clipped), under the propensities the version records.
    theta = np.array(read_state(out)["propensities"], dtype=float)
    text_to_id = dict(zip(base.split("train").queries["text"], base.split("train").queries["query_id"], strict=True))
    shown_query = {e.event_id: e.query for e in events if hasattr(e, "hits")}
    expected: dict[tuple[str, str], float] = {}
    for c in clicks:
        key = (text_to_id[shown_query[c.request_id]], c.ad_id)
        expected[key] = expected.get(key, 1.0) + min(1.0 / theta[c.position - 1], CFG.ipw_clip)
    qrels = _qrels(out)
    for key, weight in expected.items():
        assert qrels[key] == (1, pytest.approx(weight))
    # Everything else of the base is as it was (weight 1), and the ads and images are the base's.
    base_pairs = set(zip(base.qrels["query_id"], base.qrels["ad_id"], strict=True))
    assert all(qrels[p][1] == 1.0 for p in base_pairs - set(expected))
    version = read_dataset(out)
    pd.testing.assert_frame_equal(version.ads, base.ads)
    assert (out / "images").is_dir() and len(list((out / "images").iterdir())) == len(base.ads)
    image = sorted((out / "images").iterdir())[0]
    assert image.stat().st_ino == (synthetic_dataset_dir / "images" / image.name).stat().st_ino  # a link, not a copy

    validation = validate_dataset(out, ValidateConfig())
    assert validation.success, validation.failures


def test_ingesting_the_same_events_again_changes_nothing(base, synthetic_dataset_dir, store, tmp_path):
    events = _traffic(base, np.random.default_rng(1), 40)
    store.append(events)
    out = tmp_path / "live"
    first = ingest(synthetic_dataset_dir, out, store, CFG)
    files = _files(out)
    assert store.append(events) == (0, 0)  # the log skips events it holds: no new seq
    again = ingest(synthetic_dataset_dir, out, store, CFG)
    assert not again.changed and again.dataset_hash == first.dataset_hash
    assert (again.impressions, again.clicks) == (0, 0)
    assert (again.positives, again.negatives) == (first.positives, first.negatives)
    assert _files(out) == files  # not one file rewritten
    # A fresh directory from the same events is the same version, byte for byte.
    assert ingest(synthetic_dataset_dir, tmp_path / "other", store, CFG).dataset_hash == first.dataset_hash


def test_a_first_ingest_of_an_empty_log_is_the_base_dataset(base, synthetic_dataset_dir, store, tmp_path):
    # The first scheduled run of the loop, before any search was logged.
    first = ingest(synthetic_dataset_dir, tmp_path / "live", store, CFG)
    assert (first.impressions, first.clicks, first.new_queries, first.positives, first.negatives) == (0,) * 5
    live = read_dataset(tmp_path / "live")
    pd.testing.assert_frame_equal(live.qrels[base.qrels.columns].reset_index(drop=True),
                                  base.qrels.reset_index(drop=True), check_dtype=False)
    assert set(live.queries["query_id"]) == set(base.queries["query_id"])
    assert not ingest(synthetic_dataset_dir, tmp_path / "live", store, CFG).changed


def test_a_click_on_a_pair_the_base_judges_not_relevant_is_counted_not_learned(base, synthetic_dataset_dir, store,
                                                                                tmp_path):
    # A base with one explicit negative: (a training query, an ad of its split it is not relevant to).
    judged_dir = tmp_path / "judged"
    shutil.copytree(synthetic_dataset_dir, judged_dir)
    query = base.queries[base.queries["split"] == "train"].iloc[0]
    negative_ad = _others(base, query["query_id"], "train")[0]
    qrels = pd.concat([base.qrels, pd.DataFrame([{"query_id": query["query_id"], "ad_id": negative_ad,
                                                  "relevance": 0, "split": "train"}])], ignore_index=True)
    write_dataset(Dataset(ads=base.ads, queries=base.queries, qrels=qrels), judged_dir)
    shown = impression(query["text"], (negative_ad, *_relevant(base, query["query_id"])[:1]))
    store.append([shown, click(shown, negative_ad)])
    result = ingest(judged_dir, tmp_path / "live", store, CFG)
    assert result.judged_irrelevant_clicks == 1 and result.positives == 0
    assert _qrels(tmp_path / "live")[(query["query_id"], negative_ad)] == (0, 1.0)  # the judgement stays
    assert read_state(tmp_path / "live")["counts"]["judged_irrelevant_clicks"] == 1


def test_new_events_make_the_next_version_on_top_of_the_last(base, synthetic_dataset_dir, store, tmp_path):
    rng = np.random.default_rng(2)
    store.append(_traffic(base, rng, 30))
    out = tmp_path / "live"
    first = ingest(synthetic_dataset_dir, out, store, CFG)
    store.append(_traffic(base, rng, 30, start=T0 + dt.timedelta(hours=2)))
    second = ingest(synthetic_dataset_dir, out, store, CFG)
    assert second.changed and second.dataset_hash != first.dataset_hash and second.impressions == 30
    state = read_state(out)
    assert state["counts"]["impressions"] == 60 and state["watermark"]["impressions"] == 60
    assert read_observations(out)["event_id"].nunique() == 60


def test_a_late_click_on_a_search_ingested_before_is_picked_up(base, synthetic_dataset_dir, store, tmp_path):
    query = base.split("train").queries.iloc[0]
    shown = tuple(_others(base, query["query_id"], "train")[:4])
    search = impression(query["text"], shown)
    store.append([search])
    out = tmp_path / "live"
    first = ingest(synthetic_dataset_dir, out, store, CFG)
    assert first.clicks == 0 and (query["query_id"], shown[2]) not in _qrels(out)

    late = click(search, shown[2], after_s=1800)  # logged after the watermark, with its own seq
    store.append([late])
    second = ingest(synthetic_dataset_dir, out, store, CFG)
    assert second.changed and second.clicks == 1 and second.impressions == 0
    qrels = _qrels(out)
    assert qrels[(query["query_id"], shown[2])][0] == 1
    assert {a for (q, a), (r, _) in qrels.items() if q == query["query_id"] and r == 0} == set(shown[:2])
    obs = read_observations(out)
    assert obs.loc[obs["clicked"], "click_id"].tolist() == [late.click_id]


def test_a_click_whose_search_the_read_missed_is_found_in_the_log(base, store):
    """A search committed after the read took impressions but before it took clicks: the click
    is after the watermark, its search not among the events. Ingest finds it in the log's last
    click window (or by id)."""
    early, recent = impression("ball", ("a1", "a2"), time=T0 - dt.timedelta(days=2)), impression("ball", ("a1", "a2"))
    store.append([early, recent, late_recent := click(recent, "a2"), late_early := click(early, "a1", after_s=3000)])
    read = store.read(Watermark(impressions=2))
    assert read.impressions.empty and len(read.clicks) == 2
    previous = ingest_module._empty_observations()
    obs, taken, orphans = merge_events(previous, read, store, CFG, T0 + dt.timedelta(minutes=5))
    assert (taken, orphans) == (2, 0)
    assert sorted(obs.loc[obs["clicked"], "click_id"]) == sorted([late_recent.click_id, late_early.click_id])
    # A click whose search is gone from the log (retention) is counted, not invented.
    gone = Events(read.impressions, pd.DataFrame({"click_id": ["c9"], "request_id": ["nope"], "ad_id": ["a1"],
                                                  "position": [1], "time": [pd.Timestamp(T0)]}))
    _, taken, orphans = merge_events(previous, gone, store, CFG, T0)
    assert (taken, orphans) == (0, 1)


# --------------------------------------------------------------------------- rules


def test_query_text_and_split_rules(base, synthetic_dataset_dir, store, tmp_path):
    fractions = split_fractions(base.queries)
    assert sum(fractions.values()) == pytest.approx(1.0)
    # New texts: a deterministic split by hash, following the base's fractions over many texts.
    splits = pd.Series([query_split(f"query number {i}", fractions) for i in range(3000)]).value_counts(normalize=True)
    for name, share in fractions.items():
        assert splits[name] == pytest.approx(share, abs=0.03)
    in_train = next(t for t in (f"shiny widget {i}" for i in range(100)) if query_split(t, fractions) == "train")
    in_test = next(t for t in (f"shiny widget {i}" for i in range(100)) if query_split(t, fractions) == "test")
    train_ads = _others(base, "none", "train")
    existing = base.split("train").queries.iloc[0]

    searches = [impression(f"  {in_train.upper()} ", tuple(train_ads[:3])),   # new text, its split: train
                impression(in_test, tuple(train_ads[:3])),                     # new text in test, train ads shown
                impression(existing["text"].title() + "  ", tuple(train_ads[3:6]))]  # a base query, other casing
    store.append([*searches, click(searches[0], train_ads[1]), click(searches[1], train_ads[1]),
                  click(searches[2], train_ads[4])])
    out = tmp_path / "live"
    result = ingest(synthetic_dataset_dir, out, store, CFG)
    assert result.cross_split_clicks == 1  # the click of the test query on a train ad
    assert result.new_queries == 1  # the test query has no positive left: not added
    version = read_dataset(out)
    new = version.queries[~version.queries["query_id"].isin(base.queries["query_id"])]
    assert new["text"].tolist() == [normalize_query(in_train)] and new["split"].tolist() == ["train"]
    new_id = new["query_id"].iloc[0]
    assert new_id.startswith("live-")
    qrels = _qrels(out)
    assert qrels[(new_id, train_ads[1])][0] == 1
    assert qrels[(new_id, train_ads[0])] == (0, 1.0)  # skipped above the click
    assert qrels[(existing["query_id"], train_ads[4])][0] == 1  # the base query's id, not a new one
    assert set(version.qrels["split"][version.qrels["query_id"] == new_id]) == {"train"}
    assert validate_dataset(out, ValidateConfig()).success

    # The same text gets the same id and split in a version built elsewhere.
    again = ingest(synthetic_dataset_dir, tmp_path / "again", store, CFG)
    assert again.dataset_hash == result.dataset_hash


def test_skip_above_negatives(base, synthetic_dataset_dir, store, tmp_path):
    query = base.split("train").queries.iloc[1]
    a, b, c, d, e = _others(base, query["query_id"], "train")[:5]
    first = impression(query["text"], (a, b, c, d))          # click on c: a and b were skipped above it
    second = impression(query["text"], (e, b, a))            # click on b here: b is no negative
    third = impression(query["text"], (d, e))                # no click: skips say nothing
    store.append([first, second, third, click(first, c), click(second, b)])
    out = tmp_path / "live"
    result = ingest(synthetic_dataset_dir, out, store, CFG)
    qrels = {k: v for k, v in _qrels(out).items() if k[0] == query["query_id"]}
    negatives = {ad for (_, ad), (r, _) in qrels.items() if r == 0}
    positives_from_clicks = {ad for (_, ad), (r, _) in qrels.items() if r == 1 and ad in (a, b, c, d, e)}
    assert negatives == {a, e} and positives_from_clicks == {b, c}
    assert result.negatives == 2 and result.positives == 2


def test_clicks_at_low_positions_weigh_more(base, synthetic_dataset_dir, store, tmp_path):
    store.append(_traffic(base, np.random.default_rng(3), 400))
    out = tmp_path / "live"
    ingest(synthetic_dataset_dir, out, store, CFG)
    theta = np.array(read_state(out)["propensities"], dtype=float)
    print(f"\npropensities fitted to 400 searches clicked at 1/k: {np.round(theta, 3).tolist()}")
    assert theta[0] == 1.0 and np.all(np.diff(theta) < 0.05)  # falling, up to noise
    assert theta[-1] < 0.5 * theta[1]
    obs = read_observations(out)
    clicked = obs[obs["clicked"]]
    weights = np.minimum(1.0 / theta[clicked["position"].to_numpy() - 1], CFG.ipw_clip)
    by_position = pd.Series(weights).groupby(clicked["position"].to_numpy()).mean()
    assert by_position.loc[1] == 1.0 and by_position.loc[max(by_position.index)] > 2.0
    # So a pair clicked once at the bottom outweighs one clicked once at the top.
    rows = (clicked.groupby(["query", "ad_id"]).filter(lambda g: len(g) == 1))
    top, bottom = rows[rows["position"] == 1], rows[rows["position"] >= 8]
    assert len(top) and len(bottom)
    qrels = read_dataset(out).qrels.set_index(["query_id", "ad_id"])["weight"]
    text_to_id = dict(zip(base.split("train").queries["text"], base.split("train").queries["query_id"], strict=True))
    weight_of = lambda r: qrels[(text_to_id[r["query"]], r["ad_id"])]  # noqa: E731
    assert max(weight_of(r) for _, r in top.iterrows()) < min(weight_of(r) for _, r in bottom.iterrows())


# --------------------------------------------------------------------------- writes


def test_a_failing_write_leaves_the_previous_version(base, synthetic_dataset_dir, store, tmp_path, monkeypatch):
    store.append(_traffic(base, np.random.default_rng(4), 20))
    out = tmp_path / "live"
    first = ingest(synthetic_dataset_dir, out, store, CFG)
    files = _files(out)
    store.append(_traffic(base, np.random.default_rng(5), 20, start=T0 + dt.timedelta(hours=1)))

    def failing_readme(*args, **kwargs):  # the tables are written by now, the rest is not
        raise OSError("disk full")

    monkeypatch.setattr(ingest_module, "_readme", failing_readme)
    with pytest.raises(OSError, match="disk full"):
        ingest(synthetic_dataset_dir, out, store, CFG)
    assert _files(out) == files and dataset_hash(out) == first.dataset_hash
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".live")] == []  # no scratch left
    monkeypatch.undo()
    assert ingest(synthetic_dataset_dir, out, store, CFG).impressions == 20  # the watermark had not moved


def test_ingest_refuses_to_overwrite_what_it_did_not_write(synthetic_dataset_dir, store, tmp_path):
    with pytest.raises(ValueError, match="replace its base"):
        ingest(synthetic_dataset_dir, synthetic_dataset_dir, store, CFG)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=STATE_FILE):
        ingest(synthetic_dataset_dir, tmp_path / "mine", store, CFG)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("weight, example", [(0.0, "0"), (-1.0, "-1"), (float("nan"), "nan"), (float("inf"), "inf")])
def test_validation_names_a_bad_weight(synthetic_dataset_dir, tmp_path, weight, example):
    root = tmp_path / "dataset"
    shutil.copytree(synthetic_dataset_dir, root)
    qrels = pd.read_parquet(root / QRELS_FILE)
    qrels["weight"] = 1.5
    qrels.loc[3, "weight"] = weight
    qrels.to_parquet(root / QRELS_FILE, index=False)
    result = validate_dataset(root, ValidateConfig())
    assert result.failed_rules() == ["weight must be a finite number > 0"]
    failure = result.failures[0]
    assert failure.count == 1 and failure.examples == [f"{qrels.at[3, 'query_id']} -> {qrels.at[3, 'ad_id']}"]
    assert example in failure.details[0]


# --------------------------------------------------------------------------- DVC


def _run(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("scm", ["git", "no-scm"])
def test_every_version_is_tracked_by_dvc_and_an_old_one_comes_back(base, synthetic_dataset_dir, store, tmp_path,
                                                                   scm):
    repo = tmp_path / "repo"
    repo.mkdir()
    dvc = str(Path(sys.executable).with_name("dvc"))
    if scm == "git":
        _run(["git", "init", "-q"], repo)
        _run([dvc, "init", "-q"], repo)
    else:
        _run([dvc, "init", "-q", "--no-scm"], repo)
    out = repo / "data" / "live"
    store.append(_traffic(base, np.random.default_rng(6), 30))
    v1 = ingest(synthetic_dataset_dir, out, store, CFG)
    dvc_file = repo / "data" / "live.dvc"
    assert v1.dataset_hash in dvc_file.read_text()  # DVC's hash is ours
    kept = tmp_path / "live.v1.dvc"
    shutil.copy(dvc_file, kept)
    if scm == "git":
        assert (repo / "data" / ".gitignore").read_text().strip() == "/live"

    store.append(_traffic(base, np.random.default_rng(7), 30, start=T0 + dt.timedelta(hours=1)))
    v2 = ingest(synthetic_dataset_dir, out, store, CFG)
    assert v2.dataset_hash != v1.dataset_hash and v2.dataset_hash in dvc_file.read_text()

    shutil.copy(kept, dvc_file)  # what `git checkout <rev> -- data/live.dvc` does
    _run([dvc, "checkout", "--force", "data/live.dvc"], repo)
    assert dataset_hash(out) == v1.dataset_hash
    assert json.loads((out / STATE_FILE).read_text())["counts"]["impressions"] == 30
    assert (out / OBSERVATIONS_FILE).is_file()
