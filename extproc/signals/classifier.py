"""Classifier signals: the encoder's domain, complexity and PII, per message.

Each message is classified on its own and cached by the classifier, so a new turn of a long
conversation costs only its new message. Domain and complexity come from the latest user
message; PII is looked for in every message (it matters wherever it is sent).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from extproc.signals import PiiHit, Signals, Topic

if TYPE_CHECKING:
    from extproc.classifier import AsyncClassifier


class ClassifierSignal:
    def __init__(self, classifier: AsyncClassifier, timeout_seconds: float) -> None:
        self.classifier = classifier
        self.timeout_seconds = timeout_seconds

    async def annotate(self, signals: Signals, *, pii: bool) -> None:
        """Fill in signals' topic (and PII when asked). Raises on failure or timeout; the
        caller records the failure and routes on what remains."""
        last = signals.last_user_index
        wanted = [i for i, m in enumerate(signals.messages) if m.text and (pii or i == last)]
        results = await asyncio.wait_for(
            asyncio.gather(*(self.classifier.classify(signals.messages[i].text) for i in wanted)),
            self.timeout_seconds,
        )
        topic = None
        hits: list[PiiHit] = []
        for i, result in zip(wanted, results, strict=True):
            if i == last:
                topic = Topic(result.domain, result.domain_probs, result.complexity)
            if pii:
                hits.extend(PiiHit(i, s.type, s.start, s.end, s.score) for s in result.pii)
        signals.classified(topic, tuple(hits) if pii else None)
