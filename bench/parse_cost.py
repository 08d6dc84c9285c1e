"""What parsing a body costs, this checkout against a baseline in the same process and run.

The baseline is extproc/request.py at a git revision (default: main), loaded as its own module;
each round parses every body once with each, in alternating order. Printed per body: median and
p99 milliseconds of ``parse`` (orjson + extraction + the duplicate-field checks, collector
paused) and of the collector's pass over what the parse left (the first young-generation
collection after it, which runs on whichever thread allocates next: often the event loop).

    python bench/parse_cost.py [--rounds 40] [--baseline main]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_model
from extproc import request
from tests.adversarial.test_large_and_long import many_messages, sized_body

ROOT = Path(__file__).resolve().parent.parent


def _baseline(revision: str):
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{revision}:extproc/request.py"], check=True, capture_output=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "request_baseline.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("request_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def _tool_turns(count: int) -> bytes:
    """Assistant tool calls and tool results: the shape agents send, not the fast one."""
    turns = []
    for i in range(count // 2):
        call = {"id": f"c{i}", "type": "function", "function": {"name": "search", "arguments": '{"q":"x"}'}}
        turns.append({"role": "assistant", "content": None, "tool_calls": [call]})
        turns.append({"role": "tool", "tool_call_id": f"c{i}", "content": "result"})
    turns.append({"role": "user", "content": "What did the searches find?"})
    return orjson.dumps({"model": "auto", "messages": turns})


BODIES = {
    "small chat (1 message)": orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": "hi " * 40}]}),
    "3.9 MB of prose": sized_body(3_900_000),
    "10,000 messages": many_messages(10_000),
    "100,000 messages": many_messages(100_000),
    "20,000 tool-call turns": _tool_turns(20_000),
}


def _time(module, body: bytes) -> tuple[float, float]:
    gc.collect()
    t0 = time.perf_counter()
    parsed = module.parse(module.Api.CHAT, body)
    t1 = time.perf_counter()
    gc.collect(0)  # the young-generation pass the parse's objects cost once the collector runs
    t2 = time.perf_counter()
    del parsed
    return t1 - t0, t2 - t1


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--baseline", default="main")
    args = parser.parse_args()
    base = _baseline(args.baseline)
    print(f"CPU: {cpu_model()}; {args.rounds} rounds; baseline {args.baseline}")
    print(f"{'body':<26} {'MB':>5}  {'parse ms, base → now (median / p99)':<40} {'collector ms, base → now':<30}")
    for name, body in BODIES.items():
        times: dict[str, list[tuple[float, float]]] = {"base": [], "now": []}
        for r in range(args.rounds):
            order = (("base", base), ("now", request)) if r % 2 else (("now", request), ("base", base))
            for label, module in order:
                times[label].append(_time(module, body))
        cells = []
        for k in (0, 1):
            b = [t[k] for t in times["base"]]
            n = [t[k] for t in times["now"]]
            cells.append(
                f"{statistics.median(b) * 1000:7.1f} / {_p(b, 0.99):6.1f} → {statistics.median(n) * 1000:6.1f} / {_p(n, 0.99):6.1f}"
            )
        print(f"{name:<26} {len(body) / 1e6:5.2f}  {cells[0]:<40} {cells[1]:<30}")


if __name__ == "__main__":
    main()
