"""Fitting a complexity head with numpy alone: L2-regularised logistic regression on soft targets,
k-fold cross-validation, and RouteLLM's routing metrics for a score. No torch: `extproc fit` runs
this on a user's own labelled prompts in seconds."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from extproc.evaluation import curves
from extproc.heads import Head


def standardize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(0)
    scale = x.std(0)
    return mean, np.where(scale < 1e-6, 1.0, scale)


def logistic(
    x: np.ndarray, y: np.ndarray, l2: float, sample_weight: np.ndarray | None = None, iters: int = 30
) -> tuple[np.ndarray, float]:
    """Weights and bias minimising mean cross-entropy against targets y in [0, 1] plus
    l2/2 * |w|^2 (bias not penalised), by Newton's method on standardized features."""
    n, d = x.shape
    sw = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
    sw = sw / sw.sum()
    a = np.hstack([x, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    theta[-1] = np.log((np.average(y, weights=sw) + 1e-3) / (1 - np.average(y, weights=sw) + 1e-3))
    reg = np.full(d + 1, l2)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(a @ theta, -30, 30)))
        grad = a.T @ (sw * (p - y)) + reg * theta
        h = (a * (sw * p * (1 - p))[:, None]).T @ a + np.diag(reg + 1e-9)
        step = np.linalg.solve(h, grad)
        theta -= step
        if np.abs(step).max() < 1e-7:
            break
    return theta[:-1], float(theta[-1])


def fit_head(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    inputs: tuple[str, ...],
    l2: float,
    sample_weight: np.ndarray | None = None,
    meta: dict | None = None,
) -> Head:
    mean, scale = standardize(x)
    w, b = logistic((x - mean) / scale, y, l2, sample_weight)
    return Head(name, inputs, mean, scale, w, b, meta or {})


def folds(n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::k] for i in range(k)]


def out_of_fold(
    x: np.ndarray, y: np.ndarray, l2: float, k: int = 5, seed: int = 0, sample_weight: np.ndarray | None = None
) -> np.ndarray:
    """Each row's score from a head fitted on the other folds."""
    pred = np.zeros(len(y))
    for test in folds(len(y), k, seed):
        train = np.setdiff1d(np.arange(len(y)), test)
        sw = None if sample_weight is None else sample_weight[train]
        head = fit_head("cv", x[train], y[train], ("embedding",), l2, sw)
        pred[test] = head.score_features(x[test])
    return pred


# --- routing metrics for one score over two models ----------------------------------------------


@dataclass(frozen=True)
class Routing:
    apgr: float
    cpt50: float | None  # least share of strong calls reaching 50% PGR
    cpt80: float | None
    saving95: float | None  # 1 - least share of strong calls reaching 95% of the strong model's quality
    weak: float  # mean quality
    strong: float
    points: list[tuple[float, float]]  # (share of strong calls, mean quality)

    def as_dict(self) -> dict:
        return {
            "apgr": self.apgr,
            "cpt50": self.cpt50,
            "cpt80": self.cpt80,
            "saving95": self.saving95,
            "weak": self.weak,
            "strong": self.strong,
        }


def share_curve(score: Sequence[float], weak: Sequence[float], strong: Sequence[float]) -> list[tuple[float, float]]:
    """Quality when the highest-scoring prompts go to the strong model, at every share. Prompts
    with equal scores move together (between them the curve is the straight line a random choice
    among them would give), so a score with few distinct values is not credited with an order it
    does not have."""
    s = np.asarray(score, np.float64)
    w = np.asarray(weak, np.float64)
    g = np.asarray(strong, np.float64) - w
    n = len(s)
    order = np.argsort(-s, kind="stable")
    s, g = s[order], g[order]
    cum = np.concatenate([[0.0], np.cumsum(g)])
    base = w.mean()
    ends = [k for k in range(1, n + 1) if k == n or s[k] != s[k - 1]]
    return [(0.0, base)] + [(k / n, base + cum[k] / n) for k in ends]


def routing(score: Sequence[float], weak: Sequence[float], strong: Sequence[float]) -> Routing:
    points = share_curve(score, weak, strong)
    wq, sq = float(np.mean(weak)), float(np.mean(strong))
    at95 = curves.least_x_reaching(points, 0.95 * sq)
    return Routing(
        apgr=curves.apgr(points, wq, sq),
        cpt50=curves.cpt(points, wq, sq, 0.5),
        cpt80=curves.cpt(points, wq, sq, 0.8),
        saving95=None if at95 is None else 1.0 - at95,
        weak=wq,
        strong=sq,
        points=points,
    )


def threshold_for(
    score: Sequence[float], weak: Sequence[float], strong: Sequence[float], target: float
) -> tuple[float, float, float]:
    """The highest threshold t such that sending score > t to the strong model reaches `target`
    mean quality: (t, quality reached, share of strong calls). t = -1 sends everything."""
    s = np.asarray(score, np.float64)
    w, st = np.asarray(weak, np.float64), np.asarray(strong, np.float64)
    for t in np.unique(s)[::-1]:  # highest threshold first: fewest strong calls
        strong_calls = s > t
        q = float(np.where(strong_calls, st, w).mean())
        if q >= target:
            return float(t), q, float(strong_calls.mean())
    return -1.0, float(st.mean()), 1.0
