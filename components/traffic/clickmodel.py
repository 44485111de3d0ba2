"""The position-based click model fitted to the log by EM, and the inverse-propensity weights
it gives clicks: how much of "not clicked" is "not seen".

The model (PBM; Craswell, Zoeter, Taylor & Ramsey, "An experimental comparison of click
position-bias models", WSDM 2008; Chuklin, Markov & de Rijke, "Click Models for Web Search",
2015): an ad shown at position k is clicked when the person examines position k (probability
theta_k, the propensity, the same for every query) and finds the ad attractive (gamma_qa, per
query and ad), independently:

    P(click | q, a, k) = theta_k * gamma_qa

The fit is the standard EM for PBM, as Wang, Golbandi, Bendersky, Metzler & Najork state it
("Position Bias Estimation for Unbiased Learning to Rank in Personal Search", WSDM 2018)
before their regression EM. A click means examined and attractive; a skip splits into
"examined, not attractive" with probability theta(1-gamma)/(1-theta*gamma) and "not examined,
attractive" with probability (1-theta)gamma/(1-theta*gamma); each M-step averages these per
position (theta) and per (query, ad) pair (gamma). We keep the per-pair gamma table of that
standard EM; their regression EM replaces it by a regressor over features of the pair, which
this layer does not have.

The data can say only theta_k * gamma, so theta_1 is held at 1 (position 1 is examined): the
propensities come out relative to position 1, which is all the weights need. They are
identified only when the same (query, ad) is seen at different positions; a ranker that always
shows a query's ads in the same order leaves them unidentified (a catalogue change, a new
model version, interleaving or a little randomisation of the order provides the variation).

Inverse-propensity weights (Joachims, Swaminathan & Schnabel, "Unbiased Learning-to-Rank with
Biased Feedback", WSDM 2017): a click at position k counts 1/theta_k, so that in expectation a
relevant ad counts the same wherever it was shown; clipped at `ipw_clip`, trading a little bias
for bounded variance when a rarely examined position is clicked.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from components.traffic.config import TrafficConfig
from components.traffic.events import Events

_DEFAULTS = TrafficConfig()
OBSERVATION_COLUMNS = ("event_id", "query", "ad_id", "position", "clicked")
_EPS = 1e-12


def observations(events: Events) -> pd.DataFrame:
    """One row per shown ad (OBSERVATION_COLUMNS): the impression, its query, the ad, its
    1-based position and whether that ad of that impression was clicked. Clicks on impressions
    not among `events.impressions` are left out."""
    impressions = events.impressions
    rows = [(event_id, query, str(hit["ad_id"]), int(hit["position"]))
            for event_id, query, hits in zip(impressions["event_id"], impressions["query"], impressions["hits"],
                                             strict=True)
            for hit in hits]
    frame = pd.DataFrame(rows, columns=["event_id", "query", "ad_id", "position"])
    clicked = set(zip(events.clicks["request_id"].astype(str), events.clicks["ad_id"].astype(str), strict=True))
    frame["clicked"] = [(e, a) in clicked for e, a in zip(frame["event_id"], frame["ad_id"], strict=True)]
    return frame.astype({"position": "int64", "clicked": "bool"})


@dataclasses.dataclass
class PositionBasedModel:
    """A fitted PBM. `propensities[k-1]` is theta_k relative to position 1 (NaN for a position
    never observed); `attractiveness` has columns query, ad_id, attractiveness (gamma),
    impressions and clicks."""

    propensities: np.ndarray
    attractiveness: pd.DataFrame
    iterations: int
    converged: bool
    log_likelihood: float

    def propensity(self, positions: np.ndarray | list[int]) -> np.ndarray:
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 1 or positions.max() > len(self.propensities)):
            raise ValueError(f"positions must lie in 1..{len(self.propensities)}")
        return self.propensities[positions - 1]


def fit_pbm(obs: pd.DataFrame, *, max_iter: int = _DEFAULTS.em_max_iter,
            tol: float = _DEFAULTS.em_tol) -> PositionBasedModel:
    """Fit theta (per position) and gamma (per query and ad) to observations (columns query,
    ad_id, position, clicked) by EM; deterministic (no random start)."""
    if obs.empty:
        raise ValueError("no observations to fit the click model to")
    position_index = obs["position"].to_numpy(dtype=np.int64) - 1  # [n]
    if position_index.min() < 0:
        raise ValueError("positions count from 1")
    pair_index, pairs = pd.MultiIndex.from_arrays([obs["query"].astype(str), obs["ad_id"].astype(str)]).factorize()
    clicked = obs["clicked"].to_numpy(dtype=bool)  # [n]
    num_positions, num_pairs = int(position_index.max()) + 1, len(pairs)
    shown_at = np.bincount(position_index, minlength=num_positions).astype(float)  # [K]
    shown_pair = np.bincount(pair_index, minlength=num_pairs).astype(float)  # [P]

    theta = 1.0 / np.arange(1, num_positions + 1)  # [K] any start below 1; position 1 stays at 1
    gamma = np.full(num_pairs, 0.5)  # [P]
    converged, iterations = False, 0
    while iterations < max_iter and not converged:
        iterations += 1
        t, g = theta[position_index], gamma[pair_index]  # [n]
        skip = np.maximum(1.0 - t * g, _EPS)
        examined = np.where(clicked, 1.0, t * (1.0 - g) / skip)  # E[examined | click or skip]
        attractive = np.where(clicked, 1.0, (1.0 - t) * g / skip)  # E[attractive | click or skip]
        new_theta = np.bincount(position_index, examined, num_positions) / np.maximum(shown_at, 1.0)
        new_theta[0] = 1.0
        new_theta[shown_at == 0] = theta[shown_at == 0]
        new_gamma = np.bincount(pair_index, attractive, num_pairs) / shown_pair
        change = max(np.abs(new_theta - theta).max(), np.abs(new_gamma - gamma).max())
        theta, gamma = new_theta, new_gamma
        converged = change < tol

    p = np.clip(theta[position_index] * gamma[pair_index], _EPS, 1 - _EPS)
    log_likelihood = float(np.where(clicked, np.log(p), np.log1p(-p)).sum())
    attractiveness = pd.DataFrame({
        "query": pairs.get_level_values(0), "ad_id": pairs.get_level_values(1), "attractiveness": gamma,
        "impressions": shown_pair.astype(np.int64),
        "clicks": np.bincount(pair_index, clicked.astype(float), num_pairs).astype(np.int64)})
    propensities = np.where(shown_at > 0, theta, np.nan)
    return PositionBasedModel(propensities, attractiveness, iterations, converged, log_likelihood)


def ipw_weights(positions: np.ndarray | list[int], propensities: np.ndarray, clip: float) -> np.ndarray:
    """1 / propensity of each (1-based) position, at most `clip`."""
    positions = np.asarray(positions, dtype=np.int64)
    return np.minimum(1.0 / np.maximum(np.asarray(propensities, dtype=float)[positions - 1], _EPS), clip)


def click_weights(obs: pd.DataFrame, model: PositionBasedModel, clip: float) -> pd.DataFrame:
    """The clicked observations with their inverse-propensity weight (columns of `obs` plus
    `weight`): one row per click, for ingest to turn into weighted positives."""
    clicks = obs[obs["clicked"]].reset_index(drop=True)
    return clicks.assign(weight=ipw_weights(clicks["position"].to_numpy(), model.propensities, clip))
