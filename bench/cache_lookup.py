"""What the semantic cache costs: lookup latency at 10k and 100k entries, and what a miss adds to
the router's time per request against the same policy without the cache, in the same run.

1. Lookup: the in-process index (one matrix-vector product over the entries of the scope, plus the
   look-alike check of the candidates above the threshold), with every entry in one scope (the
   worst case: one system prompt, one model, no tenant) and spread over 100 scopes; and the Redis
   backend (the same local search plus one GET for the answer on a hit) against a real redis-server.
2. Miss: Router.route() for unique questions (no classifier LRU help), alternating a policy whose
   decision opts in to the cache with the same policy without it; once with rules only (the cache
   adds the encoder pass and the PII check), once with a domain condition (the encoder runs anyway;
   the cache adds the sentence layer's second pass).

    python bench/cache_lookup.py [--runs 2000] [--redis-server redis-server]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# As extproc/__init__.py does for the sidecar, before numpy loads: one OpenBLAS thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import orjson

from bench.common import cpu_model, free_port
from extproc.cache import SemanticCache
from extproc.cache.answers import Answer
from extproc.cache.store import MemoryStore, RedisStore
from extproc.classifier import AsyncClassifier, Classifier
from extproc.classifier.normalize import warm
from extproc.metrics import Metrics
from extproc.policy.load import parse_policy
from extproc.replicas.pool import Discovery, Pools
from extproc.router import Call, Router, RouterState
from extproc.signals.classifier import ClassifierSignal

ANSWER = Answer("chat.completions", "m", "an answer " * 20, "stop", 20, 40)


def cpu_detail() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    family = next((line.split(":")[1].strip() for line in info.splitlines() if line.startswith("cpu family")), "?")
    flags = next((line.split(":")[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags]
    return f"family {family}, {' '.join(isa)}, {os.cpu_count()} cores"


def summary(seconds: list[float]) -> str:
    ms = np.array(seconds) * 1000
    return f"median {np.median(ms):.3f} ms, p99 {np.percentile(ms, 99):.3f} ms (n={len(ms)})"


def unit_vectors(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


async def fill(store, n: int, scopes: int) -> np.ndarray:
    vectors = unit_vectors(n, 1)
    if isinstance(store, RedisStore):  # as RedisStore.put writes, a thousand per round trip
        expires = time.time() + 3600
        for start in range(0, n, 1000):
            async with store.redis.pipeline(transaction=False) as pipe:
                for i in range(start, min(n, start + 1000)):
                    pipe.set(f"{store.prefix}a:m:e{i}", ANSWER.dumps(), px=3_600_000)
                    fields = {
                        "op": "add",
                        "id": f"e{i}",
                        "scope": b"scope%d" % (i % scopes),
                        "model": "m",
                        "vec": vectors[i].tobytes(),
                        "words": np.asarray([i], np.uint64).tobytes(),
                        "exp": repr(expires),
                    }
                    pipe.xadd(store.prefix + "log", fields, maxlen=2 * n, approximate=True)
                    store.index.add(f"e{i}", b"scope%d" % (i % scopes), "m", vectors[i], expires, (i,))
                await pipe.execute()
        return vectors
    for i in range(n):
        await store.put(f"e{i}", b"scope%d" % (i % scopes), "m", vectors[i], (i,), ANSWER, 3600)
    return vectors


async def lookups(store, vectors: np.ndarray, scopes: int, runs: int, hit: bool) -> list[float]:
    queries = unit_vectors(runs, 2)
    times = []
    for i in range(runs):
        j = i % len(vectors)
        q = vectors[j] if hit else queries[i]
        t = time.perf_counter()
        await store.get(b"scope%d" % (j % scopes), q, 0.92, (j,))
        times.append(time.perf_counter() - t)
    return times


async def bench_lookups(runs: int, redis_url: str | None) -> None:
    print("\n1. Lookup latency (store.get: search + look-alike check; Redis: + GET on a hit)")
    for n in (10_000, 100_000):
        for scopes in (1, 100):
            store = MemoryStore(n)
            vectors = await fill(store, n, scopes)
            miss = await lookups(store, vectors, scopes, runs, hit=False)
            hit = await lookups(store, vectors, scopes, runs, hit=True)
            print(f"  memory {n:>7,} entries, {scopes:>3} scope(s): miss {summary(miss)}; hit {summary(hit)}")
        if redis_url is None:
            continue
        import redis.asyncio as redis

        client = redis.from_url(redis_url)
        await client.flushdb()
        store = RedisStore(client, "bench:", n)
        t = time.perf_counter()
        vectors = await fill(store, n, 1)
        filled = time.perf_counter() - t
        miss = await lookups(store, vectors, 1, runs, hit=False)
        hit = await lookups(store, vectors, 1, runs, hit=True)
        print(f"  redis  {n:>7,} entries,   1 scope(s): miss {summary(miss)}; hit {summary(hit)}")
        # A sidecar that starts later replays the stream into its own index.
        follower = RedisStore(redis.from_url(redis_url), "bench:", n, follower=redis.from_url(redis_url))
        t = time.perf_counter()
        await follower.start()
        while len(follower.index) < n:
            await asyncio.sleep(0.01)
        replayed = time.perf_counter() - t
        print(f"         stored {n:,} in {filled:.1f} s (pipelined); a new sidecar replayed them in {replayed:.1f} s")
        await follower.close()
        await store.close()


POLICY = """
version: 1
default_model: small
models:
  small: {replicas: {static: ["10.0.0.1:8000"], envoy: original_dst}}
  large: {replicas: {static: ["10.0.0.2:8000"], envoy: original_dst}}
decisions:
  - name: code
    when: %s
    model: large
    %s
  - name: faq
    model: small
    %s
"""
RULES = '{keyword: ["segfault"]}'
DOMAIN = "{domain: [computer science]}"


def router(when: str, cache: bool, classifier: ClassifierSignal, metrics: Metrics) -> Router:
    opt = "cache: true" if cache else ""
    policy = parse_policy(POLICY % (when, opt, opt))
    r = Router(RouterState(policy, Pools.build(policy, Discovery())), classifier=classifier, metrics=metrics)
    if cache:
        r.cache = SemanticCache(policy.cache, metrics)
    return r


async def bench_miss(runs: int) -> None:
    print("\n2. Router time per request, a cache miss against no cache (same run, alternating)")
    model = await asyncio.to_thread(Classifier.load, None, threads=2)
    warm()
    metrics = Metrics()
    signal = ClassifierSignal(AsyncClassifier(model, max_wait_ms=0), 1.0)
    for label, when in (("rules only", RULES), ("domain condition", DOMAIN)):
        with_cache, without = router(when, True, signal, metrics), router(when, False, signal, metrics)
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(runs):
            for cached, r in ((True, with_cache), (False, without)):
                # A new question every time, about 32 tokens, so neither the classifier's cache
                # nor the semantic cache helps.
                text = f"Question {i} {cached} {label}: how would you explain the difference between a process and a thread to a new engineer?"
                body = orjson.dumps(
                    {"model": "auto", "messages": [{"role": "user", "content": text}], "temperature": 0}
                )
                call = Call("POST", "/v1/chat/completions", {"content-type": "application/json"}, body)
                t = time.perf_counter()
                routed = await r.route(call)
                times[cached].append(time.perf_counter() - t)
                if routed.lease is not None:
                    r.tracker.release(routed.lease)
        added = statistics.median(times[True]) - statistics.median(times[False])
        print(f"  {label:16}: no cache {summary(times[False])}")
        print(f"  {'':16}  miss     {summary(times[True])}  (median +{added * 1000:.3f} ms)")


def start_redis(path: str | None) -> tuple[subprocess.Popen | None, str | None]:
    binary = shutil.which(path or "redis-server")
    if binary is None:
        print("(no redis-server: the Redis rows are skipped)")
        return None, None
    port = free_port()
    workdir = tempfile.mkdtemp()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", workdir],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    return process, f"redis://127.0.0.1:{port}/0"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--miss-runs", type=int, default=1000)
    parser.add_argument("--redis-server", default=None)
    parser.add_argument("--skip-lookups", action="store_true", help="only section 2")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()} ({cpu_detail()}); machine shared and noisy: compare rows of the same run")
    if not args.skip_lookups:
        process, url = start_redis(args.redis_server)
        try:
            await bench_lookups(args.runs, url)
        finally:
            if process is not None:
                process.terminate()
                process.wait(10)
    await bench_miss(args.miss_runs)


if __name__ == "__main__":
    asyncio.run(main())
