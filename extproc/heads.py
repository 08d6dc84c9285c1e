"""Complexity heads: a logistic model over the encoder's embedding and cheap features of the prompt's form.

One format serves the shipped default head (model-agnostic difficulty, `model/complexity_head.json`)
and the heads `extproc fit` writes for a user's own weak/strong pair. A head is a small JSON
document, so it ships in the policy's ConfigMap and reloads with it:

    {"format": "extproc-head/1", "name": "my-pair", "inputs": ["embedding", "form"],
     "mean": [...], "scale": [...], "weights": [...], "bias": -0.3, "meta": {...}}

score = sigmoid(bias + weights . ((x - mean) / scale)), x = [embedding (384) ; form features].
Form features count what transfers across data sets better than topic does: length, lines,
lists, code, math symbols, questions asked, steps and constraints requested.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT = "extproc-head/1"
EMBEDDING_DIM = 384

_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")
_LIST_LINE = re.compile(r"^\s*(?:[-*•]|\d+[.)]|[a-zA-Z][.)])\s+", re.MULTILINE)
_OPTION_LINE = re.compile(r"^\s*\(?[A-J][).:]\s", re.MULTILINE)
_CODE = re.compile(r"```|^\s{4,}\S|\bdef |\bclass |\breturn\b|;\s*$|[{}]|=>|::|#include", re.MULTILINE)
_CODE_WORDS = re.compile(
    r"\b(?:python|javascript|typescript|java|c\+\+|golang|rust|sql|bash|regex|function|script|code|program|api|"
    r"html|css|compile|debug|bug|algorithm)\b"
)
_MATH = re.compile(r"[=+\-*/^<>√∑∫π]|\\[a-z]+|\$")
_STEPS = re.compile(r"\b(?:step|steps|explain|why|prove|derive|show|justify|reason|analy[sz]e|compare|evaluate)\b")
_BUILD = re.compile(r"\b(?:write|implement|create|design|build|generate|develop|refactor|optimi[sz]e)\b")
_CONSTRAINTS = re.compile(
    r"\b(?:must|should|at least|at most|exactly|without|only|ensure|include|format|json|table|words|"
    r"paragraphs?|bullet|limit|no more than|less than)\b"
)
_LOOKUP = re.compile(r"^(?:who|what|when|where|which|name)\b")

FORM_FEATURES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_lines",
    "log_sentences",
    "log_questions",
    "log_list_items",
    "log_option_lines",
    "digit_share",
    "math_share",
    "upper_share",
    "code_marks",
    "code_words",
    "step_words",
    "build_words",
    "constraint_words",
    "lookup_question",
    "ends_with_question",
    "log_longest_word",
)


# Form is read from at most this many characters (head and tail halves), so a huge prompt costs
# what a long one does; only the length feature sees the whole text.
FORM_CHARS = 16384


def form_features(text: str) -> np.ndarray:
    """The prompt's form as numbers (FORM_FEATURES order); deterministic, no model."""
    full = len(text)
    if full > FORM_CHARS:
        text = text[: FORM_CHARS // 2] + "\n" + text[full - FORM_CHARS // 2 :]
    n = len(text)
    lower = text.lower()
    words = _WORD.findall(lower)
    stripped = lower.strip()
    return np.array(
        [
            math.log1p(full),
            math.log1p(len(words)),
            math.log1p(text.count("\n") + 1 if text else 0),
            math.log1p(len(_SENTENCE_END.findall(text))),
            math.log1p(text.count("?")),
            math.log1p(len(_LIST_LINE.findall(text))),
            math.log1p(len(_OPTION_LINE.findall(text))),
            sum(c.isdigit() for c in text) / n if n else 0.0,
            len(_MATH.findall(text)) / n if n else 0.0,
            sum(c.isupper() for c in text) / n if n else 0.0,
            math.log1p(len(_CODE.findall(text))),
            math.log1p(len(_CODE_WORDS.findall(lower))),
            math.log1p(len(_STEPS.findall(lower))),
            math.log1p(len(_BUILD.findall(lower))),
            math.log1p(len(_CONSTRAINTS.findall(lower))),
            1.0 if _LOOKUP.match(stripped) else 0.0,
            1.0 if stripped.endswith("?") else 0.0,
            math.log1p(max((len(w) for w in words), default=0)),
        ],
        np.float32,
    )


class HeadError(ValueError):
    """A head document that cannot be used; the message says which field and why."""


@dataclass(frozen=True)
class Head:
    name: str
    inputs: tuple[str, ...]  # "embedding" and/or "form"
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return len(self.weights)

    def features(self, embedding: np.ndarray | None, text: str) -> np.ndarray:
        parts = []
        for kind in self.inputs:
            if kind == "embedding":
                if embedding is None:
                    raise HeadError(f"head {self.name!r} reads the embedding, which this model does not output")
                parts.append(np.asarray(embedding, np.float32))
            else:
                parts.append(form_features(text))
        return np.concatenate(parts)

    def score_features(self, x: np.ndarray) -> np.ndarray:
        """Scores for feature rows [n, width] (or one row)."""
        z = ((np.asarray(x, np.float64) - self.mean) / self.scale) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))

    def score(self, embedding: np.ndarray | None, text: str) -> float:
        return float(self.score_features(self.features(embedding, text)))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "inputs": list(self.inputs),
            "form_features": list(FORM_FEATURES) if "form" in self.inputs else [],
            "mean": [round(float(v), 6) for v in self.mean],
            "scale": [round(float(v), 6) for v in self.scale],
            "weights": [round(float(v), 6) for v in self.weights],
            "bias": round(float(self.bias), 6),
            "meta": dict(self.meta),
        }


def width_of(inputs: tuple[str, ...]) -> int:
    return sum(EMBEDDING_DIM if k == "embedding" else len(FORM_FEATURES) for k in inputs)


def parse_head(doc: Any, name: str | None = None) -> Head:
    """A Head from its JSON document; HeadError names the field that is wrong."""
    if not isinstance(doc, Mapping):
        raise HeadError("a head is a JSON object written by `extproc fit`")
    if doc.get("format") != FORMAT:
        raise HeadError(f"format is {doc.get('format')!r}, expected {FORMAT!r} (write it with `extproc fit`)")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs or any(k not in ("embedding", "form") for k in inputs):
        raise HeadError("inputs must list 'embedding' and/or 'form'")
    if "form" in inputs and list(doc.get("form_features", [])) != list(FORM_FEATURES):
        raise HeadError("form_features differ from this version's; refit the head with this version's `extproc fit`")
    width = width_of(tuple(inputs))
    arrays = {}
    for key in ("mean", "scale", "weights"):
        value = doc.get(key)
        if not isinstance(value, list) or len(value) != width:
            raise HeadError(f"{key} must be a list of {width} numbers for inputs {inputs}")
        try:
            arr = np.array(value, np.float64)
        except (TypeError, ValueError):
            raise HeadError(f"{key} must hold numbers only") from None
        if not np.isfinite(arr).all():
            raise HeadError(f"{key} holds a non-finite number")
        arrays[key] = arr
    if (arrays["scale"] <= 0).any():
        raise HeadError("scale must be positive")
    bias = doc.get("bias")
    if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias):
        raise HeadError("bias must be a finite number")
    meta = doc.get("meta", {})
    if not isinstance(meta, Mapping):
        raise HeadError("meta must be an object")
    return Head(
        name or str(doc.get("name", "head")),
        tuple(inputs),
        arrays["mean"],
        arrays["scale"],
        arrays["weights"],
        float(bias),
        meta,
    )
