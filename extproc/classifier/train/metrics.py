"""Metrics (numpy only): accuracy/confusion, AUC, RouteLLM's routing curve, entity-level F1."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def confusion(y: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), np.int64)
    np.add.at(m, (y, pred), 1)
    return m


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank statistic (ties get average ranks)."""
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    s = score[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = y == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class RoutingCurve:
    calls: np.ndarray  # share of queries sent to the strong model, 0..1
    pgr: np.ndarray  # performance gap recovered at that share
    weak_acc: float
    strong_acc: float

    @property
    def apgr(self) -> float:
        """Average PGR: area under PGR over the strong-call share (RouteLLM)."""
        return float(np.trapezoid(self.pgr, self.calls))

    def cpt(self, target: float) -> float:
        """Call-performance threshold: the least strong-call share reaching `target` PGR."""
        ok = np.nonzero(self.pgr >= target)[0]
        return float(self.calls[ok[0]]) if len(ok) else float("nan")


def routing_curve(score: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> RoutingCurve:
    """Route the highest-scoring queries to the strong model, for every share 0..n."""
    order = np.argsort(-score, kind="mergesort")
    w, s = weak[order].astype(float), strong[order].astype(float)
    n = len(score)
    acc = (np.concatenate([[0.0], np.cumsum(s)]) + np.concatenate([[w.sum()], w.sum() - np.cumsum(w)])) / n
    wa, sa = w.mean(), s.mean()
    return RoutingCurve(np.arange(n + 1) / n, (acc - wa) / (sa - wa), float(wa), float(sa))


@dataclass
class SpanCounts:
    tp_pred: int = 0  # predicted spans that match a gold span
    n_pred: int = 0
    tp_gold: int = 0  # gold spans that are matched
    n_gold: int = 0

    @property
    def precision(self) -> float:
        return self.tp_pred / self.n_pred if self.n_pred else float("nan")

    @property
    def recall(self) -> float:
        return self.tp_gold / self.n_gold if self.n_gold else float("nan")

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r > 0 else 0.0


def match_spans(
    gold: list[tuple[int, int, str]],
    pred: list[tuple[int, int, str]],
    types: tuple[str, ...],
    counts: dict[str, SpanCounts],
    *,
    exact: bool,
) -> None:
    """Entity-level matching per type. Exact: same type and same boundaries. Overlap: same type and
    overlapping characters; one predicted span may cover several gold pieces (presidio splits an
    address into street/number/zip) and each gold span is counted once."""

    def hit(a: tuple[int, int, str], b: tuple[int, int, str]) -> bool:
        if a[2] != b[2]:
            return False
        return (a[0], a[1]) == (b[0], b[1]) if exact else a[0] < b[1] and b[0] < a[1]

    for t in types:
        g = [s for s in gold if s[2] == t]
        p = [s for s in pred if s[2] == t]
        c = counts.setdefault(t, SpanCounts())
        c.n_gold += len(g)
        c.n_pred += len(p)
        c.tp_gold += sum(any(hit(x, y) for y in p) for x in g)
        c.tp_pred += sum(any(hit(y, x) for x in g) for y in p)


def micro(counts: dict[str, SpanCounts], types: tuple[str, ...]) -> SpanCounts:
    out = SpanCounts()
    for t in types:
        c = counts.get(t, SpanCounts())
        out.tp_pred += c.tp_pred
        out.n_pred += c.n_pred
        out.tp_gold += c.tp_gold
        out.n_gold += c.n_gold
    return out
