"""Do many large bodies at once delay small requests? N clients each send 3.9 MB chat bodies back
to back while two clients send small requests (model `small`: only the PII check runs, which
fails closed to the private model if it misses the 300 ms classifier deadline). The bundled
policy's shape, a real Envoy, the sidecar in its own process, stand-in replicas. The stand-ins
and the large clients run in processes of their own, so what the small clients measure is not
this Python process's threads taking turns (receiving 3.9 MB bodies) but Envoy and the sidecar.

Printed per N (N = 0 is the baseline, the same small clients alone, in the same run): the small
requests' median, p99 and slowest time, how many failed, how many missed their deadline (sent to
the private model), and the large bodies' count, failures and median time. With ``--baseline DIR``
the code in that checkout runs the same cells (its own sidecar, same run).

    python bench/large_beside_small.py [--large 0,10,20,30] [--seconds 20] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SidecarProcess, cpu_model, envoy_process, free_port
from bench.pii_load import POLICY, prompt
from extproc.envoy.options import EnvoyOptions
from extproc.standin import StandIn, StandInFleet
from tests.adversarial.test_large_and_long import sized_body

LARGE = sized_body(3_900_000)


def _client(port: int, bodies, stop: threading.Event, out: list) -> None:
    conn = None
    for body in bodies:
        if stop.is_set():
            break
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        t = time.perf_counter()
        try:
            conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            out.append((r.status, r.getheader("x-router-model", ""), time.perf_counter() - t))
        except Exception:
            conn = None
            out.append((0, "", time.perf_counter() - t))


def _fleet(replicas: list[StandIn], stop) -> None:
    with StandInFleet(replicas):
        stop.wait()


class Stack:
    """Envoy and the sidecar (its control plane, as in the chart) of this checkout or `checkout`;
    the stand-ins in a child process."""

    def __init__(self, workdir: Path, checkout: Path | None) -> None:
        self._context = multiprocessing.get_context("fork")
        replicas = [StandIn(name=n, port=free_port()) for n in ("s1", "l1", "p1")]
        self._stop = self._context.Event()
        self._fleet = self._context.Process(target=_fleet, args=(replicas, self._stop), daemon=True)
        self._fleet.start()
        text = POLICY
        for r in replicas:
            text = text.replace(f"${r.name}", r.address)
        policy = workdir / "policy.yaml"
        policy.write_text(text)
        self.port = free_port()
        options = EnvoyOptions(
            listen_address="127.0.0.1",
            listen_port=self.port,
            admin_port=free_port(),
            extproc_uds=str(workdir / "x.sock"),
            xds_dir=str(workdir / "xds"),
        )
        self.sidecar = SidecarProcess(policy, workdir / "x.sock", free_port(), cwd=checkout, envoy=options)
        self.sidecar.start()
        self.envoy = envoy_process(self.sidecar, str(workdir))
        self.envoy.start()

    def stop(self) -> None:
        self.envoy.stop()
        self.sidecar.stop()
        self._stop.set()
        self._fleet.join(10)


def _large_clients(port: int, count: int, seconds: float, out) -> None:
    stop = threading.Event()
    big: list = []
    threads = [
        threading.Thread(target=_client, args=(port, iter(lambda: LARGE, None), stop, big)) for _ in range(count)
    ]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    out.put(big)


def cell(stack: Stack, large: int, seconds: float, offset: int) -> dict[str, float]:
    stop = threading.Event()
    small: list = []

    def smalls(k: int):
        i = offset + k
        while True:
            yield orjson.dumps({"model": "small", "messages": [{"role": "user", "content": prompt(i)}]})
            i += 2

    context = multiprocessing.get_context("fork")
    results = context.Queue()
    larges = context.Process(target=_large_clients, args=(stack.port, large, seconds, results))
    if large:
        larges.start()
    threads = [threading.Thread(target=_client, args=(stack.port, smalls(k), stop, small)) for k in range(2)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    big = results.get(timeout=120) if large else []
    if large:
        larges.join(10)
    times = sorted(r[2] for r in small)
    return {
        "n": len(small),
        "p50": statistics.median(times) * 1000,
        "p99": times[int(0.99 * (len(times) - 1))] * 1000,
        "max": times[-1] * 1000,
        "failed": sum(r[0] != 200 for r in small),
        "private": sum(r[1] == "private" for r in small),
        "large": len(big),
        "large_failed": sum(r[0] != 200 for r in big),
        "large_p50": statistics.median(r[2] for r in big) * 1000 if big else 0.0,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", default="0,10,20,30")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--baseline", type=Path, help="a checkout of the code to compare with")
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; {args.seconds:g} s per cell; large body {len(LARGE) / 1e6:.1f} MB")
    print(f"{'sidecar':<10} {'large':>5} {'small n':>7} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'failed':>6} "
          f"{'private':>7} {'large n':>7} {'failed':>6} {'large p50 ms':>12}")  # fmt: skip
    variants = [("this", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    offset = 0
    for name, checkout in variants:
        with tempfile.TemporaryDirectory() as tmp:
            stack = Stack(Path(tmp), checkout)
            try:
                cell(stack, 1, 3.0, 10**7)  # warm-up: model load, first large allocations
                for n in (int(x) for x in args.large.split(",")):
                    r = cell(stack, n, args.seconds, offset)
                    offset += 100_000
                    print(f"{name:<10} {n:>5} {r['n']:>7} {r['p50']:>7.1f} {r['p99']:>7.1f} {r['max']:>7.0f} {r['failed']:>6} "
                          f"{r['private']:>7} {r['large']:>7} {r['large_failed']:>6} {r['large_p50']:>12.0f}", flush=True)  # fmt: skip
            finally:
                stack.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
