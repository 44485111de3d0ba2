"""The online verdict from hand-made interleaved searches whose counts are known: wins, ties,
the sign test's p-value (checked against the binomial sum written out), the four verdicts,
searches of other pairs left out, the same numbers through a real SQLite log; a version's own
live CTR@10 in a window; and `alignsearch traffic compare` through the CLI against a real MLflow
store (tags on the challenger's version, its card, a run in the monitoring experiment)."""

from __future__ import annotations

import datetime as dt
import math

import pytest
from traffic_helpers import T0, click, impression
from typer.testing import CliRunner

from components.traffic.events import Events, EventStore
from components.traffic.verdict import live_ctr, online_verdict

CHALLENGER, CHAMPION = "alignsearch/2", "alignsearch/1"
ADS = ("a1", "a2", "a3", "a4")


def interleaved(wins: int, losses: int, ties_without_click: int, ties_with_clicks: int = 0, *,
                pair: tuple[str, str] = (CHALLENGER, CHAMPION), start: dt.datetime = T0) -> list:
    """Interleaved searches of `pair` (positions 1, 3 from pair[0], 2, 4 from pair[1]): `wins`
    with a click on pair[0]'s hit, `losses` on pair[1]'s, ties with no click, and ties with one
    click on each side."""
    a, b = pair
    events, n = [], 0
    for kind, count in (("win", wins), ("loss", losses), ("tie0", ties_without_click), ("tie2", ties_with_clicks)):
        for _ in range(count):
            search = impression(ads=ADS, time=start + dt.timedelta(minutes=n), model_version=b.split("/")[1],
                                contributors=(a, b, a, b))
            n += 1
            events.append(search)
            clicked = {"win": ["a1"], "loss": ["a2"], "tie0": [], "tie2": ["a3", "a4"]}[kind]
            events += [click(search, ad) for ad in clicked]
    return events


def read_back(logged: list, tmp_path) -> Events:
    """The events as the log gives them: written to a real SQLite store in tmp and read back."""
    with EventStore(f"sqlite:///{tmp_path / 'traffic.db'}") as store:
        store.append(logged)
        return store.read()


def two_sided_sign_p(wins: int, n: int) -> float:
    """The exact two-sided binomial p-value at p = 1/2, written out (the distribution is
    symmetric: twice the smaller tail, at most 1)."""
    k = max(wins, n - wins)
    tail = sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def test_counts_p_value_and_a_significant_challenger(tmp_path):
    events = read_back(interleaved(30, 10, 20, 5), tmp_path)
    verdict = online_verdict(events, CHALLENGER, CHAMPION, 0.05, min_impressions=50)
    assert (verdict.impressions, verdict.preferred, verdict.challenger_wins, verdict.champion_wins) == (65, 40, 30, 10)
    assert verdict.win_share == pytest.approx(0.75)
    assert verdict.p_value == pytest.approx(two_sided_sign_p(30, 40), rel=1e-9)
    assert verdict.p_value == pytest.approx(0.00222, abs=1e-5)
    assert verdict.verdict == "challenger_better"
    assert "binomial sign test" in verdict.test and "binomtest" in verdict.test


def test_the_champion_wins_when_the_challenger_loses():
    events = _frames(interleaved(10, 30, 20))  # frames built without a store: the same columns
    verdict = online_verdict(events, CHALLENGER, CHAMPION, 0.05, min_impressions=50)
    assert (verdict.challenger_wins, verdict.champion_wins) == (10, 30)
    assert verdict.verdict == "champion_better"
    assert verdict.p_value == pytest.approx(two_sided_sign_p(10, 40))


def test_no_difference_and_too_few(tmp_path):
    events = read_back(interleaved(18, 22, 10), tmp_path)
    balanced = online_verdict(events, CHALLENGER, CHAMPION, 0.05, min_impressions=50)
    assert balanced.verdict == "no_difference"
    assert balanced.p_value == pytest.approx(two_sided_sign_p(18, 40)) and balanced.p_value > 0.5
    # the same lopsided counts as the first test, but fewer impressions than needed: too few
    few = online_verdict(read_back(interleaved(30, 10, 20, 5), tmp_path / "x"), CHALLENGER, CHAMPION, 0.05,
                         min_impressions=66)
    assert few.verdict == "too_few" and few.impressions == 65 and few.p_value < 0.05
    # impressions enough, but none with a preference: p = 1, no difference
    silent = online_verdict(read_back(interleaved(0, 0, 60), tmp_path / "y"), CHALLENGER, CHAMPION, 0.05,
                            min_impressions=50)
    assert (silent.preferred, silent.p_value, silent.verdict) == (0, 1.0, "no_difference")
    assert math.isnan(silent.win_share)


def test_only_this_pairs_interleaved_searches_count(tmp_path):
    ours = interleaved(30, 10, 0)
    other_pair = interleaved(0, 40, 0, pair=("alignsearch/3", CHAMPION), start=T0 + dt.timedelta(days=1))
    plain = [impression(ads=ADS, time=T0 + dt.timedelta(days=2, minutes=i)) for i in range(20)]
    plain_clicks = [click(search, "a1") for search in plain]
    events = read_back([*ours, *other_pair, *plain, *plain_clicks], tmp_path)
    verdict = online_verdict(events, CHALLENGER, CHAMPION, 0.05, min_impressions=40)
    assert (verdict.impressions, verdict.challenger_wins, verdict.champion_wins) == (40, 30, 10)
    # labels swapped: the same impressions, wins swapped
    swapped = online_verdict(events, CHAMPION, CHALLENGER, 0.05, min_impressions=40)
    assert (swapped.challenger_wins, swapped.champion_wins, swapped.verdict) == (10, 30, "champion_better")


def test_a_verdict_needs_a_probability_for_alpha():
    with pytest.raises(ValueError, match="alpha"):
        online_verdict(_frames(interleaved(3, 1, 0)), CHALLENGER, CHAMPION, 1.5)


def _frames(logged: list) -> Events:
    """The events as frames without a store (the columns `EventStore.read` gives)."""
    import pandas as pd

    from components.traffic.events import CLICK_COLUMNS, IMPRESSION_COLUMNS, Click, Impression

    searches = [e for e in logged if isinstance(e, Impression)]
    clicks = [e for e in logged if isinstance(e, Click)]
    impressions = pd.DataFrame([{
        "event_id": s.event_id, "time": pd.Timestamp(s.time), "query": s.query, "k": s.k, "model_name": s.model_name,
        "model_version": s.model_version, "catalogue_version": s.catalogue_version, "source": s.source,
        "hits": [{"ad_id": h.ad_id, "position": h.position, "score": h.score} for h in s.hits],
        "contributors": list(s.contributors) if s.contributors is not None else None, "took_ms": s.took_ms}
        for s in searches], columns=list(IMPRESSION_COLUMNS))
    click_frame = pd.DataFrame([{"click_id": c.click_id, "request_id": c.request_id, "ad_id": c.ad_id,
                                 "position": c.position, "time": pd.Timestamp(c.time)} for c in clicks],
                               columns=list(CLICK_COLUMNS))
    return Events(impressions, click_frame)


# --------------------------------------------------------------------------- live CTR@10


def test_live_ctr_counts_a_versions_own_searches_in_the_window(tmp_path):
    start, end = T0, T0 + dt.timedelta(days=1)
    own = [impression(ads=ADS, model_version="1", time=T0 + dt.timedelta(minutes=i)) for i in range(10)]
    clicks = [click(search, "a4") for search in own[:4]]  # 4 of 10 with a click in the top 10
    before = [impression(ads=ADS, model_version="1", time=T0 - dt.timedelta(minutes=1))]  # outside the window
    after = [impression(ads=ADS, model_version="1", time=end)]  # end is excluded
    other = [impression(ads=ADS, model_version="2", time=T0 + dt.timedelta(minutes=5))]
    mixed = interleaved(5, 0, 0, pair=("alignsearch/2", "alignsearch/1"), start=T0 + dt.timedelta(hours=1))
    events = read_back([*own, *clicks, *before, *after, *other, *mixed], tmp_path)
    ctr = live_ctr(events, "alignsearch", "1", start, end)
    assert (ctr.version, ctr.searches) == ("1", 10)  # interleaved searches are not its own
    assert ctr.ctr_at_10 == pytest.approx(0.4)
    assert ctr.start == "2025-03-01T12:00:00Z" and ctr.end == "2025-03-02T12:00:00Z"
    none = live_ctr(events, "alignsearch", "7", start, end)
    assert none.searches == 0 and math.isnan(none.ctr_at_10)


# --------------------------------------------------------------------------- the command


@pytest.fixture
def two_registered(tmp_path):
    """A real MLflow store in tmp with alignsearch v1 (champion) and v2 (challenger): versions
    without a trained model behind them (a compare reads only the traffic log and the registry)."""
    from mlflow import MlflowClient

    from components.registry.config import RegistryConfig
    from components.registry.tracking import configure_mlflow

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    configure_mlflow(RegistryConfig(tracking_uri=uri, artifact_location=str(tmp_path / "mlruns" / "artifacts")))
    client = MlflowClient()
    client.create_registered_model("alignsearch")
    for version in ("1", "2"):
        (tmp_path / f"model{version}").mkdir()
        client.create_model_version("alignsearch", str(tmp_path / f"model{version}"))
    client.set_registered_model_alias("alignsearch", "champion", "1")
    client.set_registered_model_alias("alignsearch", "challenger", "2")
    return uri, client


def test_traffic_compare_records_the_verdict_on_the_challenger(tmp_path, two_registered):
    from flows.cli import app

    uri, client = two_registered
    now = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
    store_uri = f"sqlite:///{tmp_path / 'traffic.db'}"
    with EventStore(store_uri) as store:
        store.append(interleaved(30, 10, 20, 5, start=now - dt.timedelta(minutes=100)))
    sets = ["--set", f"registry.tracking_uri={uri}", "--set", f"registry.artifact_location={tmp_path / 'mlruns' / 'artifacts'}",
            "--set", f"traffic.store_uri={store_uri}", "--set", "promote.min_online_impressions=50"]
    result = CliRunner().invoke(app, ["traffic", "compare", *sets])
    assert result.exit_code == 0, result.output
    assert "challenger_better" in result.output and "65" in result.output and "0.75" in result.output
    tags = client.get_model_version("alignsearch", "2").tags
    assert tags["alignsearch.online.verdict"] == "challenger_better"
    assert (tags["alignsearch.online.impressions"], tags["alignsearch.online.preferred"]) == ("65", "40")
    assert (tags["alignsearch.online.challenger_wins"], tags["alignsearch.online.champion_wins"]) == ("30", "10")
    assert float(tags["alignsearch.online.p_value"]) == pytest.approx(two_sided_sign_p(30, 40), rel=1e-3)
    assert tags["alignsearch.online.champion"] == CHAMPION
    assert "alignsearch.online.verdict" not in client.get_model_version("alignsearch", "1").tags
    card = client.get_model_version("alignsearch", "2").description
    assert "challenger_better" in card and "65 interleaved impressions" in card and "Known limits" in card
    experiment = client.get_experiment_by_name("alignsearch-monitoring")
    [run] = client.search_runs([experiment.experiment_id], "tags.`alignsearch.report` = 'online_compare'")
    assert run.data.metrics["impressions"] == 65 and run.data.metrics["challenger_wins"] == 30
    assert run.data.metrics["win_share"] == pytest.approx(0.75)
    assert run.data.tags["challenger"] == CHALLENGER and run.data.tags["champion"] == CHAMPION

    # --days: only the last hour of the log (every search above is older): too few
    result = CliRunner().invoke(app, ["traffic", "compare", "--days", "0.04", *sets])
    assert result.exit_code == 0, result.output
    assert client.get_model_version("alignsearch", "2").tags["alignsearch.online.verdict"] == "too_few"

    # the versions swapped by URI: the other side of the same impressions
    result = CliRunner().invoke(app, ["traffic", "compare", "--challenger", "models:/alignsearch/1",
                                      "--champion", "models:/alignsearch/2", *sets])
    assert result.exit_code == 0, result.output
    assert client.get_model_version("alignsearch", "1").tags["alignsearch.online.verdict"] == "champion_better"


def test_traffic_compare_refuses_an_unknown_version(tmp_path, two_registered):
    from flows.cli import app

    uri, _ = two_registered
    result = CliRunner().invoke(app, ["traffic", "compare", "--champion", "models:/alignsearch/9",
                                      "--set", f"registry.tracking_uri={uri}",
                                      "--set", f"traffic.store_uri=sqlite:///{tmp_path / 'traffic.db'}"])
    assert result.exit_code == 2
    assert "models:/alignsearch/9" in result.output
    assert not (tmp_path / "traffic.db").exists()  # nothing was read or created
