"""The position-based click model: EM recovers propensities planted in synthetic clicks, the
same data gives the same fit, and inverse-propensity weights undo position bias."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from traffic_helpers import click, impression

from components.traffic.clickmodel import click_weights, fit_pbm, ipw_weights, observations
from components.traffic.config import SimulatorConfig
from components.traffic.events import Events, EventStore
from components.traffic.simulator import simulate_clicks

K, ETA = 10, 0.7
TRUE_PROPENSITIES = 1.0 / np.arange(1, K + 1) ** ETA


def synthetic_clicks(seed: int, *, num_impressions: int = 3000, num_queries: int = 50, ads_per_query: int = 20,
                     ranker_noise: float = 0.3, person: str = "pbm") -> tuple[pd.DataFrame, np.ndarray]:
    """Observations of a noisy ranker (true attractiveness plus noise, top K shown, so an ad's
    position varies between impressions) clicked by PBM people with propensities 1/k^0.7, and
    the true attractiveness [num_queries, ads_per_query]. `person="simulator"`: the clicks come
    from simulator.simulate_clicks (relevant = attractiveness above 0.5)."""
    rng = np.random.default_rng(seed)
    gamma = rng.beta(1.0, 1.5, size=(num_queries, ads_per_query))
    cfg = SimulatorConfig(eta=ETA, click_relevant=0.8, click_nonrelevant=0.1)
    rows = []
    for _ in range(num_impressions):
        q = int(rng.integers(num_queries))
        shown = np.argsort(-(gamma[q] + rng.normal(0.0, ranker_noise, ads_per_query)))[:K]
        if person == "simulator":
            clicked_at = simulate_clicks([f"ad{a}" for a in shown], {f"ad{a}" for a in np.flatnonzero(gamma[q] > 0.5)},
                                         rng, cfg)
            clicked = np.isin(np.arange(1, K + 1), clicked_at)
        else:
            clicked = (rng.random(K) < TRUE_PROPENSITIES) & (rng.random(K) < gamma[q, shown])
        rows += [(f"q{q}", f"ad{a}", position, bool(c)) for position, (a, c) in enumerate(zip(shown, clicked,
                                                                                              strict=True), start=1)]
    return pd.DataFrame(rows, columns=["query", "ad_id", "position", "clicked"]), gamma


@pytest.mark.parametrize("person", ["pbm", "simulator"])
def test_em_recovers_planted_propensities(person):
    obs, gamma = synthetic_clicks(seed=0, person=person)
    model = fit_pbm(obs)
    error = np.abs(model.propensities - TRUE_PROPENSITIES)
    print(f"\n{person}: {len(obs) // K} impressions, {model.iterations} EM iterations; propensity error "
          f"max {error.max():.3f}, mean {error.mean():.3f}; estimated {np.round(model.propensities, 3).tolist()}")
    assert model.converged and model.propensities[0] == 1.0
    assert error.max() < 0.05
    if person == "pbm":
        # Attractiveness, of pairs shown 30 times or more: unbiased, and as close as ~12
        # examinations of a pair allow (a binomial standard error near 0.14).
        seen = model.attractiveness[model.attractiveness["impressions"] >= 30]
        truth = np.array([gamma[int(q[1:]), int(a[2:])] for q, a in zip(seen["query"], seen["ad_id"], strict=True)])
        assert len(seen) > 300 and abs((seen["attractiveness"] - truth).mean()) < 0.03
        assert np.corrcoef(seen["attractiveness"], truth)[0, 1] > 0.7


def test_the_same_clicks_give_the_same_fit():
    first, second = fit_pbm(synthetic_clicks(seed=3)[0]), fit_pbm(synthetic_clicks(seed=3)[0])
    np.testing.assert_array_equal(first.propensities, second.propensities)
    pd.testing.assert_frame_equal(first.attractiveness, second.attractiveness)
    assert first.log_likelihood == second.log_likelihood
    assert not np.array_equal(fit_pbm(synthetic_clicks(seed=4)[0]).propensities, first.propensities)


def test_a_position_never_shown_has_no_propensity():
    obs = pd.DataFrame({"query": ["q"] * 4, "ad_id": ["a", "b", "a", "b"], "position": [1, 3, 3, 1],
                        "clicked": [True, False, False, True]})
    model = fit_pbm(obs)
    assert np.isnan(model.propensities[1]) and model.propensities[0] == 1.0
    with pytest.raises(ValueError, match="positions"):
        model.propensity([0])


def test_ipw_weights_by_hand():
    propensities = np.array([1.0, 0.5, 0.25, 0.05])
    np.testing.assert_allclose(ipw_weights([1, 2, 3, 4, 2], propensities, clip=10.0), [1.0, 2.0, 4.0, 10.0, 2.0])
    np.testing.assert_allclose(ipw_weights([3, 4], propensities, clip=3.0), [3.0, 3.0])


def test_weighted_clicks_count_a_relevant_ad_the_same_wherever_it_was_shown():
    """Two ads equally attractive (0.6): one always shown first, one always eighth. Raw clicks
    favour the first ~3:1; weighted by the fitted propensities, each estimates 0.6 per showing."""
    rng = np.random.default_rng(7)
    obs, _ = synthetic_clicks(seed=1)
    model = fit_pbm(obs)
    n = 20_000
    top = rng.random(n) < TRUE_PROPENSITIES[0] * 0.6
    eighth = rng.random(n) < TRUE_PROPENSITIES[7] * 0.6
    assert top.sum() > 2.5 * eighth.sum()
    weighted = [ipw_weights(np.full(c.sum(), position), model.propensities, clip=10.0).sum() / n
                for c, position in ((top, 1), (eighth, 8))]
    assert weighted == pytest.approx([0.6, 0.6], abs=0.05)


def test_observations_and_click_weights_from_the_log(tmp_path):
    store = EventStore(f"sqlite:///{tmp_path / 'traffic.db'}")
    first, second = impression("red car", ("a1", "a2", "a3")), impression("blue car", ("b1", "a2"))
    store.append([first, second, click(first, "a3"), click(second, "b1")])
    obs = observations(store.read())
    assert obs[["query", "ad_id", "position", "clicked"]].values.tolist() == [
        ["red car", "a1", 1, False], ["red car", "a2", 2, False], ["red car", "a3", 3, True],
        ["blue car", "b1", 1, True], ["blue car", "a2", 2, False]]
    # A click whose impression is not among the events read is left out.
    only_first = Events(store.read().impressions.iloc[:1], store.read().clicks)
    assert observations(only_first)["clicked"].tolist() == [False, False, True]

    weights = click_weights(obs, fit_pbm(obs), clip=10.0)
    assert weights[["ad_id", "position"]].values.tolist() == [["a3", 3], ["b1", 1]]
    assert weights["weight"].iloc[1] == 1.0 and weights["weight"].iloc[0] >= 1.0
    store.close()
