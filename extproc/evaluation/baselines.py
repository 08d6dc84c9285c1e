"""What a router is compared with: each single model, random routing, and the oracle.

The reference pair, with any number of models: **weak** is the cheapest single model on the
eval set and **strong** the best one (highest mean quality; the cheaper on a tie). With two
models these are RouteLLM's weak and strong models; with more, APGR and CPT measure how much
of the gap between the cheapest and the best single model a router recovers, and at what cost.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from extproc.evaluation import curves


@dataclass(frozen=True, slots=True)
class Table:
    """Each prompt's quality and cost (USD) on each evaluated model (policy model names)."""

    models: tuple[str, ...]
    quality: Sequence[Mapping[str, float]]
    cost: Sequence[Mapping[str, float]]

    def __len__(self) -> int:
        return len(self.quality)


@dataclass(frozen=True, slots=True)
class Single:
    quality: float  # mean over prompts
    cost: float  # mean USD per prompt


def singles(table: Table) -> dict[str, Single]:
    n = len(table)
    return {m: Single(sum(q[m] for q in table.quality) / n, sum(c[m] for c in table.cost) / n) for m in table.models}


def reference_pair(models: Mapping[str, Single], weak: str | None = None, strong: str | None = None) -> tuple[str, str]:
    """(weak, strong): the cheapest and the best single model unless named."""
    weak = weak or min(models, key=lambda m: (models[m].cost, -models[m].quality))
    strong = strong or max(models, key=lambda m: (models[m].quality, -models[m].cost))
    return weak, strong


@dataclass(frozen=True, slots=True)
class Oracle:
    quality: float  # the cheapest best model for every prompt
    cost: float
    cost_curve: list[tuple[float, float]]  # (mean cost, mean quality): the best at each budget


def oracle(table: Table) -> Oracle:
    models = table.models
    curve = curves.cost_oracle(
        [[c[m] for m in models] for c in table.cost], [[q[m] for m in models] for q in table.quality]
    )
    cost, quality = curve[-1]
    return Oracle(quality, cost, curve)


def share_oracle(table: Table, weak: str, strong: str) -> list[tuple[float, float]]:
    """RouteLLM's optimal two-model curve over the share of strong calls."""
    return curves.share_oracle([q[weak] for q in table.quality], [q[strong] for q in table.quality])
