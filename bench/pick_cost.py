"""What one replica pick costs the router: block hashing of a realistic prompt and Picker.pick,
with 10,000 block hashes indexed per replica, at 4, 8 and 16 replicas.

    python bench/pick_cost.py [--rounds 7] [--calls 3000] [--baseline DIR]

The picker is built as the router builds it (BoundedLoad, then PrefixAffinity, LeastLoad and
SessionAffinity with the default weights). Each replica's PrefixIndex is full at 10,000 chain
hashes from earlier conversations, and each replica has 5-25 requests in flight. Two prompt mixes:

    typical  the next turn of a conversation one replica served before: its history is indexed
             there, its system prompt on every replica. 2-20 turns, 1,000-2,000-char system
             prompt, 100-600-char user messages, 300-1,200-char answers (~2-25k chars).
    worst    the same prompts, but every replica holds the whole prefix: the most work for the
             prefix scorer (a walk of every block on every replica with a linear scan).

Columns: `hash` = render + block_hashes (256-char blocks); `pick` = Picker.pick (the target:
<= 0.3 ms p99); `route` = hash + pick + index.record + lease acquire/release, the router's whole
replica step. Each is timed in wall time (perf_counter) and in this thread's CPU time
(thread_time), which leaves out the time the OS gave the core to other processes: on a shared,
busy machine the wall-time p99 mostly measures preemption, the CPU-time p99 the code. The configs
are interleaved within each round so that machine noise hits them alike; percentiles pool all
rounds and the range of the per-round wall p99s is shown to expose contaminated rounds. The
garbage collector stays on, as in the router.

--baseline DIR times another version of the picking code in the same process, interleaved with
this one: DIR holds that version's prefix.py and picking.py (from extproc/replicas/), e.g.

    mkdir -p /tmp/before && for f in prefix picking; do
      git show COMMIT:extproc/replicas/$f.py > /tmp/before/$f.py; done
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import extproc.replicas.picking
import extproc.replicas.prefix
from bench.common import cpu_model
from extproc.policy.config import PickingSettings
from extproc.replicas.load import LoadTracker
from extproc.request import Message, render

MODEL = "llama-3.1-8b-instruct"
INDEXED_BLOCKS = 10_000
PROMPTS = 200


def _conversation(rng: random.Random, corpus: str, system: Message) -> tuple[Message, ...]:
    def text(lo: int, hi: int) -> str:
        n = rng.randint(lo, hi)
        start = rng.randrange(len(corpus) - n)
        return corpus[start : start + n]

    messages = [system]
    for _ in range(rng.randint(2, 20) - 1):
        messages += [Message("user", text(100, 600)), Message("assistant", text(300, 1200))]
    messages.append(Message("user", text(100, 600)))
    return tuple(messages)


@dataclass(frozen=True)
class Code:
    """A version of the picking code: this checkout's, or a baseline's."""

    name: str
    prefix: ModuleType
    picking: ModuleType


def _baseline(directory: str) -> Code:
    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(f"_baseline_{name}", Path(directory) / f"{name}.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module

    return Code("baseline", load("prefix"), load("picking"))


@dataclass
class Setup:
    code: Code
    name: str
    replicas: int
    endpoints: tuple[str, ...]
    picker: object
    index: object
    tracker: LoadTracker
    prompts: list[tuple[tuple[Message, ...], str]]  # (messages, session)


def setup(code: Code, n: int, worst: bool, seed: int) -> Setup:
    block_hashes, PrefixIndex, pk = code.prefix.block_hashes, code.prefix.PrefixIndex, code.picking
    rng = random.Random(f"{seed}/{n}/{worst}")
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(3000)]
    corpus = " ".join(rng.choices(vocab, k=300_000))
    systems = [Message("system", corpus[i * 2000 : i * 2000 + rng.randint(1000, 2000)]) for i in range(4)]
    p = PickingSettings()
    w = extproc.replicas.picking.default_weights()  # this checkout's defaults, for either code
    endpoints = tuple(f"10.0.{n}.{i + 1}:8000" for i in range(n))
    # Full at 10,000 blocks, so the route op's records evict as a full index would.
    tracker, index = LoadTracker(), PrefixIndex(INDEXED_BLOCKS)
    picker = pk.Picker(
        filters=[pk.BoundedLoad(tracker, p.load_bound)],
        scorers=[
            (pk.PrefixAffinity(index), w["prefix"]),
            (pk.LeastLoad(tracker), w["load"]),
            (pk.SessionAffinity(), w["session"]),
        ],
        fallbacks=p.fallbacks,
        tracker=tracker,
    )
    prompts = []
    for k in range(PROMPTS):
        messages = _conversation(rng, corpus, rng.choice(systems))
        history = block_hashes(MODEL, render(messages[:-2]), p.block_chars)  # up to the last answer
        for e in endpoints if worst else [rng.choice(endpoints)]:
            index.record(e, history)
        prompts.append((messages, f"session-{k}"))
    # Fill every replica to exactly INDEXED_BLOCKS with other conversations' blocks (older, so the
    # prompts' own blocks stay indexed).
    for e in endpoints:
        while index.size(e) < INDEXED_BLOCKS:
            other = block_hashes(MODEL, render(_conversation(rng, corpus, rng.choice(systems))), p.block_chars)
            # Stop at a chain's first block the index lacks, plus just enough of the rest to reach the size.
            known = index.matched_blocks(e, other)
            index.record(e, other[: known + INDEXED_BLOCKS - index.size(e)])
        for _ in range(rng.randint(5, 25)):
            tracker.acquire(e, MODEL)
    assert all(index.size(e) == INDEXED_BLOCKS for e in endpoints)
    return Setup(code, "worst" if worst else "typical", n, endpoints, picker, index, tracker, prompts)


def _measure(calls: int, fn: Callable[[int], object]) -> tuple[list[int], list[int]]:
    wall, cpu = [], []
    perf, thread = time.perf_counter_ns, time.thread_time_ns
    for i in range(calls):
        c0, w0 = thread(), perf()
        fn(i)
        w1, c1 = perf(), thread()
        wall.append(w1 - w0)
        cpu.append(c1 - c0)
    return wall, cpu


def _ops(s: Setup) -> dict[str, Callable[[int], object]]:
    prompts, endpoints, picker, index, tracker = s.prompts, s.endpoints, s.picker, s.index, s.tracker
    block_hashes, PickRequest = s.code.prefix.block_hashes, s.code.picking.PickRequest
    block_chars = PickingSettings().block_chars
    hashed = [block_hashes(MODEL, render(m), block_chars) for m, _ in prompts]
    requests = [PickRequest(MODEL, blocks, session) for blocks, (_, session) in zip(hashed, prompts, strict=True)]
    n = len(prompts)

    def hash_(i: int) -> object:
        return block_hashes(MODEL, render(prompts[i % n][0]), block_chars)

    def pick(i: int) -> object:
        return picker.pick(requests[i % n], endpoints)  # type: ignore[attr-defined]

    def route(i: int) -> object:
        messages, session = prompts[i % n]
        blocks = block_hashes(MODEL, render(messages), block_chars)
        primary = picker.pick(PickRequest(MODEL, blocks, session), endpoints).endpoints[0]  # type: ignore[attr-defined]
        index.record(primary, blocks)  # type: ignore[attr-defined]
        tracker.release(tracker.acquire(primary, MODEL))
        return primary

    return {"hash": hash_, "pick": pick, "route": route}


def _q(values: Sequence[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1e3  # microseconds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=3000, help="calls per op, config and round")
    parser.add_argument("--replicas", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--baseline", metavar="DIR", help="also time the prefix.py and picking.py in DIR")
    args = parser.parse_args(argv)

    codes = [Code("this", extproc.replicas.prefix, extproc.replicas.picking)]
    if args.baseline:
        codes.append(_baseline(args.baseline))
    setups = [setup(c, n, worst, args.seed) for n in args.replicas for worst in (False, True) for c in codes]
    ops = {(s.code.name, s.name, s.replicas): _ops(s) for s in setups}
    prompt_chars = [len(render(m)) for m, _ in setups[0].prompts]
    print(
        f"# pick cost: {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs ({cpu_model()}), load average before {os.getloadavg()[0]:.2f}"
    )
    print(
        f"# {args.rounds} rounds x {args.calls} calls per op and config; {INDEXED_BLOCKS} blocks indexed per "
        f"replica; prompts {min(prompt_chars)}-{max(prompt_chars)} chars (median "
        f"{statistics.median(prompt_chars):.0f}, {PickingSettings().block_chars}-char blocks)"
    )
    samples: dict[tuple[str, str, int, str], tuple[list[int], list[int]]] = {}
    round_p99: dict[tuple[str, str, int, str], list[float]] = {}
    for table in ops.values():  # warm up
        for fn in table.values():
            _measure(200, fn)
    for _ in range(args.rounds):
        for config, table in ops.items():
            for op, fn in table.items():
                wall, cpu = _measure(args.calls, fn)
                w, c = samples.setdefault((*config, op), ([], []))
                w += wall
                c += cpu
                round_p99.setdefault((*config, op), []).append(_q(wall, 0.99))
    print(f"# load average after {os.getloadavg()[0]:.2f}\n")
    code_col = f"{'code':<9}" if args.baseline else ""
    print(
        f"{code_col}{'mix':<8} {'replicas':>8} {'op':<6} {'wall p50':>9} {'wall p99':>9} {'cpu p50':>8} "
        f"{'cpu p99':>8}  {'wall p99 per round (min-max)':>28}"
    )
    order = sorted(
        samples, key=lambda k: (k[2], k[1] == "worst", ["hash", "pick", "route"].index(k[3]), k[0] != "this")
    )
    for key in order:
        code, name, n, op = key
        wall, cpu = samples[key]
        rp = round_p99[key]
        print(
            (f"{code:<9}" if args.baseline else "")
            + f"{name:<8} {n:>8} {op:<6} {_q(wall, 0.5):>6.0f} us {_q(wall, 0.99):>6.0f} us {_q(cpu, 0.5):>5.0f} us "
            f"{_q(cpu, 0.99):>5.0f} us  {min(rp):>12.0f} - {max(rp):.0f} us"
        )
    verdicts = [
        f"{name}/{n}: {_q(samples[code, name, n, op][1], 0.99):.0f} us"
        for code, name, n, op in order
        if op == "pick" and code == "this"
    ]
    print("\npick p99 (CPU time) vs the 300 us target: " + ", ".join(verdicts))


if __name__ == "__main__":
    main()
