"""Decision evaluation: policy + signals -> decision -> model. Pure functions."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from extproc.policy.config import Decision, Policy, Split
from extproc.signals import Signals


class _NeedsClassifier:
    def __repr__(self) -> str:
        return "NEEDS_CLASSIFIER"


NEEDS_CLASSIFIER: Final = _NeedsClassifier()


def decide(policy: Policy, signals: Signals) -> Decision | _NeedsClassifier | None:
    """The first decision (in priority order) whose condition holds; None for the default model.

    Returns NEEDS_CLASSIFIER when the first decision that could still match depends on a
    classifier signal not yet computed: the caller runs the encoder and asks again.
    """
    for decision in policy.decisions:
        if decision.when is None:
            return decision
        result = decision.when.evaluate(signals)
        if result is None:
            return NEEDS_CLASSIFIER
        if result:
            return decision
    return None


@dataclass(frozen=True, slots=True)
class ModelChoice:
    model: str
    fallbacks: tuple[str, ...]


def choose_model(policy: Policy, decision: Decision | None, split_key: str | Callable[[], str]) -> ModelChoice:
    """The decision's model; a split picks by the key, computed only when a split needs it."""
    if decision is None:
        return ModelChoice(policy.default_model, ())
    if decision.model is not None:
        model = decision.model
    else:
        key = split_key() if callable(split_key) else split_key
        model = split_pick(decision.split, f"{decision.name}\0{key}")
    return ModelChoice(model, tuple(f for f in decision.fallbacks if f != model))


def split_pick(split: tuple[Split, ...], key: str) -> str:
    """Weighted choice that is a pure function of the key: a session always gets the same model,
    and changing one weight moves only the share of sessions it must."""
    point = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64
    total = sum(s.weight for s in split)
    edge = 0.0
    for part in split:
        edge += part.weight / total
        if point < edge:
            return part.model
    return split[-1].model


def explain(policy: Policy, signals: Signals) -> list[dict[str, Any]]:
    """Each decision evaluated, in order, up to and including the one that matched."""
    out = []
    for decision in policy.decisions:
        entry: dict[str, Any] = {"decision": decision.name, "priority": decision.priority}
        if decision.when is None:
            entry["result"] = True
        else:
            detail = decision.when.explain(signals)
            entry["result"] = detail.pop("result")
            entry["when"] = detail
        out.append(entry)
        if entry["result"]:
            break
    return out
