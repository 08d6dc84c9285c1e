"""Helpers for the eval tests: small policies, JSONL files, and a stand-in classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extproc.classifier import DOMAINS, Classification, PiiSpan

# Rule-only: needs no model. Long prompts go to the strong model.
RULE_POLICY = """
version: 1
default_model: weak
models:
  weak: {pricing: {input_per_million: 1, output_per_million: 1}}
  strong: {pricing: {input_per_million: 10, output_per_million: 10}}
decisions:
  - name: long
    when: {tokens: {min: 50}}
    model: strong
"""

# Routes on complexity; used with the stand-in classifier.
COMPLEXITY_POLICY = """
version: 1
default_model: weak
models:
  weak: {upstream_model: org/weak-v1, pricing: {input_per_million: 1, output_per_million: 1}}
  strong: {upstream_model: org/strong-v1, pricing: {input_per_million: 10, output_per_million: 10}}
decisions:
  - name: code
    when: {keyword: ["traceback"]}
    model: strong
  - name: hard
    when: {all: [{domain: [math, physics]}, {complexity: {above: 0.5}}]}
    model: strong
"""

SENTINEL = "zanzibar"  # in every test prompt, to prove prompts never leak into outputs


class StandInClassifier:
    """Reads the complexity from the prompt ('c=0.73'); counts what reaches it."""

    def __init__(self, pii: dict[str, str] | None = None) -> None:
        self.calls: list[str] = []
        self.pii = pii or {}

    async def classify(self, text: str, *args: object) -> Classification:
        self.calls.append(text)
        complexity = float(text.split("c=", 1)[1].split()[0]) if "c=" in text else 0.0
        spans = tuple(PiiSpan(kind, 0, 3, 0.99) for marker, kind in self.pii.items() if marker in text)
        return Classification("math", {d: 1.0 if d == "math" else 0.0 for d in DOMAINS}, complexity, spans)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def long_short_rows() -> list[dict]:
    """Ten prompts: five short (the weak model is right on odd ones), five long; the strong model
    is always right. Every line gives its tokens: 100 in, 0 out."""
    rows = []
    for i in range(10):
        words = " ".join([SENTINEL] * (10 if i < 5 else 200))
        rows.append({"prompt": words, "quality": {"weak": i % 2, "strong": 1}, "tokens": {"input": 100, "output": 0}})
    return rows


@pytest.fixture
def rule_policy(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(RULE_POLICY)
    return path
