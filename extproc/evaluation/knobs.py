"""The knob a sweep turns: a path into the policy's YAML, e.g.

    decisions[hard].when.all[1].complexity.above

Dots separate mapping keys; ``[i]`` indexes a list, and ``[name]`` picks the list item whose
``name`` is ``name`` (decisions are easier to name than to count). Each swept value is written
into a copy of the policy's data, which is then parsed again by ``extproc.policy.parse_policy``,
so a value the schema rejects fails exactly as it would in ``extproc check-config``.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from typing import Any

import yaml

_SEGMENT = re.compile(r"([^.\[\]]+)((?:\[[^\]]+\])*)")
_INDEX = re.compile(r"\[([^\]]+)\]")

Step = str | int


class KnobError(ValueError):
    """The knob path does not name a value in the policy."""


def parse_path(path: str) -> tuple[Step, ...]:
    steps: list[Step] = []
    for part in path.split("."):
        match = _SEGMENT.fullmatch(part)
        if match is None:
            raise KnobError(
                f"cannot read knob path {path!r} at {part!r}; write e.g. decisions[hard].when.complexity.above"
            )
        steps.append(match.group(1))
        for index in _INDEX.findall(match.group(2)):
            steps.append(int(index) if index.lstrip("-").isdigit() else index)
    return tuple(steps)


def _child(node: Any, step: Step, path: str) -> tuple[Any, Step]:
    """The child of node at step, and the concrete key or index it lives under."""
    if isinstance(node, list):
        if isinstance(step, int):
            if -len(node) <= step < len(node):
                return node[step], step
            raise KnobError(f"knob {path}: index {step} is out of range (the list has {len(node)} items)")
        for i, item in enumerate(node):
            if isinstance(item, dict) and item.get("name") == step:
                return item, i
        names = [item.get("name") for item in node if isinstance(item, dict) and "name" in item]
        raise KnobError(f"knob {path}: no item named {step!r}; named items: {', '.join(map(str, names)) or 'none'}")
    if isinstance(node, dict) and isinstance(step, str):
        if step in node:
            return node[step], step
        raise KnobError(f"knob {path}: no key {step!r}; keys here: {', '.join(map(str, node)) or 'none'}")
    raise KnobError(f"knob {path}: {step!r} does not apply to a {type(node).__name__}")


def get(data: Any, path: str) -> Any:
    node = data
    for step in parse_path(path):
        node, _ = _child(node, step, path)
    return node


def replaced(data: Any, path: str, value: Any) -> Any:
    """A deep copy of data with the value at path replaced."""
    steps = parse_path(path)
    out = copy.deepcopy(data)
    node = out
    for step in steps[:-1]:
        node, _ = _child(node, step, path)
    _, key = _child(node, steps[-1], path)
    node[key] = value
    return out


def find_complexity_thresholds(data: Any) -> Iterator[str]:
    """Paths of every ``complexity.above`` in the decisions, in file order."""
    for i, decision in enumerate(data.get("decisions") or []):
        if not isinstance(decision, dict):
            continue
        head = f"decisions[{decision['name']}]" if isinstance(decision.get("name"), str) else f"decisions[{i}]"
        yield from _walk(decision.get("when"), f"{head}.when")


def _walk(node: Any, path: str) -> Iterator[str]:
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "complexity" and isinstance(value, dict) and "above" in value:
            yield f"{path}.complexity.above"
        elif key in ("all", "any") and isinstance(value, list):
            for i, child in enumerate(value):
                yield from _walk(child, f"{path}.{key}[{i}]")
        elif key == "not":
            yield from _walk(value, f"{path}.not")


def default_knob(data: Any) -> str:
    """The first ``complexity.above`` in the policy."""
    for path in find_complexity_thresholds(data):
        return path
    raise KnobError(
        "the policy has no complexity.above to sweep; "
        "name a numeric knob with --sweep PATH and its values with --values"
    )


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
