"""The linear probe of `late_fusion`: pooled image vector -> training query terms.

One L2-regularised logistic regression per term, exactly sklearn's objective
(0.5 ||w||^2 + C * sum of log-losses, intercept not penalised). The terms' objectives are
independent, so all of them are fitted at once as one full-batch L-BFGS problem in torch:
the same optimum as fitting them one by one (tested against sklearn), in seconds
instead of minutes.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from components.match.data import MatchData
from components.text.vocabulary import tokenize


def query_terms(text: str) -> list[str]:
    """The terms of a query (lowercase word tokens, de-duplicated, in order)."""
    return list(dict.fromkeys(tokenize(text)))


def term_labels(data: MatchData, pairs: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Terms of the queries in `pairs` and (num_ads, num_terms) 0/1 labels: an ad has a term
    when it is relevant to a training query containing that term."""
    terms_of = {int(q): query_terms(data.queries.texts[int(q)]) for q in np.unique(pairs[:, 0])}
    terms = sorted({t for ts in terms_of.values() for t in ts})
    column = {t: j for j, t in enumerate(terms)}
    labels = np.zeros((len(data.ads), len(terms)), dtype=np.float32)
    for q, a in pairs:
        for t in terms_of[int(q)]:
            labels[int(a), column[t]] = 1.0
    return terms, labels


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, max_iter: int = 100, tol: float = 1e-6,
                 init: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Independent L2 logistic regressions of each column of `y` (N,T) on `x` (N,D).

    Minimises sum_t [0.5 ||w_t||^2 + c * sum_i logloss(x_i w_t + b_t, y_it)] (sklearn's
    `LogisticRegression(C=c)`), in float64. `init` = (weights, intercepts) warm-starts it
    (e.g. from the previous C of a grid). Returns weights (T,D) and intercepts (T,).
    """
    x_t = torch.as_tensor(np.asarray(x, dtype=np.float64))
    y_t = torch.as_tensor(np.asarray(y, dtype=np.float64))
    n, d = x_t.shape
    t = y_t.shape[1]
    w = torch.zeros(d, t, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(t, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        if init is not None:
            w.copy_(torch.as_tensor(np.asarray(init[0], dtype=np.float64)).T)
            b.copy_(torch.as_tensor(np.asarray(init[1], dtype=np.float64)))
        else:  # intercepts start at the log prior odds
            prior = y_t.mean(0).clamp(1e-6, 1 - 1e-6)
            b.copy_(torch.log(prior / (1 - prior)))
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")
    scale = 1.0 / (c * n)  # the objective / (c n): same optimum, better conditioned

    def closure():
        optimizer.zero_grad()
        logits = x_t @ w + b  # (N,T)
        loss = F.binary_cross_entropy_with_logits(logits, y_t, reduction="sum") / n + 0.5 * scale * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().T.numpy().copy(), b.detach().numpy().copy()


class TermProbe:
    """Standardise (+ optional PCA) the pooled vector, then per-term log-odds."""

    def __init__(self, terms: list[str], mean: np.ndarray, std: np.ndarray, weights: np.ndarray,
                 intercepts: np.ndarray, components: np.ndarray | None = None) -> None:
        self.terms = list(terms)
        self.column = {t: j for j, t in enumerate(self.terms)}
        self.mean, self.std = mean.astype(np.float64), std.astype(np.float64)
        self.components = None if components is None else components.astype(np.float64)  # (k,D)
        self.weights, self.intercepts = weights.astype(np.float64), intercepts.astype(np.float64)

    @staticmethod
    def features(pooled: np.ndarray, mean: np.ndarray, std: np.ndarray,
                 components: np.ndarray | None) -> np.ndarray:
        x = (np.asarray(pooled, dtype=np.float64) - mean) / std  # (N,D)
        return x if components is None else x @ components.T  # (N,k)

    def log_odds(self, pooled: np.ndarray) -> np.ndarray:
        """(A, num_terms) log-odds of every term for every ad."""
        x = self.features(pooled, self.mean, self.std, self.components)
        return x @ self.weights.T + self.intercepts

    def query_scores(self, texts: list[str], pooled: np.ndarray) -> np.ndarray:
        """(Q,A): mean log-odds of each query's known terms (0 when it has none)."""
        log_odds = self.log_odds(pooled)  # (A,T)
        out = np.zeros((len(texts), len(pooled)), dtype=np.float64)
        for i, text in enumerate(texts):
            cols = [self.column[t] for t in query_terms(text) if t in self.column]
            if cols:
                out[i] = log_odds[:, cols].mean(1)
        return out


def zscore_rows(scores: np.ndarray) -> np.ndarray:
    """Each row to mean 0, std 1 (a constant row becomes 0)."""
    scores = np.asarray(scores, dtype=np.float64)
    mean = scores.mean(1, keepdims=True)
    std = scores.std(1, keepdims=True)
    return np.where(std > 1e-12, (scores - mean) / np.where(std > 1e-12, std, 1.0), 0.0)
