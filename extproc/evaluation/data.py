"""Labelled prompts for ``extproc eval``: one JSONL line per prompt.

    {"prompt": "...", "quality": {"<model>": 0 | 1 | score, ...}}
    {"messages": [{"role": "user", "content": "..."}], "quality": {...}, "tokens": {"input": n, "output": m}}

``quality`` holds each model's score on the prompt (0/1 correctness or any number, higher is
better; ``null`` means "not measured"). ``tokens`` is optional: without it the input is counted
with the router's token counter and the output length is the run's assumption. ``id`` is
optional and kept only to name lines in messages. Anything else on the line is ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson


class DataError(ValueError):
    """The eval file cannot be used; the message names the line and the field (never the prompt)."""


@dataclass(frozen=True, slots=True)
class Example:
    line: int  # 1-based line number in the file
    messages: tuple[Mapping[str, Any], ...]  # OpenAI chat messages
    quality: Mapping[str, float]  # model key -> score; unmeasured models are absent
    input_tokens: int | None = None
    output_tokens: int | None = None
    id: str | None = None

    def body(self, model: str) -> bytes:
        """The chat-completions request the router sees for this prompt."""
        return orjson.dumps({"model": model, "messages": list(self.messages)})


def load_examples(path: str | Path) -> list[Example]:
    """Read and check an eval JSONL file."""
    try:
        with open(path, "rb") as f:
            return parse_lines(f)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def parse_lines(lines: Iterable[bytes | str]) -> list[Example]:
    out = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            item = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise DataError(f"line {number}: not valid JSON ({exc})") from None
        out.append(_example(number, item))
    if not out:
        raise DataError("the eval file has no prompts")
    return out


def _example(number: int, item: Any) -> Example:
    where = f"line {number}"
    if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object with 'prompt' or 'messages' and 'quality'")
    if "messages" in item:
        messages = item["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise DataError(f"{where}: 'messages' must be a non-empty list of chat messages")
        messages = tuple(messages)
    elif isinstance(item.get("prompt"), str):
        messages = ({"role": "user", "content": item["prompt"]},)
    else:
        raise DataError(f"{where}: needs 'prompt' (a string) or 'messages' (a list)")
    quality = item.get("quality")
    if not isinstance(quality, dict) or not quality:
        raise DataError(f"{where}: 'quality' must be an object of model -> score")
    scores: dict[str, float] = {}
    for model, value in quality.items():
        if value is None:
            continue  # not measured
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, int | float) or value != value:
            raise DataError(f"{where}: quality[{model!r}] must be a number, true/false or null")
        scores[model] = float(value)
    tokens = item.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise DataError(f"{where}: 'tokens' must be an object {{'input': n, 'output': m}}")
    counts = []
    for key in ("input", "output"):
        value = tokens.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise DataError(f"{where}: tokens.{key} must be a non-negative integer")
        counts.append(value)
    ident = item.get("id")
    return Example(number, messages, scores, counts[0], counts[1], None if ident is None else str(ident))
