"""Team-draft interleaving (components/search/interleave.py) on rankings whose interleaving is
known by hand or by its properties, and clicks credited per model over a real traffic log
(components/traffic/interleaving.py)."""

from __future__ import annotations

import datetime as dt
import random

import pytest
from traffic_helpers import T0, click, impression

from components.search.interleave import contributor_label, preference, team_clicks, team_draft
from components.traffic.events import EventStore, read_exported
from components.traffic.interleaving import PREFERENCE_COLUMNS, impression_preferences


class Coins(random.Random):
    """A Random whose coins are given: each `random()` returns the next value."""

    def __init__(self, values):
        super().__init__(0)
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


def test_team_draft_by_hand():
    # Round 1: coin 0.1 -> a first: a takes 1, b takes 3 (its best unshown).
    # Round 2: coin 0.9 -> b first: b's 3 and 1 are shown, it takes 5; a takes 2.
    ids, teams = team_draft(["1", "2", "3", "4"], ["3", "1", "5", "6"], 4, Coins([0.1, 0.9]))
    assert ids == ["1", "3", "5", "2"]
    assert teams == ["a", "b", "b", "a"]


def test_team_draft_odd_k_last_pick_by_coin():
    ids, teams = team_draft(["a1", "a2"], ["b1", "b2"], 3, Coins([0.1, 0.9]))
    assert ids == ["a1", "b1", "b2"] and teams == ["a", "b", "b"]


@pytest.mark.parametrize("seed", range(200))
def test_team_draft_properties_on_random_rankings(seed):
    rng = random.Random(seed)
    pool = [f"ad{i}" for i in range(30)]
    ranking_a = rng.sample(pool, rng.randint(0, 20))
    ranking_b = rng.sample(pool, rng.randint(0, 20))
    k = rng.randint(0, 15)
    ids, teams = team_draft(ranking_a, ranking_b, k, random.Random(seed))
    distinct = set(ranking_a) | set(ranking_b)
    assert len(ids) == len(set(ids)) == min(k, len(distinct)), "k distinct ids, or every id there is"
    assert set(ids) <= distinct and len(teams) == len(ids)
    for position, (ad_id, team) in enumerate(zip(ids, teams, strict=True)):
        ranking = ranking_a if team == "a" else ranking_b
        assert ad_id in ranking, "a team only contributes its own ranking's ids"
        # ... and the best of its ranking not shown above that position.
        above = set(ids[:position])
        assert ad_id == next(a for a in ranking if a not in above)
    # Same seed, same interleaving.
    assert team_draft(ranking_a, ranking_b, k, random.Random(seed)) == (ids, teams)


@pytest.mark.parametrize("k", [1, 2, 5, 10])
@pytest.mark.parametrize("overlap", ["disjoint", "identical", "shuffled"])
def test_each_team_gets_half_the_picks(k, overlap):
    ranking_a = [f"ad{i}" for i in range(12)]
    ranking_b = {"disjoint": [f"bd{i}" for i in range(12)], "identical": list(ranking_a),
                 "shuffled": random.Random(k).sample(ranking_a, 12)}[overlap]
    for seed in range(50):
        ids, teams = team_draft(ranking_a, ranking_b, k, random.Random(seed))
        assert len(ids) == k
        assert sorted([teams.count("a"), teams.count("b")]) == [k // 2, k - k // 2]
        if overlap == "identical":
            assert ids == ranking_a[:k], "identical rankings interleave to that ranking"


def test_shared_prefix_credited_once_to_the_team_that_picked_it():
    shared = ["x", "y"]
    ranking_a, ranking_b = [*shared, "a1", "a2"], [*shared, "b1", "b2"]
    first_teams = set()
    for seed in range(40):
        ids, teams = team_draft(ranking_a, ranking_b, 4, random.Random(seed))
        assert ids[:2] == shared, "the shared prefix keeps its order, each id once"
        assert teams[0] != teams[1], "one team picked x, the other y"
        first_teams.add(teams[0])
        counts = team_clicks(teams, [1])
        assert counts[teams[0]] == 1 and counts[teams[1]] == 0, "a click on x counts for x's picker only"
    assert first_teams == {"a", "b"}, "the coin gives the first pick to either team"


def test_coin_is_fair_over_seeds():
    # With identical rankings the interleaving is the ranking; only the credit depends on the
    # coin, so a click on position 1 must not favour either model.
    wins = [team_draft(["1", "2", "3"], ["1", "2", "3"], 3, random.Random(seed))[1][0] == "a"
            for seed in range(2000)]
    assert 0.45 < sum(wins) / len(wins) < 0.55


def test_one_ranking_exhausted_the_other_fills():
    ids, teams = team_draft(["1"], ["2", "3", "4", "1"], 4, random.Random(0))
    assert sorted(ids) == ["1", "2", "3", "4"] and teams.count("a") == 1 and teams.count("b") == 3
    ids, teams = team_draft(["1", "2"], ["2", "1"], 5, random.Random(0))
    assert sorted(ids) == ["1", "2"], "fewer than k distinct ids: all of them"
    assert team_draft([], [], 3, random.Random(0)) == ([], [])
    assert team_draft(["1", "1", "2"], [], 3, random.Random(0)) == (["1", "2"], ["a", "a"])


def test_bad_k():
    assert team_draft(["1"], ["2"], 0, random.Random(0)) == ([], [])
    with pytest.raises(ValueError, match="k must be"):
        team_draft(["1"], ["2"], -1, random.Random(0))


def test_per_impression_credit():
    contributors = ["m/2", "m/1", "m/1", "m/2"]
    assert team_clicks(contributors, []) == {"m/2": 0, "m/1": 0}
    assert team_clicks(contributors, [1, 4, 2]) == {"m/2": 2, "m/1": 1}
    with pytest.raises(ValueError, match="position 5"):
        team_clicks(contributors, [5])
    assert preference(2, 1) == "a" and preference(0, 1) == "b"
    assert preference(1, 1) == "tie" and preference(0, 0) == "tie"
    assert contributor_label("alignsearch", 3) == contributor_label("alignsearch", "3") == "alignsearch/3"


CHALLENGER, CHAMPION = "alignsearch/2", "alignsearch/1"


@pytest.fixture
def logged(tmp_path):
    """A real log: four interleaved searches of v2 (challenger) and v1 (champion), clicked on
    the challenger's positions, the champion's, one of each, and not at all; a plain search
    with a click; one interleaving v3 with v1."""
    teams = (CHALLENGER, CHAMPION, CHAMPION, CHALLENGER)
    ads = ("a1", "a2", "a3", "a4")

    def at(minutes, **fields):
        return impression("red car", ads, time=T0 + dt.timedelta(minutes=minutes), model_version="1", **fields)

    wins = at(3, contributors=teams)
    loses = at(1, contributors=teams)
    tie = at(2, contributors=teams)
    silent = at(0, contributors=teams)
    plain = at(4)
    other = at(5, contributors=("alignsearch/3", CHAMPION, CHAMPION, "alignsearch/3"))
    clicks = [click(wins, "a1"), click(wins, "a4"), click(wins, "a2"), click(loses, "a3"),
              click(tie, "a1"), click(tie, "a2"), click(plain, "a1"), click(other, "a1")]
    store = EventStore(f"sqlite:///{tmp_path / 'traffic.db'}")
    store.append([wins, loses, tie, silent, plain, other, *clicks])
    yield store, {"wins": wins, "loses": loses, "tie": tie, "silent": silent}
    store.close()


def test_impression_preferences_from_the_log(logged, tmp_path):
    store, searches = logged
    frame = impression_preferences(store.read(), CHALLENGER, CHAMPION)
    assert tuple(frame.columns) == PREFERENCE_COLUMNS
    expected = [(searches["silent"], 0, 0, "tie"), (searches["loses"], 0, 1, "champion"),
                (searches["tie"], 1, 1, "tie"), (searches["wins"], 2, 1, "challenger")]
    assert frame["event_id"].tolist() == [s.event_id for s, *_ in expected], "time order, pair only"
    assert frame["challenger_clicks"].tolist() == [c for _, c, _, _ in expected]
    assert frame["champion_clicks"].tolist() == [c for _, _, c, _ in expected]
    assert frame["preference"].tolist() == [p for *_, p in expected]
    assert frame["time"].tolist() == [s.time for s, *_ in expected]

    # The same rows from a Parquet export of the log.
    store.export_parquet(tmp_path / "export", T0, T0 + dt.timedelta(days=1))
    exported = impression_preferences(read_exported(tmp_path / "export"), CHALLENGER, CHAMPION)
    assert exported.equals(frame)

    # Swapping the roles swaps the columns and the preference.
    swapped = impression_preferences(store.read(), CHAMPION, CHALLENGER)
    assert swapped["challenger_clicks"].tolist() == frame["champion_clicks"].tolist()
    assert swapped["preference"].tolist() == ["tie", "challenger", "tie", "champion"]


def test_impression_preferences_empty_and_refused(tmp_path):
    with EventStore(f"sqlite:///{tmp_path / 'traffic.db'}") as store:
        store.append([impression(), impression(contributors=("alignsearch/1",) * 3)])
        frame = impression_preferences(store.read(), CHALLENGER, CHAMPION)
        assert frame.empty and tuple(frame.columns) == PREFERENCE_COLUMNS
        assert frame["time"].dt.tz is not None
        with pytest.raises(ValueError, match="same model"):
            impression_preferences(store.read(), CHAMPION, CHAMPION)


# --- in the service: two toy rankings, the real traffic log ---------------------------------

class Ranking:
    """A model that ranks fixed ads in a fixed order for every query, on catalogue `version`."""

    def __init__(self, ads: list[str], version: str = "v3", hashes: dict[str, str] | None = None, name="alignsearch",
                 model_version="2"):
        self.ads, self.version, self.hashes = ads, version, hashes or {}
        self.info = {"name": name, "version": model_version}

    def predict(self, frame):
        import pandas as pd

        rows = []
        for query, k in zip(frame["query"], frame["k"], strict=True):
            rows += [{"query": query, "rank": i + 1, "ad_id": ad, "title": f"title {ad}", "score": 1.0 - i / 10,
                      "visual_words": ["tree"], "matched_words": [], "catalogue_version": self.version,
                      "image_hash": self.hashes.get(ad, f"hash-{ad}")} for i, ad in enumerate(self.ads[:int(k)])]
        return pd.DataFrame(rows)

    def describe(self):
        return {"challenger_catalogue_version": self.version}


class Failing(Ranking):
    def predict(self, frame):
        raise RuntimeError("the challenger failed")


CHAMPION_ADS = ["c1", "s1", "c2", "s2", "c3", "c4"]
CHALLENGER_ADS = ["s1", "d1", "d2", "s2", "d3", "d4"]


def _service(tmp_path, share: float, challenger: Ranking | None, *, batch_max: int = 16):
    from fastapi.testclient import TestClient

    from components.catalogue.serving import TrafficLog
    from components.search.config import ServeConfig
    from components.search.service import create_app
    from components.traffic.config import TrafficConfig

    log = TrafficLog(TrafficConfig(store_uri=f"sqlite:///{tmp_path / 'traffic.db'}", flush_ms=60_000))
    app = create_app(Ranking(CHAMPION_ADS), ServeConfig(interleave_share=share, batch_max=batch_max),
                     model_uri="models:/alignsearch@champion", info={"name": "alignsearch", "version": "1"},
                     search_log=log, challenger=challenger, interleave_seed=7)
    return TestClient(app, base_url="http://127.0.0.1:8080"), log


@pytest.mark.parametrize("batch_max", [1, 16])
def test_service_interleaves_logs_contributors_and_credits_clicks(tmp_path, batch_max):
    client, log = _service(tmp_path, 1.0, Ranking(CHALLENGER_ADS), batch_max=batch_max)
    with client:
        answers = [client.post("/search", json={"query": f"q{i}", "k": 4}).json() for i in range(20)]
        health = client.get("/health").json()["interleave"]
        log.writer.flush()
        stored = log.store.read().impressions.set_index("event_id")
        for answer in answers:
            assert answer["interleaved"] is True and answer["catalogue_version"] == "v3"
            contributors = list(stored.loc[answer["request_id"], "contributors"])
            ids = [h["ad_id"] for h in answer["results"]]
            assert [h["rank"] for h in answer["results"]] == [1, 2, 3, 4]
            teams = ["a" if c == CHAMPION else "b" for c in contributors]
            # the answer is exactly the team draft drawn from the seed and the request id
            assert (ids, teams) == team_draft(CHAMPION_ADS[:4], CHALLENGER_ADS[:4], 4,
                                              random.Random(f"7:{answer['request_id']}"))
        assert health == {"status": "on", "share": 1.0, "seed": 7, "champion": CHAMPION, "challenger": CHALLENGER,
                          "challenger_catalogue_version": "v3", "interleaved": 20, "skipped": 0,
                          "challenger_failed": 0}
        # a click on s1 (both rank it first; its picker is credited) and one on a d-ad (the challenger's)
        answer = answers[0]
        contributors = list(stored.loc[answer["request_id"], "contributors"])
        picked = {h["ad_id"]: c for h, c in zip(answer["results"], contributors, strict=True)}
        for ad_id in ["s1", next(a for a in picked if a.startswith("d"))]:
            assert client.post("/click", json={"request_id": answer["request_id"], "ad_id": ad_id}).status_code == 200
        row = impression_preferences(log.store.read(), CHALLENGER, CHAMPION).set_index("event_id").loc[
            answer["request_id"]]
        expected = 1 + (picked["s1"] == CHALLENGER)
        assert (row["challenger_clicks"], row["champion_clicks"]) == (expected, 2 - expected)


def test_service_share_is_drawn_per_request(tmp_path):
    client, log = _service(tmp_path, 0.3, Ranking(CHALLENGER_ADS))
    with client:
        answers = [client.get("/search", params={"q": "tree", "k": 3}).json() for _ in range(300)]
    share = sum(a["interleaved"] for a in answers) / len(answers)
    assert 0.2 < share < 0.4
    from components.search.service import interleave_draw

    for answer in answers:
        assert answer["interleaved"] == (interleave_draw(7, answer["request_id"]) < 0.3)
        if not answer["interleaved"]:
            assert [h["ad_id"] for h in answer["results"]] == CHAMPION_ADS[:3]


def test_service_answers_alone_when_catalogues_differ_the_challenger_fails_or_there_is_none(tmp_path):
    client, log = _service(tmp_path, 1.0, Ranking(CHALLENGER_ADS, version="v2"))
    with client:
        answer = client.post("/search", json={"query": "tree", "k": 4}).json()
        assert answer["interleaved"] is False and [h["ad_id"] for h in answer["results"]] == CHAMPION_ADS[:4]
        health = client.get("/health").json()["interleave"]
        assert (health["interleaved"], health["skipped"]) == (0, 1)
        log.writer.flush()
        assert log.store.impression(answer["request_id"]).contributors is None
    client, _ = _service(tmp_path / "failing", 1.0, Failing(CHALLENGER_ADS))
    with client:
        answer = client.post("/search", json={"query": "tree", "k": 4})
        assert answer.status_code == 200 and answer.json()["interleaved"] is False
        assert [h["ad_id"] for h in answer.json()["results"]] == CHAMPION_ADS[:4]
        assert client.get("/health").json()["interleave"]["challenger_failed"] == 1
    client, _ = _service(tmp_path / "none", 1.0, None)
    with client:
        assert client.get("/health").json()["interleave"] == {"status": "off", "share": 1.0}
        assert client.post("/search", json={"query": "tree", "k": 2}).json()["interleaved"] is False


def test_interleaved_answer_shows_a_byte_identical_image_once():
    from components.search.service import interleave_answers

    def rows(ads, hashes):
        return [{"query": "q", "rank": i + 1, "ad_id": a, "score": 1.0, "image_hash": h, "catalogue_version": "v1"}
                for i, (a, h) in enumerate(zip(ads, hashes, strict=True))]

    # x1 and x2 have one image: the champion shows it as x1, the challenger as x2
    champion = rows(["x1", "a", "b"], ["hx", "ha", "hb"])
    challenger = rows(["x2", "c", "d"], ["hx", "hc", "hd"])
    out, labels = interleave_answers(champion, challenger, 4, Coins([0.1, 0.1]), ("m/1", "m/2"))
    assert [r["ad_id"] for r in out] == ["x1", "c", "a", "d"] and labels == ["m/1", "m/2", "m/1", "m/2"]
    assert [r["rank"] for r in out] == [1, 2, 3, 4]
    out, labels = interleave_answers(champion, challenger, 4, Coins([0.9, 0.9]), ("m/1", "m/2"))
    assert [r["ad_id"] for r in out] == ["x2", "a", "c", "b"] and labels == ["m/2", "m/1", "m/2", "m/1"]
    # ads without a known image are told apart by id
    out, _ = interleave_answers(rows(["a", "b"], [None, ""]), rows(["b", "a"], [None, None]), 2, Coins([0.1]),
                                ("m/1", "m/2"))
    assert [r["ad_id"] for r in out] == ["a", "b"]
