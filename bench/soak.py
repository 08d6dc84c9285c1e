"""Soak: steady traffic through a real Envoy into the sidecar (its own process) for a long time.

    python bench/soak.py                       # 10 minutes at 40 req/s
    python bench/soak.py --duration 30 --rate 20

A mix of prompts: short chats, long multi-turn sessions, code questions (keyword rule), long
contexts (token rule), streaming with usage, the Responses and Completions APIs, and a few
requests that must be refused (malformed JSON, unknown model), which are counted apart.
Stand-in replicas answer after a short delay so requests overlap.

Pass criteria (exit 1 if any fails): zero unexpected errors; sidecar RSS at the end within 10%
of RSS after warm-up; in-flight counts back to zero; the idle event-loop task count at the end
no higher than the idle count after a first short burst of traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import re
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SidecarProcess, envoy_process, free_port
from extproc.envoy.options import EnvoyOptions
from extproc.standin import StandIn, StandInFleet

POLICY = """
version: 1
default_model: small
cost: {baseline_model: large}
models:
  small:
    pricing: {input_per_million: 0.18, output_per_million: 0.18}
    replicas: {static: [S1, S2], envoy: original_dst}
  large:
    pricing: {input_per_million: 0.88, output_per_million: 0.88}
    replicas: {static: [L1, L2], envoy: override_host}
decisions:
  - name: code
    when: {keyword: ["traceback", "segfault", "```"]}
    model: large
    fallbacks: [small]
  - name: long
    when: {tokens: {min: 1500}}
    model: large
  - name: stem
    when: {all: [{domain: [math, physics]}, {complexity: {above: 0.6}}]}
    model: large
"""


def request_mix(rng: random.Random) -> tuple[str, bytes, dict[str, str], bool]:
    """(path, body, headers, must_fail)."""
    roll = rng.random()
    session = f"s{rng.randint(0, 200)}"
    if roll < 0.30:
        return (
            "/v1/chat/completions",
            orjson.dumps(
                {
                    "model": "auto",
                    "messages": [
                        {"role": "user", "content": f"What is a good name for pet number {rng.randint(0, 10**6)}?"}
                    ],
                }
            ),
            {},
            False,
        )
    if roll < 0.50:
        turns = rng.randint(1, 8)
        messages = [{"role": "system", "content": "You are a patient tutor. " * 30}]
        for t in range(turns):
            messages += [
                {"role": "user", "content": f"Session {session} question {t}: explain more. " * 6},
                {"role": "assistant", "content": "Here is more detail. " * 20},
            ]
        messages.append({"role": "user", "content": "And then?"})
        return (
            "/v1/chat/completions",
            orjson.dumps({"model": "auto", "messages": messages}),
            {"x-session-id": session},
            False,
        )
    if roll < 0.60:
        return (
            "/v1/chat/completions",
            orjson.dumps(
                {
                    "model": "auto",
                    "messages": [
                        {"role": "user", "content": "Why does this segfault?\n```c\nint *p = 0; *p = 1;\n```"}
                    ],
                }
            ),
            {},
            False,
        )
    if roll < 0.68:
        return (
            "/v1/chat/completions",
            orjson.dumps(
                {
                    "model": "auto",
                    "messages": [
                        {
                            "role": "user",
                            "content": "Summarise this report. " + "The quarterly figures were reviewed. " * 300,
                        }
                    ],
                }
            ),
            {},
            False,
        )
    if roll < 0.80:
        return (
            "/v1/chat/completions",
            orjson.dumps(
                {
                    "model": "auto",
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": "Count to five."}],
                }
            ),
            {},
            False,
        )
    if roll < 0.87:
        return (
            "/v1/responses",
            orjson.dumps({"model": "auto", "input": "Prove that the square root of 2 is irrational."}),
            {},
            False,
        )
    if roll < 0.94:
        return "/v1/completions", orjson.dumps({"model": "small", "prompt": "Once upon a time"}), {}, False
    if roll < 0.97:
        return "/v1/chat/completions", b'{"model": "auto", "messages": [', {}, True
    return (
        "/v1/chat/completions",
        orjson.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
        {},
        True,
    )


async def one_request(port: int, path: str, body: bytes, headers: dict[str, str]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (
            f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        )
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "connection: close\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        data = await reader.read()
        return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    except (OSError, ValueError, IndexError):
        return 0
    finally:
        writer.close()


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


async def drive(port: int, rate: float, duration: float, seed: int, on_tick) -> tuple[Counter, Counter]:
    rng = random.Random(seed)
    ok, refused = Counter(), Counter()
    pending: set[asyncio.Task] = set()
    start = time.monotonic()
    next_tick = start
    for i in itertools.count():
        due = start + i / rate
        now = time.monotonic()
        if due - start > duration:
            break
        if due > now:
            await asyncio.sleep(due - now)
        path, body, headers, must_fail = request_mix(rng)

        async def run(path=path, body=body, headers=headers, must_fail=must_fail) -> None:
            status = await one_request(port, path, body, headers)
            (refused if must_fail else ok)[status] += 1

        task = asyncio.create_task(run())
        pending.add(task)
        task.add_done_callback(pending.discard)
        if time.monotonic() >= next_tick:
            on_tick(time.monotonic() - start, ok, refused)
            next_tick += 10
    await asyncio.gather(*pending)
    return ok, refused


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic (default 600)")
    parser.add_argument("--rate", type=float, default=40, help="requests per second (default 40)")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the run used as warm-up (default 0.1)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()

    replicas = [StandIn(name=n, delay=0.05, chunks=4, chunk_delay=0.01) for n in ("S1", "S2", "L1", "L2")]
    with tempfile.TemporaryDirectory(prefix="extproc-soak-") as tmp, StandInFleet(replicas) as fleet:
        policy_text = POLICY
        for r in replicas:
            policy_text = policy_text.replace(r.name, f'"{r.address}"')
        policy_path = Path(tmp) / "policy.yaml"
        policy_path.write_text(policy_text)
        metrics_port = free_port()
        listen = free_port()
        uds = Path(tmp) / "extproc.sock"
        options = EnvoyOptions(
            listen_address="127.0.0.1",
            listen_port=listen,
            admin_port=free_port(),
            extproc_uds=str(uds),
            xds_dir=str(Path(tmp) / "xds"),
        )
        sidecar = SidecarProcess(policy_path, uds, metrics_port, envoy=options)
        sidecar.start()
        envoy = envoy_process(sidecar, tmp)
        envoy.start()
        samples: list[tuple[float, int, float]] = []

        def tick(elapsed: float, ok: Counter, refused: Counter) -> None:
            rss = sidecar.rss_mb()
            tasks = metric(metrics_port, "extproc_event_loop_tasks")
            samples.append((elapsed, rss, tasks))
            print(
                f"t={elapsed:6.0f}s  served={sum(ok.values()):7d}  rss={rss:6.1f} MB  loop tasks={tasks:4.0f}",
                flush=True,
            )

        try:
            # The task count is compared idle to idle: a few seconds of the same traffic start
            # everything long-lived (access-log streams, the classifier's batcher), then a pause.
            asyncio.run(drive(listen, args.rate, 3.0, args.seed + 1, lambda *_: None))
            time.sleep(2.5)
            tasks_idle = metric(metrics_port, "extproc_event_loop_tasks")
            ok, refused = asyncio.run(drive(listen, args.rate, args.duration, args.seed, tick))
            time.sleep(2.5)  # let observer streams close (deferred close is 1 s) and the sweeper run
            inflight = metric(metrics_port, "extproc_replica_inflight")
            tasks_end = metric(metrics_port, "extproc_event_loop_tasks")
            rss_end = sidecar.rss_mb()
        finally:
            envoy.stop()
            sidecar.stop()
        del fleet

    warm = [s for s in samples if s[0] >= args.warmup * args.duration] or samples[-1:]
    rss_warm = warm[0][1]
    unexpected = sum(n for status, n in ok.items() if status != 200)
    wrongly_accepted = sum(n for status, n in refused.items() if status not in (400, 404))
    growth = (rss_end - rss_warm) / rss_warm
    checks = {
        "zero unexpected errors": unexpected == 0 and wrongly_accepted == 0,
        "RSS within 10% of warm-up": abs(growth) <= 0.10,
        "in-flight back to zero": inflight == 0,
        "no task growth": tasks_end <= tasks_idle,
    }
    print()
    print(
        f"duration {args.duration:.0f}s at {args.rate:.0f} req/s: {sum(ok.values())} requests "
        f"({dict(ok)}), {sum(refused.values())} refusals ({dict(refused)})"
    )
    print(
        f"sidecar RSS: {rss_warm:.1f} MB after warm-up -> {rss_end:.1f} MB at the end ({growth:+.1%}); "
        f"max {max(s[1] for s in samples):.1f} MB"
    )
    print(
        f"event-loop tasks, idle: {tasks_idle:.0f} after a first burst -> {tasks_end:.0f} at the end; "
        f"in-flight at the end: {inflight:.0f}"
    )
    for name, passed in checks.items():
        print(f"  [{'PASS' if passed else 'FAIL'}] {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
