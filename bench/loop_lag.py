"""How long one hostile request holds the sidecar's event loop: route it in-process (the shipped
encoder, a bundled-style policy, 300 ms classifier deadline) while a task ticks every millisecond,
and print the longest gap between ticks. Every other request's work waits at least that long.

    python bench/loop_lag.py [--timeout-ms 300] [--only "20,000 SSN parts"]

With a long classifier deadline (``--timeout-ms 60000``, as offline evaluation or a patient
policy has) every step runs to its end, so the figures show the work itself, not the deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import cpu_model
from extproc.classifier import AsyncClassifier, Classifier
from extproc.classifier.normalize import warm
from extproc.policy.load import parse_policy
from extproc.replicas.pool import Discovery, Pools
from extproc.router import Call, Router, RouterState
from extproc.signals.classifier import ClassifierSignal
from tests.adversarial.test_large_and_long import POLICY, many_messages, sized_body

pol = parse_policy(POLICY.replace("$s1", "127.0.0.1:1").replace("$l1", "127.0.0.1:2").replace("$p1", "127.0.0.1:3"))


def chat(t):
    return orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": t}]})


CASES = {
    "60k word": chat("a" * 60000),
    "1M word": chat("a" * 1_000_000),
    "4 MiB prose": sized_body(4 * 1024 * 1024),
    "1.3M full-width digits": chat("\uff17" * 1_300_000),
    "1M '1 '": chat("1 " * 500_000),
    "100k messages": many_messages(100_000),
    "1M zero-width+digit": chat("7\u200b" * 600_000),
    "20,000 SSN parts": orjson.dumps(
        {
            "model": "auto",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "078-05-1120 "}] * 20_000}],
        }
    ),
}


async def _ticks(gaps: list[float], stop: asyncio.Event) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        await asyncio.sleep(0.001)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout-ms", type=float, default=300.0)
    parser.add_argument("--only", help="run only the case of this name")
    args = parser.parse_args()
    warm()
    ac = AsyncClassifier(Classifier.load())
    r = Router(RouterState(pol, Pools.build(pol, Discovery())), classifier=ClassifierSignal(ac, args.timeout_ms / 1000))
    print(f"CPU: {cpu_model()}; classifier deadline {args.timeout_ms:g} ms")
    for name, body in CASES.items():
        if args.only and name != args.only:
            continue
        gaps: list[float] = []
        stop = asyncio.Event()
        ticking = asyncio.create_task(_ticks(gaps, stop))
        t0 = time.perf_counter()
        routed = await r.route(Call("POST", "/v1/chat/completions", {}, body))
        took = time.perf_counter() - t0
        stop.set()
        await ticking
        print(
            f"{name:<24} {len(body) / 1e6:5.2f} MB  route {took * 1000:6.0f} ms  "
            f"longest loop gap {max(gaps) * 1000:5.1f} ms  -> {routed.model} ({routed.decision})"
        )


if __name__ == "__main__":
    asyncio.run(main())
