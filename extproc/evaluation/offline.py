"""The real router, run offline: the same ``Router.choose`` that serves requests (parse,
signals, decisions, PII policy), over labelled prompts, with no replicas and no server.

Each text is classified once per run: the encoder's results are kept for the whole run, so
re-deciding the prompts under another value of a knob costs only the decisions.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from extproc import request
from extproc.errors import RouterError
from extproc.evaluation.data import DataError, Example
from extproc.heads import Head
from extproc.policy import Policy
from extproc.router import Call, Router
from extproc.signals import Signals


class EvalError(RuntimeError):
    """The evaluation cannot produce honest figures (e.g. the classifier is unavailable)."""


class TextClassifier(Protocol):
    async def classify(
        self, text: str, pii_tokens: int = ..., topic: bool = ..., deadline: float | None = ..., topic_tokens: int = ...
    ) -> Any: ...


@dataclass(frozen=True, slots=True)
class Outcome:
    """Where the router sent one prompt."""

    model: str | None  # policy model name; None when the router answered itself (e.g. PII block)
    decision: str  # the decision's name, "default", or "rejected:<error code>"


class _ClassifiedOnce:
    """In front of the router's classifier: each distinct text goes to the encoder once per run."""

    def __init__(self, inner: TextClassifier) -> None:
        self.inner = inner
        self.results: dict[tuple[Any, ...], asyncio.Future[Any]] = {}

    def cached(self, *args: Any) -> bool:
        return False

    async def classify(self, text: str, *args: Any) -> Any:
        key = (text, *args)
        result = self.results.get(key)
        if result is None:
            result = self.results[key] = asyncio.ensure_future(self.inner.classify(text, *args))
        return await asyncio.shield(result)

    def complexities(self, head: Head | None = None) -> list[float]:
        """Of the texts whose topic was read (args: pii_tokens, topic): the shipped complexity, or
        a fitted head's score."""
        out = []
        for key, f in self.results.items():
            if (len(key) < 3 or key[2]) and f.done() and f.exception() is None:
                r = f.result()
                out.append(r.complexity if head is None else head.score(r.embedding, key[0]))
        return out


def without_replicas(policy: Policy) -> Policy:
    """The policy with no replica discovery: deciding never looks at replicas."""
    models = {name: dataclasses.replace(m, replicas=None) for name, m in policy.models.items()}
    return dataclasses.replace(policy, models=models)


class OfflineRouter:
    """Decides labelled prompts with ``Router.choose``. Build with ``await OfflineRouter.start``."""

    def __init__(self, router: Router, memo: _ClassifiedOnce | None, headers: Mapping[str, str]) -> None:
        self.router = router
        self._memo = memo
        self._headers = dict(headers)

    @classmethod
    async def start(
        cls, policy: Policy, *, headers: Mapping[str, str] | None = None, classifier: TextClassifier | None = None
    ) -> OfflineRouter:
        """Build the router as ``extproc route`` does (the classifier loads if the policy needs
        it). ``classifier`` replaces the shipped encoder (tests)."""
        policy = without_replicas(policy)
        if classifier is None:
            from extproc.app import Runtime, Settings

            runtime = Runtime(Settings(config=Path(), reload=False, metrics_port=None))
            await runtime.apply(policy)
            router = runtime.router
            assert router is not None
        else:
            from extproc.replicas.pool import Discovery, Pools
            from extproc.router import RouterState
            from extproc.signals.classifier import ClassifierSignal

            router = Router(
                RouterState(policy, Pools.build(policy, Discovery())), classifier=ClassifierSignal(classifier, 0)
            )
        memo = None
        if router.classifier is not None:
            memo = _ClassifiedOnce(router.classifier.classifier)
            router.classifier.classifier = memo  # type: ignore[assignment]
            router.classifier.timeout_seconds = None  # type: ignore[assignment]  # offline: wait for every result
        elif policy.uses_classifier:
            raise EvalError(
                "the policy uses classifier signals but the classifier did not load (see the error above); "
                "its conditions would all be false and the figures meaningless"
            )
        return cls(router, memo, headers or {})

    @property
    def policy(self) -> Policy:
        return self.router.state.policy

    @property
    def classified_texts(self) -> int:
        return len({key[0] for key in self._memo.results}) if self._memo is not None else 0

    def complexities(self, head: Head | None = None) -> list[float]:
        """Complexity of every text classified so far (by `head` if given)."""
        return self._memo.complexities(head) if self._memo is not None else []

    def use(self, policy: Policy) -> None:
        """Decide with another policy from now on (the classifier results are kept)."""
        policy = without_replicas(policy)
        if policy.uses_classifier and self.router.classifier is None:
            raise EvalError("this knob value makes the policy use the classifier, which is not loaded")
        self.router.swap(self.router.build_state(policy))

    def input_tokens(self, example: Example) -> int:
        """The prompt's tokens as the router counts them (its `tokens` conditions see the same)."""
        try:
            parsed = request.parse(request.Api.CHAT, example.body("auto"))
        except RouterError as exc:
            raise DataError(f"line {example.line}: the router cannot parse these messages: {exc.message}") from None
        return Signals(parsed.messages, self._headers, self.router.counter).tokens

    async def decide(self, examples: Sequence[Example]) -> list[Outcome]:
        """Decide the prompts one at a time. Each is then classified alone, as a request is when
        traffic is light: the int8 encoder's scores for a text shift with the other texts in its
        batch, so batching here would tie the figures to the order of the eval file."""
        auto = sorted(self.policy.auto_models)[0]
        return [await self._one(e, auto) for e in examples]

    async def _one(self, example: Example, auto: str) -> Outcome:
        call = Call("POST", request.CHAT_PATH, self._headers, example.body(auto))
        try:
            choice = await self.router.choose(call)
        except RouterError as exc:
            if exc.status == 400:
                raise DataError(f"line {example.line}: the router rejects this request: {exc.message}") from None
            return Outcome(None, f"rejected:{exc.code}")
        if choice.signals.classifier_error:
            raise EvalError(f"line {example.line}: the classifier failed ({choice.signals.classifier_error})")
        return Outcome(choice.model.name if choice.model is not None else None, choice.label)

    async def aclose(self) -> None:
        if self._memo is not None:
            close = getattr(self._memo.inner, "aclose", None)
            if close is not None:
                await close()
