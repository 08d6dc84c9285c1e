"""The PII check under load: at which concurrency do requests start failing closed?

A reroute policy over the structured PII types (the bundled policy's), through a real Envoy, the
sidecar in its own process, stand-in replicas. Closed loop: C clients each send the next request
as soon as the last is answered, every request with its own PII-free prompt (~40 tokens), so no
cache hit helps. For each concurrency it prints how many of the requests were sent to the private
model because their PII check missed the classifier deadline (fail-closed: `private` and the
`unchecked` metric), how many requests missed the deadline at all (`timeouts`: for the auto mix,
domain and complexity then count as false), errors, latency, and the sidecar's CPU per request.

Request mixes: `explicit` (model: small, only the PII check needs the encoder), `auto` (the
bundled decisions: domain and complexity need the encoder for the latest message anyway), and
`numbers` (explicit, and one prompt in ten carries a number shaped like a phone number, which
the tagger must judge).
Two sidecars in the same run: this checkout, and `--baseline DIR` (a checkout of the code before,
run from its own directory) when given.

    python bench/pii_load.py [--baseline /tmp/base] [--requests 500] [--concurrency 8,16,32,64,128]
"""

from __future__ import annotations

import argparse
import http.client
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SidecarProcess, cpu_model, envoy_process, free_port
from extproc.envoy.options import EnvoyOptions
from extproc.envoy.process import EnvoyProcess
from extproc.envoy.render.bootstrap import render
from extproc.policy.load import parse_policy
from extproc.standin import StandIn, StandInFleet

POLICY = """
version: 1
default_model: small
models:
  small: {replicas: {static: ["$s1"], envoy: original_dst}}
  large: {replicas: {static: ["$l1"], envoy: original_dst}}
  private: {replicas: {static: ["$p1"], envoy: original_dst}}
pii:
  action: reroute
  model: private
  types: [US_SSN, CREDIT_CARD, IBAN_CODE, EMAIL_ADDRESS, PHONE_NUMBER, IP_ADDRESS]
decisions:
  - name: code
    when: {keyword: {any: ["```", "traceback", "def "], scope: user}}
    model: large
  - name: long-context
    when: {tokens: {min: 3000}}
    model: large
  - name: hard-stem
    when: {all: [{domain: [math, physics, chemistry, engineering, computer science]}, {complexity: {above: 0.5}}]}
    model: large
"""
SUBJECTS = ["the sea at dawn", "a hash map", "inflation", "a mountain village", "vegetarian dinners",
            "the roman roads", "bird migration", "compound interest", "a lighthouse keeper", "tea ceremonies"]  # fmt: skip
ASKS = ["Write a short poem about", "Explain in plain words how to think about", "Give me three questions about",
        "Summarise what people usually get wrong about", "Tell a story for children about"]  # fmt: skip


def prompt(i: int, numbers: bool = False) -> str:
    tag = "".join(chr(97 + (i // 26**k) % 26) for k in range(3))  # distinct texts: no cache hits
    text = f"{ASKS[i % len(ASKS)]} {SUBJECTS[i // 5 % len(SUBJECTS)]}, and keep it friendly and brief ({tag})."
    if numbers and i % 10 == 0:  # a reference number shaped like a phone number: the tagger must judge it
        text += f" Ref {4411 + i % 97} 0932 17."
    return text


class Stack:
    def __init__(self, workdir: Path, checkout: Path | None) -> None:
        self.fleet = StandInFleet([StandIn(name=n) for n in ("s1", "l1", "p1")])
        self.fleet.start()
        addresses = {r.name: r.address for r in self.fleet.replicas.values()}
        text = POLICY
        for name, address in addresses.items():
            text = text.replace(f"${name}", address)
        self.policy_path = workdir / "policy.yaml"
        self.policy_path.write_text(text)
        self.metrics_port = free_port()
        self.port = free_port()
        options = EnvoyOptions(
            listen_address="127.0.0.1",
            listen_port=self.port,
            admin_port=free_port(),
            extproc_uds=str(workdir / "x.sock"),
            xds_dir=str(workdir / "xds"),
        )
        # This checkout's sidecar is its Envoy's control plane, as in the chart; a baseline
        # checkout from before that existed gets Envoy's whole configuration as one static file.
        control_plane = options if checkout is None else None
        self.sidecar = SidecarProcess(
            self.policy_path, workdir / "x.sock", self.metrics_port, cwd=checkout, envoy=control_plane
        )
        self.sidecar.start()
        if control_plane is not None:
            self.envoy = envoy_process(self.sidecar, str(workdir))
        else:
            self.envoy = EnvoyProcess(render(parse_policy(text), options), str(workdir))
        self.envoy.start()

    def stop(self) -> None:
        self.envoy.stop()
        self.sidecar.stop()
        self.fleet.stop()

    def counts(self) -> tuple[float, float]:
        """(PII checks that failed closed, classifier timeouts) so far."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        unchecked = re.findall(r'extproc_pii_detections_total\{action="[^"]+",type="unchecked"\} (\S+)', text)
        timeouts = re.findall(r'extproc_signal_failures_total\{reason="timeout",signal="classifier"\} (\S+)', text)
        return sum(map(float, unchecked)), sum(map(float, timeouts))


def run(stack: Stack, model: str, clients: int, count: int, offset: int, numbers: bool = False) -> dict[str, float]:
    local = threading.local()

    def one(i: int) -> tuple[int, str, float]:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
        body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": prompt(offset + i, numbers)}]})
        t = time.perf_counter()
        try:
            conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            return r.status, r.getheader("x-router-model", ""), time.perf_counter() - t
        except Exception:
            local.conn = None
            return 0, "", time.perf_counter() - t

    (before, timeouts), cpu = stack.counts(), stack.sidecar.cpu_seconds()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(count)))
    wall = time.perf_counter() - started
    latencies = sorted(r[2] for r in results)
    return {
        "private": sum(r[1] == "private" for r in results),
        "unchecked": stack.counts()[0] - before,
        "timeouts": stack.counts()[1] - timeouts,
        "errors": sum(r[0] != 200 for r in results),
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[int(0.99 * (len(latencies) - 1))] * 1000,
        "rps": count / wall,
        "cpu_ms": (stack.sidecar.cpu_seconds() - cpu) / count * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="a checkout of the code to compare with (run from there)")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", default="8,16,32,64,128")
    parser.add_argument("--mixes", default="explicit,auto")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    variants = [("this checkout", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    print(f"CPU: {cpu_model()}, {len(__import__('os').sched_getaffinity(0))} cores; {args.requests} requests per cell")
    print(f"{'sidecar':<14} {'mix':<9} {'clients':>7} {'private':>8} {'unchecked':>9} {'timeouts':>8} {'errors':>6} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} {'cpu ms/req':>10}")  # fmt: skip
    offset = 0
    for name, checkout in variants:
        with tempfile.TemporaryDirectory() as tmp:
            stack = Stack(Path(tmp), checkout)
            try:
                run(stack, "small", 4, 40, 10**6)  # warm-up (model load, first runs)
                for mix in args.mixes.split(","):
                    for clients in levels:
                        model = "auto" if mix == "auto" else "small"
                        r = run(stack, model, clients, args.requests, offset, numbers=mix == "numbers")
                        offset += args.requests
                        print(f"{name:<14} {mix:<9} {clients:>7} {r['private']:>8} {r['unchecked']:>9.0f} {r['timeouts']:>8.0f} "
                              f"{r['errors']:>6} {r['p50']:>8.1f} {r['p99']:>8.1f} {r['rps']:>7.1f} {r['cpu_ms']:>10.2f}",
                              flush=True)  # fmt: skip
            finally:
                stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
