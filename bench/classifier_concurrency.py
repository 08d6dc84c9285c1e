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
import json
import os
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


async def closed_loop(
    clf: AsyncClassifier, texts, concurrency: int, deadline: float, seconds: float, pii_tokens: int
) -> dict:
    done: list[float] = []
    missed = 0
    stop = time.perf_counter() + seconds
    loop = asyncio.get_running_loop()

    async def caller() -> None:
        nonlocal missed
        while time.perf_counter() < stop:
            text = next(texts)
            t = time.perf_counter()
            try:
                # as the sidecar asks (signals/classifier.py): with the caller's deadline, so a text
                # that cannot make it is dropped at once instead of run late
                await asyncio.wait_for(clf.classify(text, pii_tokens, True, loop.time() + deadline), deadline)
                done.append(time.perf_counter() - t)
            except TimeoutError:  # missed, or dropped for its deadline (DeadlineExceededError)
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
    ap.add_argument("--record", type=Path, help="write the figures as JSON (the model card's concurrency row)")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)))
    ap.add_argument(
        "--tagger",
        choices=("off", "on"),
        default="off",
        help="off: domain and complexity only, as the bundled policy asks for a text without a structured "
        "value; on: the PII tagger reads every text too (a policy asking for names or addresses)",
    )
    args = ap.parse_args(argv)
    tok = load_tokenizer(MODEL_DIR / "tokenizer.json")
    rng = random.Random(0)

    def fresh():
        i = 0
        while True:
            i += 1
            yield f"{i} " + text_of(tok, args.tokens - 2, rng)

    with tempfile.TemporaryDirectory() as work:
        raw, ratio = heads_vs_plain(MODEL_DIR, 2, 100, "int8", Path(work))
    print(
        f"three heads / plain MiniLM-L6 pass (graph, 2 threads): {', '.join(f'{k} tokens {v:.2f}x' for k, v in ratio.items())}"
    )
    print(
        "domain + complexity only / plain pass: "
        + ", ".join(f"{k} tokens {v['topic_ratio']:.2f}x" for k, v in raw.items())
    )
    pii_tokens = 510 if args.tagger == "on" else 0
    recorded: dict[str, dict] = {}
    for layout in args.layouts.split(","):
        workers, threads = (int(v) for v in layout.split("x"))
        clf = Classifier.load(threads=threads)
        print(
            f"layout {workers} worker(s) x {threads} onnxruntime thread(s), {args.tokens}-token texts, "
            f"deadline {args.deadline_ms:.0f} ms, tagger {args.tagger}"
        )
        first_miss = None
        rows = []
        for c in (int(v) for v in args.levels.split(",")):

            async def run(c=c, clf=clf, workers=workers):
                ac = AsyncClassifier(clf, cache_size=0, workers=workers)
                try:
                    return await closed_loop(ac, fresh(), c, args.deadline_ms / 1000, args.seconds, pii_tokens)
                finally:
                    await ac.aclose()

            r = asyncio.run(run())
            rows.append(r)
            if first_miss is None and r["missed_share"] > 0.01:
                first_miss = c
            print(
                f"  C={c:3d}  missed {100 * r['missed_share']:5.1f}%  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                f"{r['per_s']:6.1f}/s  (n={r['n']})",
                flush=True,
            )
        print(f"  deadlines start being missed (>1%) at C={first_miss}")
        recorded[layout] = {
            "first_miss": first_miss,
            "peak_per_s": max(r["per_s"] for r in rows),
            "per_s_at_max": rows[-1]["per_s"],
            "max_c": rows[-1]["concurrency"],
            "rows": rows,
        }
    if args.record:
        args.record.write_text(
            json.dumps(
                {
                    "tokens": args.tokens,
                    "deadline_ms": args.deadline_ms,
                    "tagger": args.tagger,
                    "ratio": ratio["128"],
                    "cpu": cpu_name(),
                    "layouts": recorded,
                },
                indent=1,
            )
        )
    return 0


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"unknown CPU, {os.cpu_count()} cores"


if __name__ == "__main__":
    raise SystemExit(main())
