"""Facts about one request that decisions test: its text, token count, headers and, once the
encoder has run, its domain, complexity and PII."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from extproc.heads import EMBEDDING_DIM, Head, HeadError
from extproc.request import Message
from extproc.signals.tokens import TokenCounter

Scope = Literal["last_user", "user", "all"]


@dataclass(frozen=True, slots=True)
class Topic:
    """Domain and complexity of the latest user message, and what fitted complexity heads read."""

    domain: str
    domain_probs: Mapping[str, float]
    complexity: float  # the shipped head's
    features: np.ndarray | None = field(default=None, compare=False, repr=False)  # [embedding ; form]
    _scores: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    def complexity_of(self, head: Head | None) -> float:
        """The shipped complexity, or a fitted head's score (computed once per head)."""
        if head is None:
            return self.complexity
        score = self._scores.get(head.name)
        if score is None:
            if self.features is None:
                raise HeadError("no embedding for this message")
            parts = {"embedding": self.features[:EMBEDDING_DIM], "form": self.features[EMBEDDING_DIM:]}
            x = np.concatenate([parts[k] for k in head.inputs])
            score = self._scores[head.name] = float(head.score_features(x))
        return score


@dataclass(frozen=True, slots=True)
class PiiHit:
    """A PII span: which message it is in, and where in that message's text."""

    message: int
    type: str
    start: int
    end: int
    score: float


class Signals:
    """Signals of one request. Cheap ones are computed on first use; classifier ones are set
    by the router after the encoder ran (or failed)."""

    __slots__ = (
        "_lowered",
        "_texts",
        "_tokens",
        "classifier_error",
        "classifier_pending",
        "classifier_read",
        "counter",
        "headers",
        "messages",
        "pii",
        "pii_unchecked",
        "rule_results",
        "tokens_estimated",
        "topic",
    )

    def __init__(self, messages: tuple[Message, ...], headers: Mapping[str, str], counter: TokenCounter) -> None:
        self.messages = messages
        self.headers = headers
        self.counter = counter
        self._texts: dict[str, str] = {}
        self._lowered: dict[str, str] = {}
        self._tokens: int | None = None
        self.topic: Topic | None = None
        self.pii: tuple[PiiHit, ...] | None = None
        self.classifier_pending = True
        self.classifier_error: str | None = None
        # PII types the check could not look for everywhere (text past the tagger's budget, or
        # a scan that stopped at its candidate limit); empty: the check was complete.
        self.pii_unchecked: frozenset[str] = frozenset()
        self.classifier_read: dict[str, int | bool] | None = None  # what the encoder read, for explanations
        self.tokens_estimated = False
        self.rule_results: dict[int, bool] = {}  # text rules evaluated ahead (prepare), by id

    def text(self, scope: Scope) -> str:
        text = self._texts.get(scope)
        if text is None:
            if scope == "last_user":
                text = self.messages[self.last_user_index].text if self.messages else ""
            elif scope == "user":
                text = "\n".join(m.text for m in self.messages if m.role == "user")
            else:
                text = "\n".join(m.text for m in self.messages)
            self._texts[scope] = text
        return text

    def prepare(self, rules: Iterable[Any]) -> None:
        """Evaluate text rules (keyword, regex: pure functions of the text) now, where the caller
        runs this (a large body's lane); their evaluate() then reads the result."""
        for rule in rules:
            self.rule_results[id(rule)] = rule.evaluate(self)

    def lowered(self, scope: Scope) -> str:
        """The scope's text in lower case, computed once for all case-insensitive rules."""
        text = self._lowered.get(scope)
        if text is None:
            text = self._lowered[scope] = self.text(scope).lower()
        return text

    @property
    def last_user_index(self) -> int:
        for i in range(len(self.messages) - 1, -1, -1):
            if self.messages[i].role == "user":
                return i
        return len(self.messages) - 1

    @property
    def tokens(self) -> int:
        """Prompt tokens of the whole conversation: exact up to the counter's bound, estimated
        beyond it (signals/tokens.py). The router counts long prompts off the event loop first."""
        if self._tokens is None:
            self.count_tokens()
        assert self._tokens is not None
        return self._tokens

    def count_tokens(self) -> None:
        self._tokens, self.tokens_estimated = self.counter.count_all([m.text for m in self.messages])

    def classified(self, topic: Topic | None, pii: tuple[PiiHit, ...] | None) -> None:
        self.topic, self.pii, self.classifier_pending = topic, pii, False

    def classifier_failed(self, reason: str) -> None:
        self.classifier_pending, self.classifier_error = False, reason

    def pii_types(self, min_score: float = 0.0) -> list[str]:
        return sorted({h.type for h in self.pii or () if h.score >= min_score})
