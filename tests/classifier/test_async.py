import asyncio
import threading

import pytest

from extproc.classifier import AsyncClassifier, Classification, Classifier, ClassifierClosedError, batching
from extproc.classifier.batching import DeadlineExceededError


class Counting(Classifier):
    """The real classifier, recording each batch it is given and failing on a marker text."""

    def __init__(self, inner: Classifier) -> None:
        vars(self).update(vars(inner))  # the same session, tokenizer and heads
        self.batches: list[list[str]] = []

    def classify(self, texts, **kwargs):
        self.batches.append(list(texts))
        if "boom" in texts:
            raise ValueError("bad input")
        return super().classify(texts, **kwargs)


@pytest.fixture
def counting(classifier: Classifier) -> Counting:
    return Counting(classifier)


def _holding_first(counting: Counting) -> threading.Event:
    """The first text classified holds its worker until the returned gate opens."""
    gate = threading.Event()
    original = counting.classify

    def gated(texts, **kwargs):
        if not counting.batches:
            counting.batches.append(list(texts))
            gate.wait(10)
            return Classifier.classify(counting, texts, **kwargs)
        return original(texts, **kwargs)

    counting.classify = gated
    return gate


def test_under_load_waiting_texts_run_earliest_deadline_first(counting: Counting):
    # Newest first starved the oldest waiting texts below saturation; with one timeout for all
    # callers, earliest deadline first is first in, first out.
    gate = _holding_first(counting)
    sizes: list[int] = []

    async def run():
        ac = AsyncClassifier(counting, on_batch=lambda n, s: sizes.append(n))
        now = asyncio.get_running_loop().time()
        first = asyncio.create_task(ac.classify("first"))
        await asyncio.sleep(0.05)
        waiting = [
            asyncio.create_task(ac.classify(t, 510, True, None if d is None else now + d))
            for t, d in (("oldest", 60), ("old", 61), ("hurried", 30), ("newest", 62), ("no deadline", None))
        ]
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, *waiting)
        await ac.aclose()

    asyncio.run(run())
    assert counting.batches == [["first"], ["hurried"], ["oldest"], ["old"], ["newest"], ["no deadline"]]
    assert sizes == [1] * 6  # every text runs alone, so no text's outputs depend on another's


def test_below_saturation_no_waiting_text_is_dropped(counting: Counting):
    gate = _holding_first(counting)

    async def run():
        ac = AsyncClassifier(counting, cache_size=0)
        deadline = asyncio.get_running_loop().time() + 30
        first = asyncio.create_task(ac.classify("first"))
        await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(ac.classify(f"text {i}", 0, True, deadline)) for i in range(20)]
        await asyncio.sleep(0.05)
        gate.set()
        out = await asyncio.gather(first, *waiting, return_exceptions=True)
        dropped = ac.dropped
        await ac.aclose()
        return out, dropped

    out, dropped = asyncio.run(run())
    assert dropped == 0 and all(isinstance(r, Classification) for r in out)
    assert counting.batches[1:] == [[f"text {i}"] for i in range(20)]


def test_a_text_that_can_no_longer_make_its_deadline_is_dropped_not_run_late(counting: Counting):
    gate = _holding_first(counting)

    async def run():
        ac = AsyncClassifier(counting)
        loop = asyncio.get_running_loop()
        first = asyncio.create_task(ac.classify("first"))
        await asyncio.sleep(0.05)
        late = asyncio.create_task(ac.classify("in a hurry", 510, True, loop.time() + 0.05))
        patient = asyncio.create_task(ac.classify("patient", 510, True, loop.time() + 30))
        await asyncio.sleep(0.2)  # the hurried caller's deadline passes while the worker is busy
        gate.set()
        done = await asyncio.gather(first, late, patient, return_exceptions=True)
        dropped = ac.dropped
        await ac.aclose()
        return done, dropped

    (first, late, patient), dropped = asyncio.run(run())
    assert isinstance(late, DeadlineExceededError) and isinstance(late, TimeoutError)
    assert isinstance(patient, Classification) and isinstance(first, Classification)
    assert ["in a hurry"] not in counting.batches and dropped == 1


def test_a_text_the_work_ahead_would_make_late_is_dropped_on_arrival(counting: Counting, monkeypatch):
    # 20 ms a token: the 510-token text waiting would take ~10 s, so a second one due 1 s after it
    # is told at once, not when its turn comes (nor at its deadline); one due in a minute waits.
    monkeypatch.setattr(batching, "_INITIAL_SECONDS_PER_TOKEN", 0.02)
    gate = _holding_first(counting)

    async def run():
        ac = AsyncClassifier(counting)
        now = asyncio.get_running_loop().time()
        first = asyncio.create_task(ac.classify("first"))
        await asyncio.sleep(0.05)
        long = asyncio.create_task(ac.classify("long " * 2000, 0, True, now + 14))
        hurried = asyncio.create_task(ac.classify("longer " * 2000, 0, True, now + 15))
        patient = asyncio.create_task(ac.classify("short", 0, True, now + 60))
        await asyncio.sleep(0.05)
        told_at_once = hurried.done()
        gate.set()
        out = await asyncio.gather(first, long, hurried, patient, return_exceptions=True)
        await ac.aclose()
        return told_at_once, out

    told_at_once, (first, long, hurried, patient) = asyncio.run(run())
    assert told_at_once and isinstance(hurried, DeadlineExceededError)
    assert all(isinstance(r, Classification) for r in (first, long, patient))
    assert ["longer " * 2000] not in counting.batches


def test_past_max_batch_waiting_texts_per_worker_the_one_served_last_is_dropped_at_once(counting: Counting):
    gate = _holding_first(counting)

    async def run():
        ac = AsyncClassifier(counting, max_batch=2)
        first = asyncio.create_task(ac.classify("first"))
        await asyncio.sleep(0.05)
        soon = asyncio.get_running_loop().time() + 30
        waiting = [asyncio.create_task(ac.classify(t, 510, True, soon)) for t in ("oldest", "second")]
        newest = asyncio.create_task(ac.classify("newest", 510, True, soon))
        await asyncio.sleep(0.05)
        shed = newest.done()  # failed as soon as it arrived, before the gate
        gate.set()
        out = await asyncio.gather(first, *waiting, newest, return_exceptions=True)
        await ac.aclose()
        return shed, out

    shed, (first, oldest, second, newest) = asyncio.run(run())
    assert shed and isinstance(newest, DeadlineExceededError)
    assert all(isinstance(r, Classification) for r in (first, oldest, second))


def test_a_slow_text_does_not_hold_another_callers_answer(counting: Counting):
    gate = threading.Event()
    original = counting.classify

    def gated(texts, **kwargs):
        if "last" in texts:
            gate.wait(10)
        return original(texts, **kwargs)

    counting.classify = gated

    async def run():
        ac = AsyncClassifier(counting, workers=2)
        last = asyncio.create_task(ac.classify("last"))
        await asyncio.sleep(0.05)  # "last" holds one worker
        first = asyncio.create_task(ac.classify("first"))
        try:
            result = await asyncio.wait_for(asyncio.shield(first), 5)  # while "last" still runs
            still_running = not last.done()
        finally:
            gate.set()
        await last
        await ac.aclose()
        return result, still_running

    result, still_running = asyncio.run(run())
    assert isinstance(result, Classification) and still_running
    assert sorted(counting.batches) == [["first"], ["last"]]


def test_repeated_text_is_a_cache_hit(counting: Counting):
    async def run():
        ac = AsyncClassifier(counting, max_wait_ms=1)
        first = await ac.classify("the same message")
        second = await ac.classify("the same message")
        await ac.aclose()
        return first, second

    first, second = asyncio.run(run())
    assert first is second
    assert counting.batches == [["the same message"]]


def test_identical_texts_in_flight_share_one_computation(counting: Counting):
    async def run():
        ac = AsyncClassifier(counting, max_wait_ms=20)
        out = await asyncio.gather(*(ac.classify("dup") for _ in range(5)))
        await ac.aclose()
        return out

    out = asyncio.run(run())
    assert all(o is out[0] for o in out)
    assert sum(len(b) for b in counting.batches) == 1


def test_lru_evicts_the_least_recently_used(counting: Counting):
    async def run():
        ac = AsyncClassifier(counting, max_wait_ms=0, cache_size=2)
        for t in ("a", "b", "a", "c", "a", "b"):
            await ac.classify(t)
        await ac.aclose()

    asyncio.run(run())
    # "b" was evicted by "c" ("a" had been used more recently), so it is computed twice.
    assert [t for b in counting.batches for t in b] == ["a", "b", "c", "b"]


def test_an_error_reaches_only_its_own_callers_and_the_worker_survives(counting: Counting):
    async def run():
        ac = AsyncClassifier(counting, max_batch=4, max_wait_ms=20)
        bad, fine = await asyncio.gather(ac.classify("boom"), ac.classify("fine"), return_exceptions=True)
        after = await ac.classify("still working")
        again = await asyncio.gather(ac.classify("boom"), return_exceptions=True)  # failures are not cached
        await ac.aclose()
        return bad, fine, after, again

    bad, fine, after, again = asyncio.run(run())
    assert isinstance(bad, ValueError) and isinstance(again[0], ValueError)
    assert isinstance(fine, Classification) and isinstance(after, Classification)
    assert counting.batches.count(["boom"]) == 2


def test_closed_classifier_refuses_new_work(counting: Counting):
    async def run():
        ac = AsyncClassifier(counting)
        await ac.classify("x")
        await ac.aclose()
        with pytest.raises(ClassifierClosedError):
            await ac.classify("y")

    asyncio.run(run())


def test_cancelled_caller_does_not_cancel_the_shared_result(counting: Counting):
    async def run():
        ac = AsyncClassifier(counting, max_wait_ms=30)
        impatient = asyncio.ensure_future(ac.classify("shared text"))
        patient = asyncio.ensure_future(ac.classify("shared text"))
        await asyncio.sleep(0)
        impatient.cancel()
        result = await patient
        await ac.aclose()
        return impatient, result

    impatient, result = asyncio.run(run())
    assert impatient.cancelled()
    assert isinstance(result, Classification)


def test_work_every_caller_gave_up_on_is_dropped(counting: Counting):
    """Under overload, texts whose callers timed out are not classified ahead of live ones."""
    gate = threading.Event()
    original = counting.classify

    def gated(texts, **kwargs):
        if not counting.batches:  # the first batch holds the worker until the gate opens
            counting.batches.append([])
            gate.wait(10)
            counting.batches.pop()
        return original(texts, **kwargs)

    counting.classify = gated

    async def run():
        ac = AsyncClassifier(counting, max_batch=1, max_wait_ms=0)
        first = asyncio.create_task(ac.classify("first"))
        await asyncio.sleep(0.05)
        for i in range(5):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ac.classify(f"given up {i}"), 0.01)
        shared = asyncio.create_task(ac.classify("still wanted"))
        with pytest.raises(TimeoutError):  # one of its two callers gives up; the other still waits
            await asyncio.wait_for(asyncio.shield(ac.classify("still wanted")), 0.01)
        gate.set()
        await first
        result = await shared
        await ac.aclose()
        return ac.abandoned, result

    abandoned, result = asyncio.run(run())
    assert isinstance(result, Classification)
    assert counting.batches == [["first"], ["still wanted"]]
    assert abandoned == 5


def test_embed_is_cached_with_the_classification(classifier: Classifier):
    async def run():
        clf = AsyncClassifier(classifier)
        try:
            c = await clf.classify("what's a good name for a cat")
            e = await clf.embed("what's a good name for a cat")
            again = await clf.classify("what's a good name for a cat")
            return c, e, again, await clf.embed("what's a good name for a cat")
        finally:
            await clf.aclose()

    c, e, again, e2 = asyncio.run(run())
    assert e.shape == (384,)
    assert again == c and again.sentence_embedding is e  # the cache now holds both
    assert e2 is e


def test_embed_waits_its_turn_earliest_deadline_first(counting: Counting):
    # embed() once went straight to the worker threads: a semantic cache's question ran ahead of
    # every waiting text whatever their deadlines, and admission never saw it.
    gate = _holding_first(counting)

    async def run():
        ac = AsyncClassifier(counting)
        now = asyncio.get_running_loop().time()
        first = asyncio.create_task(ac.classify("first"))
        await asyncio.sleep(0.05)
        late = asyncio.create_task(ac.embed("a cached question", now + 60))
        hurried = asyncio.create_task(ac.classify("hurried", 510, True, now + 30))
        await asyncio.sleep(0.05)
        assert counting.batches == [["first"]]  # the embedding waits in the queue, not in a thread
        gate.set()
        await asyncio.gather(first, late, hurried)
        hopeless = asyncio.create_task(ac.embed("too late", asyncio.get_running_loop().time() - 1))
        with pytest.raises(DeadlineExceededError):
            await hopeless
        again = await ac.embed("a cached question")
        await ac.aclose()
        return late.result(), again

    vector, again = asyncio.run(run())
    assert counting.batches == [["first"], ["hurried"], ["a cached question"]]
    assert vector.shape == (384,) and again is vector  # cached, as with classify()


def test_two_workers_answer_every_caller_with_the_same_results(counting: Counting):
    texts = [f"question number {i} about chemistry" for i in range(10)]

    async def run(workers):
        ac = AsyncClassifier(counting, max_batch=8, max_wait_ms=0, cache_size=0, workers=workers)
        try:
            return await asyncio.gather(*(ac.classify(t) for t in texts))
        finally:
            await ac.aclose()

    assert asyncio.run(run(2)) == asyncio.run(run(1))  # texts still run alone: outputs do not move
    assert all(len(b) == 1 for b in counting.batches)
