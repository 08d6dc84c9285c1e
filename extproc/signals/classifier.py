"""Classifier signals: the encoder's domain, complexity and PII, within a per-request budget.

Domain and complexity come from the latest user message (its head and tail: one window).

PII is looked for in every message, in two ways:
- structured values (US_SSN, CREDIT_CARD, IBAN_CODE, EMAIL_ADDRESS, IP_ADDRESS, PHONE_NUMBER) by
  pattern and validator over the whole conversation, normalized (extproc/classifier/normalize.py)
  and read both as sent and with each message's parts concatenated, as a chat template may join
  them. Linear in the conversation's length, run off the event loop;
- the encoder's tagger, over at most `pii_tokens` tokens per request: the latest user message
  first, then the others newest first. It confirms the structured values it reads (a shape alone
  is not enough there) and finds the types no pattern can (PERSON, STREET_ADDRESS).

Where the tagger did not read, a validated structured value counts on its own (score 1.0) and
the tagger-only types are unchecked (``Signals.pii_unchecked``): a PII policy asking for them
then fails closed (router.py), so privacy never opens up because a prompt is long. A message with
no structured value needs the tagger only if such types are asked for: with a policy over the
structured types (the bundled one), most requests need no encoder pass for PII at all.

Each message is classified on its own and cached by the classifier, so a new turn of a long
conversation costs only its new message.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING

import numpy as np

from extproc.classifier.pii import STRUCTURED, Candidate, named_by_key, scan
from extproc.classifier.text import DEFAULT_PII_TOKENS, WINDOW
from extproc.heads import form_features
from extproc.lanes import LARGE_BODY_BYTES, LARGE_BODY_SECONDS
from extproc.request import Message
from extproc.signals import PiiHit, Signals, Topic

if TYPE_CHECKING:
    from extproc.classifier import AsyncClassifier

# Budget charged per message the tagger reads: characters / 4 (an estimate: the exact count
# needs the tokenizer), and at least this, for the fixed cost of an encoder run.
MIN_MESSAGE_TOKENS = 32
VALIDATED_ONLY = 1.0  # score of a structured value no tagger read: its validator decided alone
TAGGER_ONLY = frozenset({"PERSON", "STREET_ADDRESS"})
# Conversations up to this many characters are scanned on the event loop: ~10 us for a prompt,
# ~2 ms for 4,000 characters dense with shapes to validate, less than a thread hop and no queue.
SCAN_INLINE_CHARS = 4096
_TEXT = attrgetter("text")


@dataclass(slots=True)
class Scan:
    """Validated structured values per message (offsets into Message.text)."""

    found: dict[int, list[Candidate]] = field(default_factory=dict)
    crossing: dict[int, list[Candidate]] = field(default_factory=dict)  # across content parts
    complete: bool = True


def scan_conversation(messages: Sequence[Message], types: frozenset[str] | None) -> Scan:
    """One pass over the conversation (messages joined by newlines, which no pattern crosses),
    and one over the multi-part messages with their parts concatenated."""
    out = Scan()
    wanted = None if types is None else types & STRUCTURED
    if wanted is not None and not wanted:
        return out
    texts = [m.text for m in messages]
    found, out.complete = scan("\n".join(texts), wanted)
    _assign(found, texts, out.found)
    parts = [i for i, m in enumerate(messages) if m.breaks]
    if parts:
        joined = [messages[i].joined() for i in parts]
        crossing, complete = scan("\n".join(joined), wanted)
        out.complete &= complete
        by_part: dict[int, list[Candidate]] = {}
        _assign(crossing, joined, by_part)
        for j, cands in by_part.items():
            m = messages[parts[j]]
            starts = m.joined_starts()
            mapped = [
                Candidate(c.type, m.from_joined(c.start, starts), m.from_joined(c.end - 1, starts) + 1) for c in cands
            ]
            # Only what crosses a part boundary is new: the rest was found in the first pass.
            crossing_ = [c for c in mapped if m.crosses_break(c.start, c.end)]
            if crossing_:
                out.crossing[parts[j]] = crossing_
    return out


def _assign(found: list[Candidate], texts: list[str], into: dict[int, list[Candidate]]) -> None:
    """Candidates of the newline-joined texts, per text, with offsets into that text."""
    starts = list(itertools.accumulate((len(t) + 1 for t in texts), initial=0))
    for c in found:
        i = bisect.bisect_right(starts, c.start) - 1
        into.setdefault(i, []).append(Candidate(c.type, c.start - starts[i], c.end - starts[i]))


def _add_disjoint(spans: list[PiiHit], extra: list[Candidate], message: int) -> list[PiiHit]:
    """spans (disjoint) and, in order, each of extra that overlaps nothing kept before it, at the
    validator's score. Each is checked against its neighbours in a sorted list: a message may hold
    20,000 values, and checking each against all the others took seconds on the event loop."""
    out = list(spans)
    kept = sorted((h.start, h.end) for h in spans)
    for c in extra:
        k = bisect.bisect_left(kept, (c.start,))
        if (k and kept[k - 1][1] > c.start) or (k < len(kept) and kept[k][0] < c.end):
            continue
        kept.insert(k, (c.start, c.end))
        out.append(PiiHit(message, c.type, c.start, c.end, VALIDATED_ONLY))
    return out


class ClassifierSignal:
    def __init__(
        self,
        classifier: AsyncClassifier,
        timeout_seconds: float,
        pii_tokens: int = DEFAULT_PII_TOKENS,
        topic_tokens: int = WINDOW,
    ) -> None:
        self.classifier = classifier
        self.timeout_seconds = timeout_seconds
        self.pii_tokens = pii_tokens
        self.topic_tokens = topic_tokens  # what domain and complexity read of the latest user message
        # The structured scan runs here, not on the event loop and not behind the encoder's queue;
        # a short conversation's inline (microseconds), a large one's in a lane of its own, so
        # no scan waits behind a large conversation's but another large one's.
        self._scanner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pii-scan")
        self._large_scanner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pii-scan-large")

    async def annotate(
        self, signals: Signals, *, pii: bool, topic: bool = True, pii_types: frozenset[str] | None = None
    ) -> None:
        """Fill in signals' topic (if asked) and PII (if asked; `pii_types` None: every type).

        Raises on failure or timeout; the caller records the failure and routes on what remains.
        The two answers are kept apart: if the topic misses the deadline but the PII check needed
        no encoder (or got its answer), the PII answer stands and the policy need not fail closed.
        """
        loop = asyncio.get_running_loop()
        # None: no deadline (offline evaluation waits for every result)
        deadline = loop.time() + (self.timeout_seconds if self.timeout_seconds is not None else 1e9)
        messages = signals.messages
        last = signals.last_user_index
        found = Scan()
        if pii:
            size = sum(map(len, map(_TEXT, messages)))
            if size <= SCAN_INLINE_CHARS:
                found = scan_conversation(messages, pii_types)
            elif size <= LARGE_BODY_BYTES:
                scanning = loop.run_in_executor(self._scanner, scan_conversation, messages, pii_types)
                found = await asyncio.wait_for(scanning, max(0.0, deadline - loop.time()))
            else:
                # A large conversation's scan takes its turn in its lane, within the large body's
                # own deadline (the stream has asked Envoy to wait that long), not the encoder's:
                # waiting behind other large bodies must not fail it closed. The encoder's
                # deadline then starts after the scan.
                scanning = loop.run_in_executor(self._large_scanner, scan_conversation, messages, pii_types)
                found = await asyncio.wait_for(scanning, LARGE_BODY_SECONDS)
                deadline = max(deadline, loop.time() + (self.timeout_seconds or 0.0))
        needs_tagger = pii and (pii_types is None or bool(pii_types & TAGGER_ONLY))
        asks = self._plan(messages, last, found, pii=pii, topic=topic, needs_tagger=needs_tagger)
        # The classifier drops a text that could no longer make this deadline (batching.py), so a
        # request past it under overload routes on its other signals now rather than at the deadline.
        give_up = deadline if self.timeout_seconds is not None else None
        budget = self.topic_tokens
        tasks = {
            i: asyncio.ensure_future(self.classifier.classify(messages[i].text, n, t, give_up, budget))
            for i, n, t in asks
        }
        try:
            if tasks:
                await asyncio.wait(tasks.values(), timeout=max(0.0, deadline - loop.time()))
        finally:
            for task in tasks.values():
                task.cancel()  # a no-op for the finished ones; the rest is given up
        done = {i: t.result() for i, t in tasks.items() if t.done() and not t.cancelled() and t.exception() is None}
        failed = [t.exception() for t in tasks.values() if t.done() and not t.cancelled() and t.exception()]
        read_topic = done.get(last) if topic else None
        signals.topic = _topic(read_topic, messages[last].text)
        topic_chars = 0 if read_topic is None else read_topic.topic_chars
        if topic_chars is None:
            topic_chars = len(messages[last].text)
        signals.classifier_read = {
            "topic_chars": topic_chars,
            "topic_skipped_chars": len(messages[last].text) - topic_chars if read_topic else 0,
        }
        pii_done = all(i in done for i, n, t in asks if n or not t)
        if pii and pii_done:
            signals.pii = self._hits(signals, found, done, needs_tagger)
        if failed:
            raise failed[0]
        if len(done) < len(tasks):
            raise TimeoutError("classifier deadline")
        signals.classifier_pending = False

    def _plan(
        self, messages: Sequence[Message], last: int, found: Scan, *, pii: bool, topic: bool, needs_tagger: bool
    ) -> list[tuple[int, int, bool]]:
        """(message, tagger tokens, topic) to ask the encoder for: the latest user message (for the
        topic, or first in line for PII), then the others newest first, while the budget lasts."""
        if not messages:
            return []
        if needs_tagger:
            newest_first = (i for i in range(len(messages) - 1, -1, -1) if i != last)
        else:  # only messages holding a structured value need the tagger
            newest_first = (i for i in sorted(found.found, reverse=True) if i != last)
        left = self.pii_tokens
        asks: list[tuple[int, int, bool]] = []
        for i in itertools.chain([last], newest_first):
            text = messages[i].text
            is_topic = topic and i == last
            tag = pii and (needs_tagger or i in found.found)
            if not text or not (is_topic or tag):
                continue
            tokens = self.pii_tokens if tag else 0
            if tag and not self.classifier.cached(text, tokens, is_topic, self.topic_tokens):
                if left <= 0:
                    if not is_topic:
                        break  # past the budget: structured values count on their validator
                    tokens = 0
                left -= max(MIN_MESSAGE_TOKENS, min(self.pii_tokens, len(text) // 4))
            asks.append((i, tokens, is_topic))
        return asks

    def _hits(self, signals: Signals, found: Scan, done: dict, needs_tagger: bool) -> tuple[PiiHit, ...]:
        messages = signals.messages
        hits: list[PiiHit] = []
        tagged_chars = 0
        # Only messages the tagger read or a value was found in: a body of 100,000 messages
        # costs what its few interesting ones do.
        for i in sorted({*done, *found.found, *found.crossing}):
            m, result = messages[i], done.get(i)
            tagged = 0 if result is None else len(m.text) if result.pii_chars is None else result.pii_chars
            tagged_chars += tagged
            spans = [PiiHit(i, s.type, s.start, s.end, s.score) for s in result.pii] if result is not None else []
            # Where the tagger did not read, a validated value counts on its own; and a value
            # split across parts is taken on its validator too (nobody splits one by accident).
            # A value labelled by its JSON key ({"ssn": "..."}: tool-call arguments) counts on its
            # validator and that label, where the tagger read it too (it scores bare values low).
            labelled = [
                c for c in found.found.get(i, ()) if c.start < tagged and named_by_key(m.text, c.start, c.end, c.type)
            ]
            spans = [s for s in spans if all(s.end <= c.start or s.start >= c.end for c in labelled)]
            extra = [c for c in found.found.get(i, ()) if c.start >= tagged] + found.crossing.get(i, []) + labelled
            hits.extend(sorted(_add_disjoint(spans, extra, i), key=lambda h: h.start))
        skipped = sum(map(len, (m.text for m in messages))) - tagged_chars if needs_tagger else 0
        unchecked: frozenset[str] = frozenset()
        if not found.complete:
            unchecked = STRUCTURED | TAGGER_ONLY
        elif skipped:
            unchecked = TAGGER_ONLY
        signals.pii_unchecked = unchecked
        assert signals.classifier_read is not None
        signals.classifier_read.update(
            {"pii_tagged_chars": tagged_chars, "skipped_chars": skipped, "pii_complete": not unchecked}
        )
        return tuple(hits)

    def close(self) -> None:
        self._scanner.shutdown(wait=False, cancel_futures=True)
        self._large_scanner.shutdown(wait=False, cancel_futures=True)


def _topic(result, text: str) -> Topic | None:
    """The topic of the latest user message, with what fitted complexity heads read."""
    if result is None:
        return None
    features = None
    if result.embedding is not None:
        features = np.concatenate([result.embedding, form_features(text)])
    return Topic(result.domain, result.domain_probs, result.complexity, features)
