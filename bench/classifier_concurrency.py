"""At what concurrency does the classifier start missing its deadline?

    python bench/classifier_concurrency.py [--tokens 64] [--deadline-ms 300] [--seconds 8] [--layouts 1x2,2x1]

Closed loop: C callers each classify a fresh text (never a cache hit) through AsyncClassifier,
wait at most the deadline (the sidecar's classifier.timeout_ms), and start the next one. Reported per
C: the share of classifications that missed the deadline, the median and p99 latency of those that
made it, and throughput. A layout WxT is W worker threads, each running one text at a time with T
onnxruntime threads (the sidecar's default is 1x2). Beside it, in the same run, one plain
MiniLM-L6 pass (graph only, batch 1, 2 threads) and the shipped graph, so the figure can be read
on another CPU as a ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.classifier_latency import heads_vs_plain, text_of
from extproc.classifier import AsyncClassifier, Classifier
from extproc.classifier.classifier import MODEL_DIR
from extproc.classifier.text import load_tokenizer

LEVELS = (1, 2, 4, 8, 16, 32, 48, 64, 96)


async def closed_loop(clf: AsyncClassifier, texts, concurrency: int, deadline: float, seconds: float) -> dict:
    done: list[float] = []
    missed = 0
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        nonlocal missed
        while time.perf_counter() < stop:
            text = next(texts)
            t = time.perf_counter()
            try:
                await asyncio.wait_for(clf.classify(text), deadline)
                done.append(time.perf_counter() - t)
            except TimeoutError:
                missed += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    total = len(done) + missed
    lat = np.array(done) * 1000 if done else np.array([float("nan")])
    return {
        "concurrency": concurrency,
        "missed_share": missed / total if total else float("nan"),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "per_s": len(done) / elapsed,
        "n": total,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--deadline-ms", type=float, default=300)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--layouts", default="1x2,2x1")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)))
    args = ap.parse_args(argv)
    tok = load_tokenizer(MODEL_DIR / "tokenizer.json")
    rng = random.Random(0)

    def fresh():
        i = 0
        while True:
            i += 1
            yield f"{i} " + text_of(tok, args.tokens - 2, rng)

    with tempfile.TemporaryDirectory() as work:
        _, ratio = heads_vs_plain(MODEL_DIR, 2, 100, "int8", Path(work))
    print(
        f"three heads / plain MiniLM-L6 pass (graph, 2 threads): {', '.join(f'{k} tokens {v:.2f}x' for k, v in ratio.items())}"
    )
    for layout in args.layouts.split(","):
        workers, threads = (int(v) for v in layout.split("x"))
        clf = Classifier.load(threads=threads)
        print(
            f"layout {workers} worker(s) x {threads} onnxruntime thread(s), {args.tokens}-token texts, deadline {args.deadline_ms:.0f} ms"
        )
        first_miss = None
        for c in (int(v) for v in args.levels.split(",")):

            async def run(c=c, clf=clf, workers=workers):
                ac = AsyncClassifier(clf, max_wait_ms=0, cache_size=0, workers=workers)
                try:
                    return await closed_loop(ac, fresh(), c, args.deadline_ms / 1000, args.seconds)
                finally:
                    await ac.aclose()

            r = asyncio.run(run())
            if first_miss is None and r["missed_share"] > 0.01:
                first_miss = c
            print(
                f"  C={c:3d}  missed {100 * r['missed_share']:5.1f}%  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                f"{r['per_s']:6.1f}/s  (n={r['n']})",
                flush=True,
            )
        print(f"  deadlines start being missed (>1%) at C={first_miss}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
