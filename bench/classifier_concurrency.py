"""At what concurrency does the classifier start missing its deadline, and how does that compare
with what a plain MiniLM-L6 pass could sustain on the same machine at the same moment?

    python bench/classifier_concurrency.py [--tokens 64] [--deadline-ms 300] [--seconds 8]
        [--layouts 1x2,2x1] [--levels 8,16,...] [--topic-tokens 510] [--tagger off|on]
        [--record out.json]

Closed loop: C callers each classify a fresh text (never a cache hit) through AsyncClassifier with
the sidecar's deadline (classifier.timeout_ms) as the signal asks it (signals/classifier.py), and
start the next one when it is answered; a caller whose text was dropped or late waits out its
deadline first (the request it stands for goes on without the classifier; its client sends the next
one no sooner for that). With `--retry-at-once` it does not, as this benchmark did before: each drop
then becomes a new text at once, and past saturation the callers churned thousands of texts a
second through the scheduler, which measured that churn more than the classifier. A layout WxT is W worker threads, each running
one text at a time with T onnxruntime threads (the sidecar's default is 1x2).

Reported per level C: the share of classifications that missed the deadline (dropped or late),
classified texts per second, p50 / p99 latency of those that made it, and the load average.

**Baseline in the same run.** Machines are shared and noisy, so every level is preceded and
followed by a burst of plain MiniLM-L6 passes (all six layers, mean pooling, quantized like the shipped graph,
batch 1) over the same kind of text, with the same layout, as fast as they go: `plain/s`. The
figures that survive machine load are ratios to it:

- `classified/s ÷ plain/s`: the classifier's throughput in plain passes (≤ ~1.15 when it is all
  graph: our trunk is ~0.86 of a plain pass; less is Python and scheduling overhead);
- `plain capacity C` = plain/s x deadline: the concurrency at which a plain pass alone would
  start missing the deadline. "Deadlines start being missed at C*" is quoted beside it as
  `C* ÷ plain capacity C`.

Beside it, once per run: one shipped-graph pass ÷ one plain pass at 32 / 128 / 512 tokens
(interleaved, bench/classifier_latency.py), the model card's plain-pass ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.classifier_latency import heads_vs_plain, plain_model, session, text_of
from extproc.classifier import AsyncClassifier, Classifier
from extproc.classifier.classifier import MODEL_DIR
from extproc.classifier.text import WINDOW, encode, load_tokenizer, with_specials

LEVELS = (8, 16, 24, 32, 48, 64, 96)
MISSED = 0.01  # a level "misses deadlines" past this share


async def closed_loop(
    clf: AsyncClassifier,
    texts,
    concurrency: int,
    deadline: float,
    seconds: float,
    pii_tokens: int,
    topic_tokens: int = WINDOW,
    hold_missed: bool = True,
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
                await asyncio.wait_for(
                    clf.classify(text, pii_tokens, True, loop.time() + deadline, topic_tokens), deadline
                )
                done.append(time.perf_counter() - t)
            except TimeoutError:  # missed, or dropped for its deadline (DeadlineExceededError)
                missed += 1
                # the request goes on without the classifier: no new one sooner; and with
                # --retry-at-once a text dropped on arrival must still let the loop run
                await asyncio.sleep(max(0.0, t + deadline - time.perf_counter()) if hold_missed else 0)

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


def plain_per_s(plain, feeds: list[dict], workers: int, seconds: float) -> float:
    """Plain MiniLM-L6 passes per second, `workers` threads each running one pass at a time on
    the shared session (as AsyncClassifier's workers do), for `seconds`."""
    counts = [0] * workers
    stop = time.perf_counter() + seconds

    def work(w: int) -> None:
        i = w
        while time.perf_counter() < stop:
            plain.run(None, feeds[i % len(feeds)])
            counts[w] += 1
            i += workers

    threads = [threading.Thread(target=work, args=(w,)) for w in range(workers)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - started)


class Sleeping:
    """A stand-in encoder that takes `ms` per text and uses no CPU (--simulate-ms): the scheduler's
    own figures, free of the machine's noise."""

    def __init__(self, ms: float, real: Classifier) -> None:
        self.seconds = ms / 1000
        self.answer = real.classify(["a fixed text"], pii_tokens=0)

    def classify(self, texts, **kwargs):
        time.sleep(self.seconds * len(texts))
        return self.answer * len(texts)


def first_miss(rows: list[dict]) -> int | None:
    """The lowest level that missed more than MISSED of its deadlines (None: none did)."""
    return next((r["concurrency"] for r in rows if r["missed_share"] > MISSED), None)


def load_average() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64, help="tokens per text, [CLS] and [SEP] included")
    ap.add_argument("--deadline-ms", type=float, default=300)
    ap.add_argument("--seconds", type=float, default=8, help="per level")
    ap.add_argument(
        "--baseline-seconds", type=float, default=2, help="plain passes around each level (half before, half after)"
    )
    ap.add_argument("--layouts", default="1x2,2x1")
    ap.add_argument("--record", type=Path, help="write the figures as JSON (the model card's concurrency row)")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)))
    ap.add_argument(
        "--topic-tokens",
        type=int,
        default=WINDOW,
        help="tokens domain and complexity read per text (policy classifier.topic_tokens)",
    )
    ap.add_argument(
        "--retry-at-once",
        action="store_true",
        help="a caller whose text was dropped sends the next one at once (before issue 16's fifth item: "
        "drops then feed back into ever more load, which no client does); default: it waits out its deadline",
    )
    ap.add_argument(
        "--simulate-ms",
        type=float,
        help="replace the encoder by a sleep of this many ms per text: the scheduler alone, no noise",
    )
    ap.add_argument("--no-ratio", action="store_true", help="skip the per-length graph ratio (saves ~1 min)")
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

    # Made once: tokenizing a new text per call on the event loop cost the callers' loop more than
    # the sidecar's own work (at 500 drops/s it took the GIL from the worker). A counter in front
    # makes each text new to the cache; it adds one token, so texts are `--tokens` long.
    pool = [text_of(tok, args.tokens - 1, rng) for _ in range(256)]

    def fresh():
        i = 0
        while True:
            i += 1
            yield f"{i} {pool[i % len(pool)]}"

    sample = [f"{i} {t}" for i, t in enumerate(pool[:32])]
    feeds = []
    for e in encode(tok, sample):
        ids = with_specials(e.ids)[None, :]
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    print(
        f"CPU: {cpu_name()}; load average {' / '.join(f'{v:.1f}' for v in os.getloadavg())} (1 / 5 / 15 min); "
        f"{args.tokens}-token texts (plain pass reads {feeds[0]['input_ids'].shape[1]}), deadline "
        f"{args.deadline_ms:.0f} ms, tagger {args.tagger}, topic budget {args.topic_tokens} tokens",
        flush=True,
    )
    raw: dict = {}
    with tempfile.TemporaryDirectory() as work:
        plain_path = plain_model("int8", Path(work))
        if not args.no_ratio:
            raw, ratio = heads_vs_plain(MODEL_DIR, 2, 100, "int8", Path(work))
            print(
                "one pass, shipped graph / plain MiniLM-L6 (2 threads, interleaved): three heads "
                + ", ".join(f"{k} tokens {v:.2f}x" for k, v in ratio.items())
                + "; domain + complexity only "
                + ", ".join(f"{k} tokens {v['topic_ratio']:.2f}x" for k, v in raw.items()),
                flush=True,
            )
        plains = {}
        pii_tokens = WINDOW if args.tagger == "on" else 0
        recorded: dict[str, dict] = {}
        for layout in args.layouts.split(","):
            workers, threads = (int(v) for v in layout.split("x"))
            clf = Classifier.load(threads=threads)
            if args.simulate_ms:
                clf = Sleeping(args.simulate_ms, clf)  # type: ignore[assignment]
            plain = plains.setdefault(threads, session(plain_path, threads))
            plain_per_s(plain, feeds, workers, 0.5)  # warm up
            print(f"layout {workers} worker(s) x {threads} onnxruntime thread(s)", flush=True)
            print(
                f"  {'C':>4} {'missed':>7} {'classified/s':>12} {'plain/s':>8} {'ratio':>6} {'p50 ms':>8} "
                f"{'p99 ms':>8} {'load':>5} {'n':>6}"
            )
            rows = []
            for c in (int(v) for v in args.levels.split(",")):
                before = plain_per_s(plain, feeds, workers, args.baseline_seconds / 2)

                async def run(c=c, clf=clf, workers=workers):
                    ac = AsyncClassifier(clf, cache_size=0, workers=workers)
                    try:
                        return await closed_loop(
                            ac,
                            fresh(),
                            c,
                            args.deadline_ms / 1000,
                            args.seconds,
                            pii_tokens,
                            args.topic_tokens,
                            not args.retry_at_once,
                        )
                    finally:
                        await ac.aclose()

                r = asyncio.run(run())
                base = (before + plain_per_s(plain, feeds, workers, args.baseline_seconds / 2)) / 2
                r.update(plain_per_s=base, ratio=r["per_s"] / base if base else float("nan"), load=load_average())
                rows.append(r)
                print(
                    f"  {c:4d} {100 * r['missed_share']:6.1f}% {r['per_s']:12.1f} {base:8.1f} {r['ratio']:6.2f} "
                    f"{r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['load']:5.1f} {r['n']:6d}",
                    flush=True,
                )
            miss = first_miss(rows)
            plain_capacity = float(np.median([r["plain_per_s"] for r in rows])) * args.deadline_ms / 1000
            saturated = [r["ratio"] for r in rows if r["missed_share"] > MISSED]
            print(
                f"  deadlines start being missed (>{100 * MISSED:.0f}%) at C={miss}; a plain pass alone would "
                f"sustain C={plain_capacity:.0f} (plain/s x deadline)"
                + (f": C* / plain capacity {miss / plain_capacity:.2f}" if miss else "")
                + (f"; classified/s / plain/s past saturation {np.median(saturated):.2f}" if saturated else ""),
                flush=True,
            )
            recorded[layout] = {
                "first_miss": miss,
                "plain_capacity_c": plain_capacity,
                "peak_per_s": max(r["per_s"] for r in rows),
                "rows": rows,
            }
    if args.record:
        args.record.write_text(
            json.dumps(
                {
                    "tokens": args.tokens,
                    "deadline_ms": args.deadline_ms,
                    "tagger": args.tagger,
                    "topic_tokens": args.topic_tokens,
                    "graph_vs_plain": raw,
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
