"""Soak: steady traffic through a real Envoy into the sidecar (its own process) for a long time.

    python bench/soak.py                       # 10 minutes at 40 req/s
    python bench/soak.py --duration 30 --rate 20
    python bench/soak.py --attack 0.01         # and 10 minutes with 1% hostile requests

A mix of prompts: short chats, long multi-turn sessions, code questions (keyword rule), long
contexts (token rule), streaming with usage, the Responses and Completions APIs, and a few
requests that must be refused (malformed JSON, unknown model), which are counted apart.
Stand-in replicas answer after a short delay so requests overlap.

With ``--attack F`` the run is twice as long: windows of ``--window`` seconds alternate between
the clean mix and the same mix with a share F of its requests replaced by hostile ones (long
words, 4 MB bodies, 100,000 messages, bodies over the limit, bad headers, path tricks, slowloris
headers and bodies, clients leaving mid-request; see HOSTILE), so both see the same machine
noise. The normal requests' latencies in the attack windows are compared with the clean ones'.

Pass criteria (exit 1 if any fails): zero unexpected errors; sidecar RSS at the end within 10%
of RSS after warm-up; in-flight counts back to zero; the idle event-loop task count at the end
no higher than the idle count after a first short burst of traffic. With ``--attack``, also:
every hostile request got its documented answer, the p99 of normal requests in the attack
windows is within 2x the clean windows', and the sidecar's RSS is bounded: its peak within
``--rss-headroom`` MB of its RSS after warm-up, and the second half of the run adding less than
10% (instead of the 10% from warm-up: a 4 MB body's memory may stay with the allocator).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import re
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
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


def raw(path: str, body: bytes, headers: dict[str, str | bytes] | None = None, length: int | None = None) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n".encode()
    head += b"content-length: %d\r\n" % (len(body) if length is None else length)
    for name, value in (headers or {}).items():
        head += name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()) + b"\r\n"
    return head + b"connection: close\r\n\r\n" + body


async def one_request(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
    return await send_raw(port, raw(path, body, headers))


_CODE = re.compile(rb'"code":\s*"([a-z_]+)"')


async def send_raw(port: int, data: bytes, *, leave_after: float | None = None) -> tuple[int, str]:
    """Send data and read the answer's status (0: none) and error code ("" if none). With
    leave_after, a client that stops there: it waits that long for an answer (Envoy's timeouts
    may come first), then goes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if leave_after is not None:
            data = await asyncio.wait_for(reader.read(), leave_after)
        else:
            data = await reader.read()
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
        code = _CODE.search(data[:4096]) if status >= 400 else None
        return status, code.group(1).decode() if code else ""
    except (OSError, ValueError, IndexError, TimeoutError):
        return 0, ""
    finally:
        writer.close()


PROSE = "The committee reviewed the quarterly figures and the hiring plan, then adjourned. "
CHAT = "/v1/chat/completions"


def _chat(text: str) -> bytes:
    return orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": text}]})


def _hostile() -> list[tuple[str, bytes, float | None, set[int]]]:
    """(kind, raw request, seconds before the client leaves (None: it waits for the answer),
    the statuses it may get; 0: none, the client left first)."""
    many = [{"role": "user" if i % 2 == 0 else "assistant", "content": "ok"} for i in range(100_000)]
    prose = _chat((PROSE * 50_000)[:3_900_000])
    deep = b'{"model":"auto","messages":[{"role":"user","content":"hi"}],"x":' + b"[" * 2000 + b"]" * 2000 + b"}"
    half = raw(CHAT, prose[:1000], length=len(prose))
    return [
        ("60,000-character word", raw(CHAT, _chat("a" * 60_000)), None, {200}),
        ("3.9 MB of prose", raw(CHAT, prose), None, {200}),
        ("100,000 messages", raw(CHAT, orjson.dumps({"model": "auto", "messages": many})), None, {200}),
        ("body over the limit", raw(CHAT, _chat("b" * 4_300_000)), None, {413}),
        ("nesting over 1024", raw(CHAT, deep), None, {400}),
        ("header not UTF-8", raw(CHAT, _chat("hi"), {"x-session-id": b"\xff\xfe"}), None, {400}),
        ("NUL in a header", raw(CHAT, _chat("hi"), {"x-note": b"a\x00b"}), None, {400}),
        ("router header", raw(CHAT, _chat("hi"), {"x-gateway-destination-endpoint": "10.9.9.9:80"}), None, {200}),
        ("escaped slash", raw("/v1/chat%2Fcompletions", _chat("hi")), None, {400}),
        ("look-alike path", raw("/V1/chat/completions", _chat("hi")), None, {404}),
        ("encoded path", raw("/v1/%63hat/completions", _chat("hi")), None, {200}),
        ("slowloris headers", raw(CHAT, b"").split(b"\r\n")[0] + b"\r\nhost: bench\r\n", 15.0, {0, 408}),
        ("body shorter than its length", half, 15.0, {0, 408}),
        ("leaves mid-body", half, 0.05, {0}),
        ("leaves right after sending", raw(CHAT, _chat("bye")), 0.002, {0, 200}),
    ]


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE))


@dataclass
class Tally:
    """What the clients got."""

    ok: Counter = field(default_factory=Counter)  # normal requests, by status
    refused: Counter = field(default_factory=Counter)  # requests of the mix that must be refused
    latency: dict[str, list[float]] = field(default_factory=lambda: {"clean": [], "attack": []})
    hostile: Counter = field(default_factory=Counter)  # (kind, status)
    wrong: Counter = field(default_factory=Counter)  # hostile answers not among the documented ones
    errors: list[tuple[float, str, int, str]] = field(default_factory=list)  # (sent at, phase, status, code)
    sent: list[tuple[float, str]] = field(default_factory=list)  # (sent at, hostile kind)


async def drive(
    port: int,
    rate: float,
    duration: float,
    seed: int,
    on_tick,
    *,
    attack: float = 0.0,
    window: float = 60.0,
    hostile: list[tuple[str, bytes, float | None, set[int]]] | None = None,
) -> Tally:
    """Requests at a fixed rate for duration seconds; with attack, windows alternate between the
    clean mix and the mix with that share of hostile requests."""
    rng = random.Random(seed)
    tally = Tally()
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
        phase = "attack" if attack and int((due - start) // window) % 2 == 1 else "clean"
        if phase == "attack" and hostile and rng.random() < attack:
            kind, data, leave, allowed = rng.choice(hostile)

            tally.sent.append((due - start, kind))

            async def run_hostile(kind=kind, data=data, leave=leave, allowed=allowed) -> None:
                status, _ = await send_raw(port, data, leave_after=leave)
                tally.hostile[kind, status] += 1
                if status not in allowed:
                    tally.wrong[kind, status] += 1

            coroutine = run_hostile()
        else:
            path, body, headers, must_fail = request_mix(rng)

            async def run(path=path, body=body, headers=headers, must_fail=must_fail, phase=phase, at=due) -> None:
                t = time.perf_counter()
                status, code = await one_request(port, path, body, headers)
                (tally.refused if must_fail else tally.ok)[status] += 1
                if status == 200 and not must_fail:
                    tally.latency[phase].append(time.perf_counter() - t)
                elif status not in (200, 400, 404):
                    tally.errors.append((at - start, phase, status, code))

            coroutine = run()
        task = asyncio.create_task(coroutine)
        pending.add(task)
        task.add_done_callback(pending.discard)
        if time.monotonic() >= next_tick:
            on_tick(time.monotonic() - start, tally)
            next_tick += 10
    await asyncio.gather(*pending)
    return tally


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class RssPeak:
    """The sidecar's largest RSS, sampled every 0.1 s on a thread (a 4 MB body's peak is short)."""

    def __init__(self, sidecar: SidecarProcess) -> None:
        self.sidecar, self.peak, self._stop = sidecar, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self.sidecar.rss_mb())

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic, of each kind (default 600)")
    parser.add_argument("--rate", type=float, default=40, help="requests per second (default 40)")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the run used as warm-up (default 0.1)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--attack", type=float, default=0.0, help="share of hostile requests in attack windows")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per clean or attack window (default 60)")
    parser.add_argument("--rss-headroom", type=float, default=300.0, help="MB the peak RSS may exceed warm-up by")
    args = parser.parse_args()
    total = args.duration * (2 if args.attack else 1)
    hostile = _hostile() if args.attack else None

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

        def tick(elapsed: float, tally: Tally) -> None:
            rss = sidecar.rss_mb()
            tasks = metric(metrics_port, "extproc_event_loop_tasks")
            samples.append((elapsed, rss, tasks))
            print(
                f"t={elapsed:6.0f}s  served={sum(tally.ok.values()):7d}  hostile={sum(tally.hostile.values()):5d}  "
                f"rss={rss:6.1f} MB  loop tasks={tasks:4.0f}",
                flush=True,
            )

        try:
            # The task count is compared idle to idle: a few seconds of the same traffic start
            # everything long-lived (access-log streams, the classifier's batcher), then a pause.
            asyncio.run(drive(listen, args.rate, 3.0, args.seed + 1, lambda *_: None))
            time.sleep(2.5)
            tasks_idle = metric(metrics_port, "extproc_event_loop_tasks")
            with RssPeak(sidecar) as peak:
                tally = asyncio.run(
                    drive(
                        listen,
                        args.rate,
                        total,
                        args.seed,
                        tick,
                        attack=args.attack,
                        window=args.window,
                        hostile=hostile,
                    )
                )
            time.sleep(2.5)  # let observer streams close (deferred close is 1 s) and the sweeper run
            inflight = metric(metrics_port, "extproc_replica_inflight")
            tasks_end = metric(metrics_port, "extproc_event_loop_tasks")
            rss_end = sidecar.rss_mb()
        finally:
            envoy.stop()
            sidecar.stop()
        del fleet

    ok, refused = tally.ok, tally.refused
    warm = [s for s in samples if s[0] >= args.warmup * total] or samples[-1:]
    rss_warm = warm[0][1]
    unexpected = sum(n for status, n in ok.items() if status != 200)
    wrongly_accepted = sum(n for status, n in refused.items() if status not in (400, 404))
    growth = (rss_end - rss_warm) / rss_warm
    checks = {"zero unexpected errors": unexpected == 0 and wrongly_accepted == 0}
    if args.attack:
        # Memory a 4 MB body or 100,000 messages took may stay with the allocator (a step, not a
        # leak): bounded if the peak stays within the headroom and the second half adds < 10%.
        rss_half = min(samples, key=lambda sample: abs(sample[0] - total / 2))[1]
        checks["RSS in the second half within 10% of the half-way RSS"] = rss_end <= 1.10 * rss_half
    else:
        checks["RSS within 10% of warm-up"] = abs(growth) <= 0.10
    checks["in-flight back to zero"] = inflight == 0
    checks["no task growth"] = tasks_end <= tasks_idle
    print()
    print(
        f"duration {total:.0f}s at {args.rate:.0f} req/s: {sum(ok.values())} requests "
        f"({dict(ok)}), {sum(refused.values())} refusals ({dict(refused)})"
    )
    print(
        f"sidecar RSS: {rss_warm:.1f} MB after warm-up -> {rss_end:.1f} MB at the end ({growth:+.1%}); "
        f"max {peak.peak:.1f} MB"
    )
    print(
        f"event-loop tasks, idle: {tasks_idle:.0f} after a first burst -> {tasks_end:.0f} at the end; "
        f"in-flight at the end: {inflight:.0f}"
    )
    if args.attack:
        clean, attacked = tally.latency["clean"], tally.latency["attack"]
        p99_clean, p99_attack = quantile(clean, 0.99), quantile(attacked, 0.99)
        for name, values in (("clean", clean), ("attack", attacked)):
            print(
                f"normal requests, {name} windows: {len(values)} answered, "
                f"p50 {quantile(values, 0.5) * 1000:.1f} ms, p99 {quantile(values, 0.99) * 1000:.1f} ms"
            )
        print(f"hostile requests: {sum(tally.hostile.values())}")
        for (kind, status), n in sorted(tally.hostile.items()):
            print(f"  {kind}: {n} x {status or 'no answer (client left)'}")
        checks["every hostile request got its documented answer"] = not tally.wrong
        checks["normal p99 under attack within 2x the clean p99"] = p99_attack <= 2 * p99_clean
        checks[f"peak RSS within {args.rss_headroom:.0f} MB of warm-up"] = peak.peak <= rss_warm + args.rss_headroom
        if tally.wrong:
            print(f"  unexpected: {dict(tally.wrong)}")
    if tally.errors:
        print(f"errors: {dict(Counter((phase, status, code) for _, phase, status, code in tally.errors))}")
        for at, phase, status, code in tally.errors[:20]:
            before = [f"{kind} {at - t:.1f}s before" for t, kind in tally.sent if 0 <= at - t < 5]
            print(f"  t={at:7.1f}s {phase} {status} {code}  hostile sent just before: {before or 'none'}")
    for name, passed in checks.items():
        print(f"  [{'PASS' if passed else 'FAIL'}] {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
