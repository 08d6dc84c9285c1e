"""Admission control at 2x overload: does high priority keep its latency, does low priority get
prompt 429s, does anything time out? Through a real Envoy and the sidecar as its own process.

    python bench/admission.py              # 20 s per phase (~2 min)
    python bench/admission.py --seconds 5  # quick look

Two stand-in replicas answer after a fixed 0.2 s; the model's capacity is 4 in flight per replica
(8 at once: 40 requests/s at most). An open-loop load of Poisson arrivals, each its own
connection:

1. unloaded: high-priority requests only, at a third of the capacity;
2. 2x overload: 80 requests/s, 30% high priority (``--premium-share``) (x-user-tier: premium, may wait 5 s), 70% low
   (free: no waiting, and at most 2 of a replica's 4 slots: ``share: 0.5``, ``--free-share``), from
   six tenants;
3. the same 2x overload with admission control off (no capacity: every request goes straight to a
   replica, which serves up to 64 at once and queues the rest, as a model server does).

Prints, per phase and priority, the share served, refused (429) and failed otherwise (5xx or a
client timeout of 30 s), and latency p50 / p99 of the served ones and of the 429s.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import math
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SidecarProcess, cpu_model, envoy_process, free_port
from extproc.envoy.options import EnvoyOptions
from extproc.standin import StandIn, StandInFleet

POLICY = """
version: 1
default_model: chat
admission:
  priorities:
    - {name: premium, max_wait: 5s, max_queued: 512}
    - {name: free, max_wait: 0s, share: $share}
models:
  chat:
    replicas: {static: ["$r1", "$r2"]}
    {capacity}
"""
SERVICE_SECONDS = 0.2
PER_REPLICA = 4


class ServerQueue:
    """A model server's own limit: it runs so many at once and queues the rest (vLLM's
    max_num_seqs); the stand-in alone would serve any number at once."""

    def __init__(self, replica: StandIn, running: int) -> None:
        self.semaphore: asyncio.Semaphore | None = None
        self.running = running
        original = replica._answer

        async def answer(request, writer):  # type: ignore[no-untyped-def]
            if request.path.startswith("/v1/") and not request.path.startswith("/v1/models"):
                if self.semaphore is None:
                    self.semaphore = asyncio.Semaphore(self.running)
                async with self.semaphore:
                    return await original(request, writer)
            return await original(request, writer)

        replica._answer = answer  # type: ignore[method-assign]


def stack(workdir: Path, admission: bool, share: float):
    replicas = [StandIn(name=n, delay=SERVICE_SECONDS) for n in ("r1", "r2")]
    for replica in replicas:
        ServerQueue(replica, PER_REPLICA)  # the server itself runs PER_REPLICA at a time
    fleet = StandInFleet(replicas)
    fleet.start()
    capacity = f"capacity: {{max_inflight: {PER_REPLICA}}}" if admission else ""
    text = POLICY.replace("{capacity}", capacity).replace("$share", f"{share:g}")
    for replica in replicas:
        text = text.replace(f"${replica.name}", replica.address)
    policy_path = workdir / "policy.yaml"
    policy_path.write_text(text)
    port = free_port()
    options = EnvoyOptions(listen_address="127.0.0.1", listen_port=port, admin_port=free_port(),
                           extproc_uds=str(workdir / "x.sock"), xds_dir=str(workdir / "xds"))  # fmt: skip
    sidecar = SidecarProcess(policy_path, workdir / "x.sock", free_port(), envoy=options)  # its Envoy's control plane
    sidecar.start()
    envoy = envoy_process(sidecar, str(workdir))
    envoy.start()
    return port, fleet, sidecar, envoy


def one(port: int, tier: str, tenant: str, i: int) -> tuple[str, int, float]:
    body = orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": f"hello {i}"}]})
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", "/v1/chat/completions", body=body,
                           headers={"content-type": "application/json", "x-user-tier": tier, "x-tenant-id": tenant})  # fmt: skip
        response = connection.getresponse()
        response.read()
        status = response.status
    except TimeoutError:
        status = 0
    except OSError:
        status = -1
    finally:
        connection.close()
    return tier, status, time.monotonic() - started


def load(port: int, rate: float, premium_share: float, seconds: float, seed: int) -> list[tuple[str, int, float]]:
    rng = random.Random(seed)
    results: list[tuple[str, int, float]] = []
    lock = threading.Lock()
    threads = []
    t = time.monotonic()
    end = t + seconds
    i = 0
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            break
        delay = t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        tier = "premium" if rng.random() < premium_share else "free"
        tenant = f"tenant-{rng.randrange(6)}"

        def run(tier: str = tier, tenant: str = tenant, i: int = i) -> None:
            result = one(port, tier, tenant, i)
            with lock:
                results.append(result)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        i += 1
    for thread in threads:
        thread.join(60)
    return results


def summary(label: str, results: list[tuple[str, int, float]]) -> None:
    for tier in ("premium", "free"):
        rows = [r for r in results if r[0] == tier]
        if not rows:
            continue
        served = sorted(s for _, status, s in rows if status == 200)
        refused = sorted(s for _, status, s in rows if status == 429)
        failed = [status for _, status, _ in rows if status not in (200, 429)]
        print(
            f"{label:<28} {tier:<8} {len(rows):>6} {len(served) / len(rows):>7.1%} {len(refused) / len(rows):>7.1%} "
            f"{len(failed):>7} {_ms(served, 0.5):>8} {_ms(served, 0.99):>8} {_ms(refused, 0.5):>8} {_ms(refused, 0.99):>8}"
        )


def _ms(values: list[float], q: float) -> str:
    if not values:
        return "-"
    return f"{values[min(len(values) - 1, int(q * len(values)))] * 1e3:.0f}"


def queueing_bound(
    premium_rate: float, free_rate: float, share: float, seconds: float = 2000.0, seed: int = 1
) -> tuple[float, float]:
    """The same admission rules without any overhead (an ideal machine): 2 replicas of
    PER_REPLICA slots, each request exactly SERVICE_SECONDS; premium waits in one FIFO queue for
    the first free slot, free takes a slot at once only where the replica is below its share and
    nobody waits, else is refused. Returns (premium p99 / SERVICE_SECONDS, share of free served):
    what no implementation of these rules can beat, since a slot held by a running request is
    not given back (no preemption)."""
    import heapq

    rng = random.Random(seed)
    events: list[tuple[float, int, int]] = []  # (time, 0 arrival premium / 1 arrival free / 2 end, replica)
    t, total = 0.0, premium_rate + free_rate
    while t < seconds:
        t += rng.expovariate(total)
        events.append((t, 0 if rng.random() < premium_rate / total else 1, -1))
    heapq.heapify(events)
    inflight, queue, latencies, free_sent, free_served = [0, 0], deque(), [], 0, 0
    limit = math.floor(PER_REPLICA * share)
    while events:
        t, kind, replica = heapq.heappop(events)
        if kind == 2:
            inflight[replica] -= 1
            if queue:
                inflight[replica] += 1
                latencies.append(t + SERVICE_SECONDS - queue.popleft())
                heapq.heappush(events, (t + SERVICE_SECONDS, 2, replica))
            continue
        replica = min((0, 1), key=lambda r: inflight[r])
        if kind == 0 and (queue or inflight[replica] >= PER_REPLICA):
            queue.append(t)
            continue
        if kind == 1:
            free_sent += 1
            if queue or inflight[replica] >= limit:
                continue
            free_served += 1
        else:
            latencies.append(SERVICE_SECONDS)
        inflight[replica] += 1
        heapq.heappush(events, (t + SERVICE_SECONDS, 2, replica))
    latencies.sort()
    return latencies[int(0.99 * len(latencies))] / SERVICE_SECONDS, free_served / max(1, free_sent)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--free-share", type=float, default=0.5, help="of each replica's slots free requests may fill")
    parser.add_argument("--premium-share", type=float, default=0.3, help="of the overload's requests that are premium")
    args = parser.parse_args(argv)
    capacity_rps = 2 * PER_REPLICA / SERVICE_SECONDS
    print(
        f"# {cpu_model()}; capacity {capacity_rps:.0f} requests/s (2 replicas x {PER_REPLICA} x {SERVICE_SECONDS} s); "
        f"free share {args.free_share:g}; {args.seconds:g} s per phase"
    )
    print(f"{'phase':<28} {'priority':<8} {'sent':>6} {'served':>7} {'429':>7} {'failed':>7} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'429 p50':>8} {'429 p99':>8}")  # fmt: skip
    for admission in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            port, fleet, sidecar, envoy = stack(Path(tmp), admission, args.free_share)
            try:
                load(port, 10, 1.0, 2, args.seed)  # warm connections and caches
                if admission:
                    unloaded = load(port, capacity_rps / 3, 1.0, args.seconds, args.seed)
                    summary("unloaded (1/3 capacity)", unloaded)
                overloaded = load(port, 2 * capacity_rps, args.premium_share, args.seconds, args.seed + 1)
                summary("2x overload" + ("" if admission else ", no admission"), overloaded)
                if admission:
                    base = sorted(s for _, status, s in unloaded if status == 200)
                    high = sorted(s for tier, status, s in overloaded if tier == "premium" and status == 200)
                    ratio = high[int(0.99 * len(high))] / base[int(0.99 * len(base))]
                    print(f"  premium p99 under 2x overload / unloaded: {ratio:.2f} (target <= 1.5)")
                    rate = 2 * capacity_rps
                    for share in sorted({args.free_share, 0.0}):
                        bound, served = queueing_bound(
                            rate * args.premium_share, rate * (1 - args.premium_share), share
                        )
                        print(
                            f"  the queueing bound with free share {share:g} (these rules on an ideal machine): "
                            f"premium p99 {bound:.2f}x the service time, {served:.1%} of free requests served"
                        )
                    print(f"  (median of premium waits: {statistics.median(high) * 1e3:.0f} ms)")
            finally:
                envoy.stop()
                sidecar.stop()
                fleet.stop()


if __name__ == "__main__":
    main()
