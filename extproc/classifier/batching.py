"""AsyncClassifier: micro-batching and a per-text LRU cache in front of a Classifier.

Callers classify each message of a conversation separately, so a new turn costs only its new
message: earlier messages are cache hits, and identical texts in flight share one computation.
Inference runs in one worker thread, never on the event loop.

Concurrent texts are collected into a batch (at most `max_batch`, waiting at most `max_wait_ms`
for it to fill), and the batch's texts are then classified one at a time, each caller answered
as soon as its own text is done. Padding texts into one onnxruntime run bought little throughput
on the CPU measured (at most ~8%, model card "Run time") and made each text's int8 outputs depend
on its batch-mates; run one by one, the first caller of a batch of eight waits for one text, not
eight.
A text whose every caller has gone (timed out, cancelled) before its turn is dropped, so an
overload sheds the work nobody waits for instead of running it ahead of the requests that still do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import numpy as np

from extproc.classifier.classifier import Classification, Classifier
from extproc.classifier.text import DEFAULT_PII_TOKENS, WINDOW

log = logging.getLogger(__name__)


class ClassifierClosedError(RuntimeError):
    """classify() was called on, or was pending in, an AsyncClassifier that has been closed."""


def text_key(text: str, pii_tokens: int = DEFAULT_PII_TOKENS, topic: bool = True) -> bytes:
    """Cache key: a 16-byte digest (so the cache never holds prompt text) and what was asked."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    if len(text) <= 2 * WINDOW:  # read once for everything, whatever was asked (classifier.py)
        pii_tokens, topic = max(pii_tokens, WINDOW), True
    return digest + pii_tokens.to_bytes(4, "big") + bytes([topic])


class AsyncClassifier:
    def __init__(
        self,
        classifier: Classifier,
        *,
        max_batch: int = 16,
        max_wait_ms: float = 2.0,
        cache_size: int = 4096,
        on_batch: Callable[[int, float], None] | None = None,
        workers: int = 1,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._classifier = classifier
        self._max_batch = max_batch
        self._max_wait = max_wait_ms / 1000.0
        self._cache_size = cache_size
        self._on_batch = on_batch
        self._cache: OrderedDict[bytes, Classification] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[Classification]] = {}
        self._waiting: dict[bytes, int] = {}  # callers still awaiting each in-flight key
        self._queue: asyncio.Queue[tuple[bytes, str, int, bool]] | None = None
        self._worker: asyncio.Task[None] | None = None
        # workers > 1 runs that many texts at once (one onnxruntime session is safe to share): on
        # two cores, two texts with one onnxruntime thread each beat one text with two threads
        # (bench/classifier_concurrency.py)
        self._workers = workers
        self._slots = asyncio.Semaphore(workers)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="classifier")
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False
        self._abandoned = 0  # texts given up by every caller before their result
        self._last_key: tuple[str, int, bool, bytes] | None = None

    def cached(self, text: str, pii_tokens: int = DEFAULT_PII_TOKENS, topic: bool = True) -> bool:
        """The result for `text` is at hand (cached or being computed): asking costs no encoder time."""
        key = self._key(text, pii_tokens, topic)
        return key in self._cache or key in self._inflight

    def _key(self, text: str, pii_tokens: int, topic: bool) -> bytes:
        """text_key, remembered for the last text asked about: cached() and classify() ask about
        the same one in turn, and digesting a megabyte prompt twice on the event loop costs."""
        last = self._last_key
        if last is not None and last[0] is text and last[1] == pii_tokens and last[2] == topic:
            return last[3]
        key = text_key(text, pii_tokens, topic)
        self._last_key = (text, pii_tokens, topic, key)
        return key

    async def classify(self, text: str, pii_tokens: int = DEFAULT_PII_TOKENS, topic: bool = True) -> Classification:
        """Domain, complexity and PII of one text; the tagger reads its first `pii_tokens` tokens
        (0: none), and `topic=False` may skip domain and complexity (Classifier.classify)."""
        if self._closed:
            raise ClassifierClosedError("AsyncClassifier is closed")
        key = self._key(text, pii_tokens, topic)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._inflight[key] = pending
            self._ensure_worker()
            assert self._queue is not None
            self._queue.put_nowait((key, text, pii_tokens, topic))
        self._waiting[key] = self._waiting.get(key, 0) + 1
        try:
            # shield: one caller being cancelled must not cancel the shared result for the others
            return await asyncio.shield(pending)
        finally:
            self._leave(key, pending)

    async def embed(self, text: str) -> np.ndarray:
        """The text's [384] unit-length sentence embedding (for a semantic cache), cached with its
        classification: a text already embedded costs nothing; one only classified runs again with
        the sentence layer (a classification plus ~18% of a plain pass), off the event loop."""
        if self._closed:
            raise ClassifierClosedError("AsyncClassifier is closed")
        key = text_key(text)
        hit = self._cache.get(key)
        if hit is not None and hit.sentence_embedding is not None:
            self._cache.move_to_end(key)
            return hit.sentence_embedding
        loop = asyncio.get_running_loop()
        [result] = await loop.run_in_executor(self._executor, partial(self._classifier.classify, [text], embed=True))
        self._remember(key, result)
        assert result.sentence_embedding is not None
        return result.sentence_embedding

    def _leave(self, key: bytes, pending: asyncio.Future[Classification]) -> None:
        left = self._waiting[key] - 1
        if left:
            self._waiting[key] = left
            return
        del self._waiting[key]
        if not pending.done() and self._inflight.get(key) is pending:
            # Nobody waits for it any more: the batcher skips it unless its batch already started.
            del self._inflight[key]
            pending.cancel()
            self._abandoned += 1

    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="classifier-batcher")

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self._max_wait
            while len(batch) < self._max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), timeout))
                except TimeoutError:
                    break
            while len(batch) < self._max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            batch = [item for item in batch if item[0] in self._inflight]
            if batch and self._workers == 1:
                await self._infer(batch)
                continue
            for item in batch:
                await self._slots.acquire()
                if item[0] not in self._inflight:  # given up on while a slot was awaited
                    self._slots.release()
                    continue
                task = loop.create_task(self._infer([item]))
                self._running.add(task)
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._slots.release()

    async def _infer(self, batch: list[tuple[bytes, str, int, bool]]) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        done = 0
        try:
            for key, text, pii_tokens, topic in batch:
                if key not in self._inflight:
                    continue  # every caller gave up while earlier texts of the batch ran
                done += 1
                try:
                    [result] = await loop.run_in_executor(self._executor, self._classify_one, text, pii_tokens, topic)
                except Exception as e:  # this text's callers get the error; the worker lives on
                    fut = self._inflight.pop(key, None)
                    if fut is not None and not fut.done():
                        fut.set_exception(e)
                    continue
                self._remember(key, result)
                fut = self._inflight.pop(key, None)
                if fut is not None and not fut.done():
                    fut.set_result(result)
        finally:
            if done:
                self._report(done, time.perf_counter() - started)

    def _classify_one(self, text: str, pii_tokens: int, topic: bool) -> list[Classification]:
        return self._classifier.classify([text], pii_tokens=pii_tokens, topic=topic)

    @property
    def abandoned(self) -> int:
        """Texts every caller gave up on before they were classified (dropped or finished late)."""
        return self._abandoned

    def _report(self, size: int, seconds: float) -> None:
        if self._on_batch is None:
            return
        try:
            self._on_batch(size, seconds)
        except Exception:  # a metrics hook must not take the batcher down
            log.exception("on_batch callback failed")

    def _remember(self, key: bytes, result: Classification) -> None:
        if self._cache_size <= 0:
            return
        self._cache[key] = result
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    async def aclose(self) -> None:
        """Stop the batcher; callers still waiting get ClassifierClosedError."""
        self._closed = True
        for task in list(self._running):
            task.cancel()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for fut in self._inflight.values():
            if not fut.done():
                fut.set_exception(ClassifierClosedError("AsyncClassifier was closed"))
        self._inflight.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
