"""Cost-quality curves and the RouteLLM metrics on them. Pure functions.

Definitions (Ong et al., "RouteLLM: Learning to Route LLMs with Preference Data", 2024, and
its evaluation code in lm-sys/RouteLLM):

- x is the cost of a routed mix on a 0..1 scale: in the paper the share of calls that go to
  the strong model (0 = always weak, 1 = always strong).
- PGR(x) = (quality(x) - quality(weak)) / (quality(strong) - quality(weak)), the performance
  gap recovered.
- APGR = the area under PGR over x from 0 to 1 (the trapezoid rule over the curve's points).
  Random routing, the straight line from always-weak to always-strong, scores 0.5.
- CPT(p) = the least x at which PGR reaches p (RouteLLM reports CPT(50%) and CPT(80%)).

A curve here is a list of (x, quality) points. Before it is measured it is anchored at
(0, weak) and (1, strong) where it does not reach those ends itself (a deployment can always
send everything to one model), clipped to 0 <= x <= 1, and read as straight segments between
points (mixing two settings in proportion lands on the segment between them). PGR above 1 is
possible when the weak model is right where the strong one is wrong; it is not capped.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

Curve = Sequence[tuple[float, float]]


def pgr(quality: float, weak: float, strong: float) -> float:
    return (quality - weak) / (strong - weak)


def anchored(curve: Curve, weak: float, strong: float) -> list[tuple[float, float]]:
    """The curve sorted by x, with the always-weak and always-strong ends, on 0 <= x <= 1."""
    points = sorted(curve)
    if not points or points[0][0] > 0:
        points.insert(0, (0.0, weak))
    if points[-1][0] < 1:
        points.append((1.0, strong))
    return _clip(points, 0.0, 1.0)


def _clip(points: list[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for i, (x, y) in enumerate(points):
        if i:
            px, py = points[i - 1]
            out.extend((edge, _at(px, py, x, y, edge)) for edge in (lo, hi) if px < edge < x)
        if lo <= x <= hi:
            out.append((x, y))
    return out


def _at(x0: float, y0: float, x1: float, y1: float, x: float) -> float:
    if x1 == x0:
        return y0 if x == x0 else y1
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def area(points: Curve) -> float:
    """Trapezoid area under a sorted curve."""
    return sum((x1 - x0) * (y0 + y1) / 2 for (x0, y0), (x1, y1) in itertools.pairwise(points))


def apgr(curve: Curve, weak: float, strong: float) -> float:
    """Average performance gap recovered: the area under PGR for x in [0, 1]."""
    points = anchored(curve, weak, strong)
    return area([(x, pgr(y, weak, strong)) for x, y in points])


def least_x_reaching(points: Curve, target: float) -> float | None:
    """The least x at which the piecewise-linear curve through sorted points reaches target."""
    if not points:
        return None
    if points[0][1] >= target:
        return points[0][0]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if y1 >= target > y0:
            return x0 + (x1 - x0) * (target - y0) / (y1 - y0)
    return None


def cpt(curve: Curve, weak: float, strong: float, level: float) -> float | None:
    """Call-performance threshold: the least x (0..1) at which PGR reaches level (e.g. 0.5)."""
    return least_x_reaching(anchored(curve, weak, strong), weak + level * (strong - weak))


def random_quality(x: float, weak: float, strong: float) -> float:
    """Random routing at cost x: the straight line between the two models."""
    return weak + x * (strong - weak)


def share_oracle(weak_scores: Sequence[float], strong_scores: Sequence[float]) -> list[tuple[float, float]]:
    """The best two-model routing at each share of strong calls (RouteLLM's "optimal"): spend the
    strong calls on the prompts where the strong model gains most; never on a loss."""
    n = len(weak_scores)
    gains = sorted((s - w for w, s in zip(weak_scores, strong_scores, strict=True)), reverse=True)
    quality = sum(weak_scores) / n
    points = [(0.0, quality)]
    for k, gain in enumerate(gains, 1):
        if gain <= 0:
            break
        quality += gain / n
        points.append((k / n, quality))
    if points[-1][0] < 1:
        points.append((1.0, quality))
    return points


def cost_oracle(costs: Sequence[Sequence[float]], scores: Sequence[Sequence[float]]) -> list[tuple[float, float]]:
    """The best any router could do at each budget: mean cost -> mean quality, for per-prompt
    option lists (one cost and one score per model). It is the upper bound of picking one
    model per prompt (the linear relaxation, exact at its corners): per prompt, start at the
    cheapest model and climb the upper convex hull of (cost, score); spend the budget on the
    steepest climbs of all prompts first. It ends at the oracle: the cheapest best model for
    every prompt."""
    n = len(costs)
    base_cost = base_quality = 0.0
    steps: list[tuple[float, float, float]] = []  # (slope, d_cost, d_quality)
    for prompt_costs, prompt_scores in zip(costs, scores, strict=True):
        options = sorted(zip(prompt_costs, prompt_scores, strict=True), key=lambda o: (o[0], -o[1]))
        c0, q0 = options[0]
        base_cost += c0
        base_quality += q0
        while True:
            best = None
            for c, q in options:
                if c > c0 and q > q0:
                    slope = (q - q0) / (c - c0)
                    if best is None or slope > best[0] or (slope == best[0] and c > best[1]):
                        best = (slope, c, q)
            if best is None:
                break
            slope, c, q = best
            steps.append((slope, c - c0, q - q0))
            c0, q0 = c, q
    steps.sort(key=lambda s: -s[0])
    points = [(base_cost / n, base_quality / n)]
    cost, quality = base_cost, base_quality
    for _, d_cost, d_quality in steps:
        cost += d_cost
        quality += d_quality
        points.append((cost / n, quality / n))
    return points
