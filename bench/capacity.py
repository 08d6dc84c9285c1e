"""What one router pod needs per expected request rate: the sidecar's and Envoy's CPU and memory
at a few steady rates, for the chart's requests and limits (deploy/helm/extproc/README.md,
"Capacity").

    python bench/capacity.py                # ~10 minutes: 3 runs x 20 s per rate
    python bench/capacity.py --quick        # one run of 8 s per rate

Setup as in bench/latency.py: a front Envoy with the chart's two workers, the sidecar in its own
process as its control plane (Unix socket), and a fast upstream (a second Envoy answering at
once), so what is measured is the router pod and not a model server. A baseline of the front Envoy
alone (no ext_proc, the same routes), then two policies: rules only (keywords, headers, tokens;
h2load open loop, one body), and a classifier decision on every request (an asyncio open loop, every prompt new so the cache never answers). For each rate it
reads the sidecar's and Envoy's CPU time and resident memory from /proc before and after, and
reports CPU as cores (CPU seconds per wall second), requests per second per sidecar core (the
rate done over the sidecar's cores: the inverse of its CPU cost per request), the highest RSS
seen, latency and errors. The
idle pod is measured the same way, in the same run.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_model, free_port, process_cpu_seconds, process_rss_mb
from bench.latency import Front, Result, chat_body, h2load, python_open_loop, upstream_config
from extproc.envoy.process import EnvoyProcess


@dataclass
class Sample:
    rate: float
    achieved: float
    p50: float
    p99: float
    errors: int
    sidecar_cores: float
    envoy_cores: float
    sidecar_rss: float
    envoy_rss: float


class Watch:
    """CPU time and the highest RSS of the sidecar and Envoy over one load step."""

    def __init__(self, front: Front) -> None:
        self.pids = {"envoy": front.envoy.pid}
        if front.sidecar is not None:  # none for the baseline, Envoy alone
            self.pids["sidecar"] = front.sidecar.pid
        self.peak = {name: 0.0 for name in self.pids}
        self._stop = threading.Event()

    def __enter__(self) -> Watch:
        self.cpu0 = {name: process_cpu_seconds(pid) for name, pid in self.pids.items()}
        self.t0 = time.monotonic()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.5):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], process_rss_mb(pid))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        wall = time.monotonic() - self.t0
        self.cores = {name: (process_cpu_seconds(pid) - self.cpu0[name]) / wall for name, pid in self.pids.items()}
        for name, pid in self.pids.items():
            self.peak[name] = max(self.peak[name], process_rss_mb(pid))


def step(front: Front, rate: float, seconds: float, load) -> Sample:
    with Watch(front) as watch:
        result: Result = load(rate, seconds)
    return Sample(
        rate,
        result.rate,
        result.pct(50),
        result.pct(99),
        result.errors,
        watch.cores.get("sidecar", 0.0),
        watch.cores["envoy"],
        watch.peak.get("sidecar", 0.0),
        watch.peak["envoy"],
    )


def idle(front: Front, seconds: float) -> Sample:
    with Watch(front) as watch:
        time.sleep(seconds)
    nan = float("nan")
    return Sample(
        0,
        0,
        nan,
        nan,
        0,
        watch.cores.get("sidecar", 0.0),
        watch.cores["envoy"],
        watch.peak.get("sidecar", 0.0),
        watch.peak["envoy"],
    )


def median_sample(samples: list[Sample]) -> Sample:
    fields = Sample.__dataclass_fields__
    return Sample(
        **{
            name: (max if name.endswith("rss") or name == "errors" else statistics.median)(
                getattr(s, name) for s in samples
            )
            for name in fields
        }
    )


def fresh_prompts(front: Front):
    """An open loop of 64-token prompts never sent before, so the classifier runs on each."""

    def run(rate: float, seconds: float) -> Result:
        salt = time.monotonic_ns()
        return python_open_loop(front.port, rate, seconds, lambda i: chat_body(64, salt + i))

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rules-rates", default="50,100,200,400")
    parser.add_argument("--classifier-rates", default="5,10,20")
    parser.add_argument("--concurrency", type=int, default=2, help="front Envoy workers (the chart's default)")
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.seconds = 1, 8
    load_before = os.getloadavg()
    rows: list[tuple[str, Sample]] = []
    with tempfile.TemporaryDirectory(prefix="extproc-capacity-") as tmp:
        workdir = Path(tmp)
        body = workdir / "chat-100.json"
        body.write_bytes(chat_body(100))
        upstream_ports = [free_port() for _ in range(4)]
        upstream = EnvoyProcess(upstream_config(upstream_ports, free_port()), str(workdir), concurrency=1)
        upstream.start()
        try:

            def h2(front: Front):
                return lambda rate, seconds: h2load(
                    front.port,
                    body,
                    seconds=seconds,
                    clients=min(16, max(2, int(rate) // 25)),
                    rps=rate,
                    workdir=workdir,
                )

            for name, rates, load in (
                ("baseline", args.rules_rates, h2),  # Envoy alone, no ext_proc: what the router adds
                ("rules", args.rules_rates, h2),
                ("classifier", args.classifier_rates, fresh_prompts),
            ):
                front = Front(name, workdir, upstream_ports, args.concurrency)
                try:
                    run = load(front)
                    run(5, 3)  # warm up: connections, the encoder's first batches
                    rows.append((name, median_sample([idle(front, min(10, args.seconds)) for _ in range(args.repeat)])))
                    for rate in map(float, rates.split(",")):
                        rows.append(
                            (name, median_sample([step(front, rate, args.seconds, run) for _ in range(args.repeat)]))
                        )
                finally:
                    front.stop()
        finally:
            upstream.stop()
    load_after = os.getloadavg()
    print(
        f"machine: {platform.machine()}, {cpu_model()}, {os.cpu_count()} cores shared with other work "
        f"(load average {load_before[0]:.2f} before, {load_after[0]:.2f} after); front Envoy concurrency "
        f"{args.concurrency}; {args.repeat} runs x {args.seconds:.0f} s per rate, medians (RSS, errors: highest)"
    )
    print()
    header = (
        "policy",
        "req/s asked",
        "req/s done",
        "p50 ms",
        "p99 ms",
        "errors",
        "sidecar CPU (cores)",
        "req/s per sidecar core",
        "Envoy CPU (cores)",
        "sidecar RSS MB",
        "Envoy RSS MB",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, s in rows:
        asked = "idle" if s.rate == 0 else f"{s.rate:g}"
        done = "" if s.rate == 0 else f"{s.achieved:.1f}"
        p50 = "" if s.rate == 0 else f"{s.p50:.2f}"
        p99 = "" if s.rate == 0 else f"{s.p99:.2f}"
        per_core = f"{s.achieved / s.sidecar_cores:.0f}" if s.rate and s.sidecar_cores > 0 else ""
        sidecar = "" if name == "baseline" else f"{s.sidecar_cores:.3f}"
        sidecar_rss = "" if name == "baseline" else f"{s.sidecar_rss:.0f}"
        print(
            f"| {name} | {asked} | {done} | {p50} | {p99} | {s.errors} | {sidecar} | {per_core} | "
            f"{s.envoy_cores:.3f} | {sidecar_rss} | {s.envoy_rss:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
