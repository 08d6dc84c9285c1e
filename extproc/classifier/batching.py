"""AsyncClassifier: a per-text LRU cache and a deadline-aware scheduler in front of a Classifier.

Callers classify each message of a conversation separately, so a new turn costs only its new
message: earlier messages are cache hits, and identical texts in flight share one computation.
Inference runs in worker threads (`workers` texts at once), never on the event loop, one text per
onnxruntime run: padding texts into one run bought little throughput on the CPUs measured (at most
~8%, model card "Run time") and made each text's int8 outputs depend on its batch-mates.

Under overload the scheduler must neither run texts whose callers have given up nor let a few
texts starve. It serves the waiting text with the **earliest deadline** first (for callers with one
timeout: first in, first out), and **drops** with `DeadlineExceededError`, at once, a text that can
no longer make its callers' deadline, so its callers route on their other signals now instead of
at the deadline:
- on arrival, when the work already queued ahead of it (estimated from how long texts have been
  taking per token, spread over the workers) would finish it after its deadline;
- when its turn comes, if it would finish after its deadline (`_MARGIN` x its estimate from now);
- past `max_batch` waiting texts per worker (a bound on memory): the one that would be served last.
So every text that runs is one whose caller can still use it, and below saturation none is dropped.
First in, first out without the drops served every text just after its caller gave up (54 -> 13
texts/s past saturation, model card "Throughput under concurrency"); newest first with the drops
(issue 16's second round) kept throughput but starved the oldest waiting texts below saturation:
with C callers always waiting, some missed their deadline long before the classifier was full.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from extproc.classifier.classifier import Classification, Classifier
from extproc.classifier.text import DEFAULT_PII_TOKENS, WINDOW

log = logging.getLogger(__name__)

# Seconds per estimated token before any text has been measured (two busy cores, 64 tokens ~ 15 ms)
_INITIAL_SECONDS_PER_TOKEN = 3e-4
_EWMA = 0.2  # weight of the newest measurement in the running estimate
# A text runs only if it would finish within its deadline at this multiple of its estimate: the
# estimate is a running mean, and a text that ends just past its deadline is wasted work.
_MARGIN = 1.25


class ClassifierClosedError(RuntimeError):
    """classify() was called on, or was pending in, an AsyncClassifier that has been closed."""


class DeadlineExceededError(TimeoutError):
    """The text was dropped: it could not have been classified before its callers' deadline."""


def text_key(text: str, pii_tokens: int = DEFAULT_PII_TOKENS, topic: bool = True, topic_tokens: int = WINDOW) -> bytes:
    """Cache key: a 16-byte digest (so the cache never holds prompt text) and what was asked."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    if len(text) <= 2 * WINDOW:  # the topic is always read (classifier.py), the tagger one window
        pii_tokens, topic = (WINDOW if pii_tokens else 0), True
    budget = min(topic_tokens, WINDOW) if topic else WINDOW
    return digest + pii_tokens.to_bytes(4, "big") + bytes([topic]) + budget.to_bytes(2, "big")


def _tokens(text: str, pii_tokens: int, topic: bool, topic_tokens: int = WINDOW) -> int:
    """The encoder tokens a text will cost, roughly (4 characters a token), for the run-time estimate."""
    n, short = len(text) // 4, len(text) <= 2 * WINDOW
    tagged = min(n, WINDOW if short else pii_tokens) if pii_tokens else 0
    read = min(n, topic_tokens, WINDOW) if topic or short else 0
    # one sequence serves both when the text fits the topic budget (classifier.py)
    tokens = tagged if short and tagged and n <= topic_tokens else tagged + read
    return max(tokens + 2, 8)


@dataclass(slots=True)
class _Job:
    key: bytes
    text: str
    pii_tokens: int
    topic: bool
    deadline: float  # loop time by which its last caller gives up (inf: none)
    tokens: int
    topic_tokens: int = WINDOW
    embed: bool = False  # also the sentence embedding (a semantic cache's question); key is _EMBED + its cache key


# In-flight keys of embed() jobs: a text being classified and the same text being embedded are two
# computations (the second adds the sentence layer), though both results are cached under one key.
_EMBED = b"embed:"


class AsyncClassifier:
    def __init__(
        self,
        classifier: Classifier,
        *,
        max_batch: int = 64,
        max_wait_ms: float = 0.0,
        cache_size: int = 4096,
        on_batch: Callable[[int, float], None] | None = None,
        workers: int = 1,
    ) -> None:
        """`max_batch`: texts that may wait per worker; `on_batch(texts, seconds)` is called after
        every run (one text a run). `max_wait_ms` is accepted for existing policies and ignored:
        texts never share a run, so there is no batch to wait for."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        del max_wait_ms
        self._classifier = classifier
        self._max_waiting = max_batch * workers
        self._cache_size = cache_size
        self._on_batch = on_batch
        self._cache: OrderedDict[bytes, Classification] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[Classification]] = {}
        self._waiting: dict[bytes, int] = {}  # callers still awaiting each in-flight key
        self._jobs: dict[bytes, _Job] = {}  # waiting to run, oldest first
        self._wake: asyncio.Event | None = None
        self._workers: list[asyncio.Task[None]] = []
        # workers > 1 runs that many texts at once (one onnxruntime session is safe to share): on
        # two cores, two texts with one onnxruntime thread each beat one text with two threads
        # (bench/classifier_concurrency.py)
        self._n_workers = workers
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="classifier")
        self._closed = False
        self._abandoned = 0  # texts given up by every caller before their result
        self._last_key: tuple[str, tuple[int, bool, int], bytes] | None = None
        self._dropped = 0  # texts dropped because they could not make their deadline
        self._seconds_per_token = _INITIAL_SECONDS_PER_TOKEN
        self._running_tokens = 0  # estimated tokens of the texts being classified now

    def cached(
        self, text: str, pii_tokens: int = DEFAULT_PII_TOKENS, topic: bool = True, topic_tokens: int = WINDOW
    ) -> bool:
        """The result for `text` is at hand (cached or being computed): asking costs no encoder time."""
        key = self._key(text, pii_tokens, topic, topic_tokens)
        return key in self._cache or key in self._inflight

    def _key(self, text: str, pii_tokens: int, topic: bool, topic_tokens: int) -> bytes:
        """text_key, remembered for the last text asked about: cached() and classify() ask about
        the same one in turn, and digesting a megabyte prompt twice on the event loop costs."""
        last = self._last_key
        if last is not None and last[0] is text and last[1] == (pii_tokens, topic, topic_tokens):
            return last[2]
        key = text_key(text, pii_tokens, topic, topic_tokens)
        self._last_key = (text, (pii_tokens, topic, topic_tokens), key)
        return key

    async def classify(
        self,
        text: str,
        pii_tokens: int = DEFAULT_PII_TOKENS,
        topic: bool = True,
        deadline: float | None = None,
        topic_tokens: int = WINDOW,
    ) -> Classification:
        """Domain, complexity and PII of one text; the tagger reads its first `pii_tokens` tokens
        (0: none), and `topic=False` may skip domain and complexity; domain and complexity read at
        most `topic_tokens` tokens, head and tail (Classifier.classify).

        `deadline` (event-loop time) is when this caller gives up: a text that can no longer be
        classified by then is dropped with DeadlineExceededError instead of being run late.
        """
        if self._closed:
            raise ClassifierClosedError("AsyncClassifier is closed")
        key = self._key(text, pii_tokens, topic, topic_tokens)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        return await self._scheduled(
            key, text, pii_tokens, topic, math.inf if deadline is None else deadline, topic_tokens, False
        )

    async def _scheduled(
        self, key: bytes, text: str, pii_tokens: int, topic: bool, limit: float, topic_tokens: int, embed: bool
    ) -> Classification:
        """The result of the job `key`, queued (or joined, if in flight) until `limit`."""
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._inflight[key] = pending
            self._ensure_workers()
            cost = _tokens(text, pii_tokens, topic, topic_tokens)
            job = _Job(key, text, pii_tokens, topic, limit, cost, topic_tokens, embed)
            self._admit(job, asyncio.get_running_loop().time())  # may fail `pending` at once
            assert self._wake is not None
            self._wake.set()
        else:
            job = self._jobs.get(key)
            if job is not None and limit > job.deadline:
                job.deadline = limit  # a later caller waits longer for the same text
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            # shield: one caller being cancelled must not cancel the shared result for the others
            return await asyncio.shield(pending)
        finally:
            self._leave(key, pending)

    async def embed(self, text: str, deadline: float | None = None) -> np.ndarray:
        """The text's [384] unit-length sentence embedding (for a semantic cache), cached with its
        classification: a text already embedded costs nothing; one only classified runs again with
        the sentence layer (a classification plus ~18% of a plain pass), off the event loop.

        It waits its turn in the same earliest-deadline-first queue as classify() (it once went
        straight to the worker threads, ahead of every waiting text and unseen by admission), and
        is dropped with DeadlineExceededError like a text that can no longer make `deadline`."""
        if self._closed:
            raise ClassifierClosedError("AsyncClassifier is closed")
        cache_key = text_key(text)
        hit = self._cache.get(cache_key)
        if hit is not None and hit.sentence_embedding is not None:
            self._cache.move_to_end(cache_key)
            return hit.sentence_embedding
        result = await self._scheduled(
            _EMBED + cache_key, text, DEFAULT_PII_TOKENS, True, math.inf if deadline is None else deadline, WINDOW, True
        )
        assert result.sentence_embedding is not None
        return result.sentence_embedding

    def _leave(self, key: bytes, pending: asyncio.Future[Classification]) -> None:
        left = self._waiting[key] - 1
        if left:
            self._waiting[key] = left
            return
        del self._waiting[key]
        if not pending.done() and self._inflight.get(key) is pending:
            # Nobody waits for it any more: it is not run unless it already started.
            del self._inflight[key]
            self._jobs.pop(key, None)
            pending.cancel()
            self._abandoned += 1

    def _ensure_workers(self) -> None:
        if not self._workers:
            self._wake = asyncio.Event()
            loop = asyncio.get_running_loop()
            self._workers = [
                loop.create_task(self._work(), name=f"classifier-worker-{i}") for i in range(self._n_workers)
            ]

    def _drop(self, job: _Job, why: str) -> None:
        del self._jobs[job.key]
        fut = self._inflight.pop(job.key, None)
        if fut is not None and not fut.done():
            fut.set_exception(DeadlineExceededError(why))
        self._dropped += 1

    def _admit(self, job: _Job, now: float) -> None:
        """Queue the new text, and drop it at once if it cannot make its deadline (the work ahead
        of it, spread over the workers, and its own run would end past it) or, past the bound on
        waiting texts, the one that would be served last."""
        per_token = self._seconds_per_token
        ahead = self._running_tokens / 2 + sum(j.tokens for j in self._jobs.values() if j.deadline <= job.deadline)
        self._jobs[job.key] = job
        if now + (ahead / self._n_workers + job.tokens) * per_token > job.deadline:
            self._drop(job, "classifier backlog: it would have finished after its deadline")
            return
        excess = len(self._jobs) - self._max_waiting
        if excess > 0:
            # latest deadline first, of equal ones the newest; a caller without a deadline (an
            # offline evaluation) waits whatever the queue
            timed = [j for j in self._jobs.values() if j.deadline != math.inf]
            for victim in sorted(timed, key=lambda j: j.deadline)[max(0, len(timed) - excess) :]:
                self._drop(victim, "too many texts waiting for the classifier")

    def _next_job(self, now: float) -> _Job | None:
        """The waiting text with the earliest deadline that can still make it (the oldest of equal
        deadlines); the ones that cannot are dropped."""
        per_token = self._seconds_per_token
        late = [j for j in self._jobs.values() if now + _MARGIN * j.tokens * per_token > j.deadline]
        for job in late:
            self._drop(job, "classifier deadline: dropped before running, it would have finished too late")
        if not self._jobs:
            return None
        job = min(self._jobs.values(), key=lambda j: j.deadline)
        del self._jobs[job.key]
        return job

    async def _work(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            job = self._next_job(loop.time())
            if job is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._jobs:
                self._wake.set()  # another worker may take the next one
            await self._run(job)

    async def _run(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        self._running_tokens += job.tokens
        try:
            [result], computed = await loop.run_in_executor(
                self._executor, self._classify_one, job.text, job.pii_tokens, job.topic, job.topic_tokens, job.embed
            )
        except Exception as e:  # this text's callers get the error; the worker lives on
            fut = self._inflight.pop(job.key, None)
            if fut is not None and not fut.done():
                fut.set_exception(e)
            return
        finally:
            self._running_tokens -= job.tokens
            seconds = time.perf_counter() - started
            self._report(1, seconds)
        # The estimate is of the run alone, measured in the worker thread: with the event loop busy
        # (a burst of arrivals) the wall time also held the loop's lag, which does not add up per
        # queued text, and admission then dropped texts that would have made their deadline.
        per_token = computed / job.tokens
        self._seconds_per_token += _EWMA * (per_token - self._seconds_per_token)
        self._remember(job.key.removeprefix(_EMBED) if job.embed else job.key, result)
        fut = self._inflight.pop(job.key, None)
        if fut is not None and not fut.done():
            fut.set_result(result)

    def _classify_one(
        self, text: str, pii_tokens: int, topic: bool, topic_tokens: int, embed: bool = False
    ) -> tuple[list[Classification], float]:
        started = time.perf_counter()
        if embed:  # the sentence layer too, over the defaults its cache key (text_key(text)) stands for
            out = self._classifier.classify([text], embed=True)
        else:
            out = self._classifier.classify([text], pii_tokens=pii_tokens, topic=topic, topic_tokens=topic_tokens)
        return out, time.perf_counter() - started

    @property
    def abandoned(self) -> int:
        """Texts every caller gave up on before they were classified (dropped or finished late)."""
        return self._abandoned

    @property
    def dropped(self) -> int:
        """Texts dropped unrun because they could not have made their deadline (or too many waited)."""
        return self._dropped

    def _report(self, size: int, seconds: float) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(size, seconds)
        except Exception:  # a metrics hook must not take the scheduler down
            log.exception("on_batch callback failed")

    def _remember(self, key: bytes, result: Classification) -> None:
        if self._cache_size <= 0:
            return
        self._cache[key] = result
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def aclose(self) -> None:
        """Stop the workers; callers still waiting get ClassifierClosedError."""
        self._closed = True
        for task in self._workers:
            task.cancel()
        for task in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._workers = []
        self._jobs.clear()
        for fut in self._inflight.values():
            if not fut.done():
                fut.set_exception(ClassifierClosedError("AsyncClassifier was closed"))
        self._inflight.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
