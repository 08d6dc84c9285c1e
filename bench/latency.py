"""The milliseconds the router adds, and the load one sidecar carries, through a real Envoy.

    python bench/latency.py                 # full run (~25 minutes), prints tables
    python bench/latency.py --quick         # one repetition, shorter runs
    python bench/latency.py --quick --configs rules --baseline /tmp/base   # and a checkout before

Setup: a front Envoy, the sidecar in its own process (Unix socket), and a fast upstream (a
second Envoy answering every request at once from four ports, so the upstream costs ~nothing).
The baseline is the same front Envoy routing straight to the upstream, without ext_proc,
measured in the same run. With ``--baseline DIR`` every sidecar configuration also runs from that
checkout (``<config>@baseline``), in the same run, to compare code before and after a change.

Configurations:
  trivial     the floor: bench/trivial_extproc.py (one JSON parse, a model rewrite, two headers;
              Envoy's default two round trips), the issue's reference processor, same run
  rules       keyword/header/token rules; Envoy balances the model's cluster
  fallback    rules, with a fallback model on every request (a chained request: issue 20)
  affinity    rules + the router picks the replica (prefix affinity, load, bounded load)
  classifier  a domain/complexity decision on every request (the encoder runs)

Load: h2load (Debian nghttp2-client) over HTTP/1.1. Closed loop to saturation for the maximum
throughput; open loop (--rps) at 50 and 200 req/s and at 50% and 80% of the measured maximum, with
per-request latencies from h2load's log. Classifier runs use a small asyncio client instead,
because each request must carry a different prompt (h2load repeats one body).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SidecarProcess, cpu_model, envoy_process, free_port
from extproc.envoy.options import EnvoyOptions
from extproc.envoy.process import EnvoyProcess

ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101},
    }
).decode()

POLICIES = {
    "rules": """
version: 1
default_model: small
models:
  small: {upstream_model: llama-3.1-8b-instruct}
  large: {upstream_model: llama-3.1-70b-instruct}
decisions:
  - {name: vip, when: {header: {name: x-user-tier, equals: premium}}, model: large}
  - {name: code, when: {keyword: {any: ["traceback", "segfault", "```"], scope: user}}, model: large}
  - {name: long, when: {tokens: {min: 100000}}, model: large}
""",
    # rules, and every request gets a fallback model Envoy retries on a failure: the chain route,
    # its plan in the metadata and the clusters' per-attempt Lua filter, on the happy path.
    "fallback": """
version: 1
default_model: small
models:
  small: {upstream_model: llama-3.1-8b-instruct}
  large: {upstream_model: llama-3.1-70b-instruct}
decisions:
  - {name: vip, when: {header: {name: x-user-tier, equals: premium}}, model: large}
  - {name: code, when: {keyword: {any: ["traceback", "segfault", "```"], scope: user}}, model: large}
  - {name: long, when: {tokens: {min: 100000}}, model: large}
  - {name: rest, model: small, fallbacks: [large]}
""",
    "affinity": """
version: 1
default_model: small
models:
  small: {upstream_model: llama-3.1-8b-instruct, replicas: {static: UPSTREAMS, envoy: override_host}}
  large: {upstream_model: llama-3.1-70b-instruct, replicas: {static: UPSTREAMS, envoy: override_host}}
decisions:
  - {name: vip, when: {header: {name: x-user-tier, equals: premium}}, model: large}
  - {name: code, when: {keyword: {any: ["traceback", "segfault", "```"], scope: user}}, model: large}
""",
    "classifier": """
version: 1
default_model: small
classifier: {max_batch: 16, max_wait_ms: 0}
models:
  small: {upstream_model: llama-3.1-8b-instruct}
  large: {upstream_model: llama-3.1-70b-instruct}
decisions:
  - {name: code, when: {keyword: {any: ["traceback", "segfault"]}}, model: large}
  - {name: hard-stem, when: {all: [{domain: [math, physics, chemistry]}, {complexity: {above: 0.6}}]}, model: large}
""",
}

# Same policy, another sidecar setting: the event loop A/B behind uvloop being the default.
CONFIG_VARIANTS = {
    "rules-asyncio": ("rules", {"EXTPROC_UVLOOP": "0"}),
    "classifier-spin": ("classifier", {"EXTPROC_ORT_SPINNING": "1"}),
    "classifier-nospin": ("classifier", {"EXTPROC_ORT_SPINNING": "0"}),
}

WORDS = [
    "the",
    "quarterly",
    "review",
    "covered",
    "revenue",
    "costs",
    "hiring",
    "plans",
    "risks",
    "customers",
    "regions",
    "products",
    "suppliers",
    "logistics",
    "pricing",
    "forecasts",
    "margins",
    "inventory",
    "marketing",
    "research",
    "compliance",
]


def prose(tokens: int, salt: int = 0) -> str:
    """Roughly `tokens` WordPiece tokens of plain English (one word ~ one token); a different
    text for every salt (the salt is written into it), so the classifier's cache never answers."""
    words = [WORDS[(i * 7 + salt) % len(WORDS)] for i in range(tokens)]
    if salt:
        words[:2] = ["ticket", str(salt)]
    return " ".join(words)


def chat_body(tokens: int, salt: int = 0) -> bytes:
    return orjson.dumps({"model": "auto", "messages": [{"role": "user", "content": prose(tokens, salt)}]})


def new_turn_body(history_tokens: int, turn_tokens: int, salt: int) -> bytes:
    """A long conversation (always the same history) with a new last user message."""
    messages = [{"role": "system", "content": "You are a careful analyst."}]
    per_turn = 200
    for t in range(history_tokens // per_turn // 2):
        messages.append({"role": "user", "content": prose(per_turn, 1000 + t)})
        messages.append({"role": "assistant", "content": prose(per_turn, 2000 + t)})
    messages.append({"role": "user", "content": f"question {salt}: " + prose(turn_tokens, salt)})
    return orjson.dumps({"model": "auto", "messages": messages})


# --- the Envoys ------------------------------------------------------------------------------------


def upstream_config(ports: list[int], admin: int) -> dict:
    listeners = []
    for port in ports:
        listeners.append(
            {
                "name": f"u{port}",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [
                    {
                        "filters": [
                            {
                                "name": "envoy.filters.network.http_connection_manager",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                    "stat_prefix": f"u{port}",
                                    "route_config": {
                                        "virtual_hosts": [
                                            {
                                                "name": "all",
                                                "domains": ["*"],
                                                "routes": [
                                                    {
                                                        "match": {"prefix": "/"},
                                                        "direct_response": {
                                                            "status": 200,
                                                            "body": {"inline_string": ANSWER},
                                                        },
                                                    }
                                                ],
                                            }
                                        ]
                                    },
                                    "http_filters": [
                                        {
                                            "name": "envoy.filters.http.router",
                                            "typed_config": {
                                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                            },
                                        }
                                    ],
                                },
                            }
                        ]
                    }
                ],
            }
        )
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": listeners},
    }


def baseline_config(listen: int, admin: int, ports: list[int]) -> dict:
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "llm",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "llm",
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "llm",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {
                                                            "match": {"prefix": "/"},
                                                            "route": {"cluster": "upstream", "timeout": "60s"},
                                                        }
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "upstream",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "lb_policy": "LEAST_REQUEST",
                    "load_assignment": {
                        "cluster_name": "upstream",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}
                                        }
                                    }
                                    for p in ports
                                ]
                            }
                        ],
                    },
                }
            ],
        },
    }


def trivial_config(listen: int, admin: int, ports: list[int], uds: Path) -> dict:
    """The baseline plus an ext_proc filter in Envoy's default mode, for bench/trivial_extproc.py."""
    config = baseline_config(listen, admin, ports)
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"].insert(
        0,
        {
            "name": "envoy.filters.http.ext_proc",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
                "grpc_service": {"envoy_grpc": {"cluster_name": "trivial"}, "timeout": "1s"},
                "processing_mode": {
                    "request_header_mode": "SEND",
                    "response_header_mode": "SKIP",
                    "request_body_mode": "BUFFERED",
                    "response_body_mode": "NONE",
                },
            },
        },
    )
    config["static_resources"]["clusters"].append(
        {
            "name": "trivial",
            "type": "STATIC",
            "connect_timeout": "0.25s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            "load_assignment": {
                "cluster_name": "trivial",
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": str(uds)}}}}]}],
            },
        }
    )
    return config


class TrivialProcess(SidecarProcess):
    """bench/trivial_extproc.py in a subprocess (no health service: ready when its socket is)."""

    def __init__(self, uds: Path) -> None:
        super().__init__(Path(), uds, 0)

    def start(self, timeout: float = 30.0) -> None:
        script = Path(__file__).with_name("trivial_extproc.py")
        self.log = open(self.uds.with_suffix(".log"), "wb")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [sys.executable, str(script), "--uds", str(self.uds)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout
        while not self.uds.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"trivial ext_proc did not start: {self.uds.with_suffix('.log').read_text()}")
            time.sleep(0.1)


# --- load ------------------------------------------------------------------------------------------


@dataclass
class Result:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    seconds: float = 0.0
    degraded: int = 0  # answered, but routed without classifier signals (its time budget ran out)

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0


def h2load(port: int, body: Path, *, seconds: float, clients: int, rps: float | None, workdir: Path) -> Result:
    log = workdir / "h2load.tsv"
    log.unlink(missing_ok=True)
    args = [
        "h2load",
        "--h1",
        "-c",
        str(clients),
        "-D",
        str(int(seconds)),
        "-d",
        str(body),
        "-H",
        "content-type: application/json",
        "--log-file",
        str(log),
        "-T",
        "30",
        "-N",
        "30",
    ]
    if rps is not None:
        args += ["--rps", f"{rps / clients:.3f}"]
    started = time.monotonic()
    output = subprocess.run(
        [*args, f"http://127.0.0.1:{port}/v1/chat/completions"], capture_output=True, text=True, timeout=seconds + 120
    )
    elapsed = time.monotonic() - started
    result = Result(seconds=min(elapsed, seconds) if rps is not None else seconds)
    for line in log.read_text().splitlines() if log.exists() else []:
        _, status, micros = line.split("\t")[:3]
        if status == "200":
            result.latencies_ms.append(int(micros) / 1000)
        else:
            result.errors += 1
    if "succeeded" in output.stdout:
        failed = [line for line in output.stdout.splitlines() if line.startswith("requests:")]
        if failed:
            fields = failed[0].replace(",", "").split()
            result.errors = max(
                result.errors, int(fields[fields.index("failed") - 1]) + int(fields[fields.index("errored") - 1])
            )
    return result


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes) -> bool:
    """One chat completion over a kept-alive HTTP/1.1 connection; True on a 200."""
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: b\r\ncontent-type: application/json\r\n"
        f"content-length: {len(payload)}\r\n\r\n"
    ).encode()
    writer.write(head + payload)
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)
    return b" 200 " in status_line


async def _python_open_loop(port: int, rate: float, seconds: float, body: Callable[[int], bytes]) -> Result:
    result = Result(seconds=seconds)
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def one(i: int) -> None:
        connection = idle.pop() if idle else await asyncio.open_connection("127.0.0.1", port)
        reader, writer = connection
        start = time.perf_counter()
        try:
            if await _post(reader, writer, body(i)):
                result.latencies_ms.append((time.perf_counter() - start) * 1000)
                idle.append(connection)
            else:
                result.errors += 1
                writer.close()
        except (OSError, asyncio.IncompleteReadError, ValueError):
            result.errors += 1
            writer.close()

    tasks = []
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)
    for _, writer in idle:
        writer.close()
    return result


async def _python_closed_loop(port: int, clients: int, seconds: float, body: Callable[[int], bytes]) -> Result:
    result = Result(seconds=seconds)
    deadline = time.monotonic() + seconds
    counter = iter(range(1 << 62))

    async def client() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                payload = body(next(counter))
                start = time.perf_counter()
                if await _post(reader, writer, payload):
                    result.latencies_ms.append((time.perf_counter() - start) * 1000)
                else:
                    result.errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return result


def python_closed_loop(port: int, clients: int, seconds: float, body: Callable[[int], bytes]) -> Result:
    return asyncio.run(_python_closed_loop(port, clients, seconds, body))


def python_open_loop(port: int, rate: float, seconds: float, body: Callable[[int], bytes]) -> Result:
    return asyncio.run(_python_open_loop(port, rate, seconds, body))


# --- one configuration -------------------------------------------------------------------------------


class Front:
    """The front Envoy, with or without the sidecar behind it."""

    def __init__(
        self, name: str, workdir: Path, upstream_ports: list[int], concurrency: int, checkout: Path | None = None
    ) -> None:
        policy_name, env = CONFIG_VARIANTS.get(name.split("@")[0], (name.split("@")[0], {}))
        self.name, self.workdir = name, workdir / name
        self.workdir.mkdir()
        self.port = free_port()
        self.sidecar: SidecarProcess | None = None
        if name == "baseline":
            config = baseline_config(self.port, free_port(), upstream_ports)
            self.envoy = EnvoyProcess(config, str(self.workdir), concurrency=concurrency)
        elif name == "trivial":
            self.sidecar = TrivialProcess(self.workdir / "trivial.sock")
            self.sidecar.start()
            config = trivial_config(self.port, free_port(), upstream_ports, self.sidecar.uds)
            self.envoy = EnvoyProcess(config, str(self.workdir), concurrency=concurrency)
        else:
            upstreams = "[" + ", ".join(f'"127.0.0.1:{p}"' for p in upstream_ports) + "]"
            policy_path = self.workdir / "policy.yaml"
            policy_path.write_text(POLICIES[policy_name].replace("UPSTREAMS", upstreams))
            endpoints = {c: [f"127.0.0.1:{p}" for p in upstream_ports] for c in ("small", "large")}
            uds = self.workdir / "extproc.sock"
            options = EnvoyOptions(
                listen_address="127.0.0.1",
                listen_port=self.port,
                admin_port=free_port(),
                extproc_uds=str(uds),
                xds_dir=str(self.workdir / "xds"),
                cluster_endpoints=endpoints,
                usage=False,
            )
            # The sidecar is its Envoy's control plane, as in the chart.
            self.sidecar = SidecarProcess(policy_path, uds, free_port(), env=env, envoy=options, cwd=checkout)
            self.sidecar.start()
            self.envoy = envoy_process(self.sidecar, str(self.workdir), concurrency)
        self.envoy.start()
        if policy_name == "fallback":
            # Measure what it claims: the happy path of a chained request (one attempt).
            headers = self.probe()
            assert headers.get("x-router-attempts") == "1", f"the fallback configuration did not chain: {headers}"

    def probe(self) -> dict[str, str]:
        """One request, for its response headers."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/v1/chat/completions",
            data=chat_body(100),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return {k.lower(): v for k, v in response.getheaders()}

    def stop(self) -> None:
        self.envoy.stop()
        if self.sidecar is not None:
            self.sidecar.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one repetition of short runs")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=1, help="front Envoy worker threads")
    parser.add_argument(
        "--configs",
        default="trivial,rules,affinity,classifier",
        help="trivial: the least a Python ext_proc does (bench/trivial_extproc.py); also: rules-asyncio",
    )
    parser.add_argument("--tokens", default="100,2000", help="prompt sizes for the h2load configurations")
    parser.add_argument(
        "--baseline", type=Path, help="a checkout of the code before a change: each sidecar config runs from it too"
    )
    parser.add_argument(
        "--classifier-clients",
        type=int,
        default=4,
        help="concurrent clients of the classifier's closed loop (16 x 64-token messages in one batch already "
        "take longer than the classifier's 300 ms budget on 2 cores)",
    )
    args = parser.parse_args()
    if args.quick:
        args.repeat, args.seconds = 1, 4
    configs = args.configs.split(",")

    with tempfile.TemporaryDirectory(prefix="extproc-bench-") as tmp:
        workdir = Path(tmp)
        bodies = {}
        for tokens in map(int, args.tokens.split(",")):
            bodies[tokens] = workdir / f"chat-{tokens}.json"
            bodies[tokens].write_bytes(chat_body(tokens))
        upstream_ports = [free_port() for _ in range(4)]
        upstream = EnvoyProcess(upstream_config(upstream_ports, free_port()), str(workdir), concurrency=1)
        upstream.start()
        rows: list[tuple] = []
        try:
            baseline = Front("baseline", workdir, upstream_ports, args.concurrency)
            fronts = {"baseline": baseline}
            try:
                for name in configs:
                    fronts[name] = Front(name, workdir, upstream_ports, args.concurrency)
                    if args.baseline is not None and name != "trivial":
                        at = f"{name}@baseline"
                        fronts[at] = Front(at, workdir, upstream_ports, args.concurrency, args.baseline.resolve())
                rows = run_matrix(fronts, bodies, args, workdir)
            finally:
                for front in fronts.values():
                    front.stop()
        finally:
            upstream.stop()
    print_report(rows, args)
    return 0


def run_matrix(
    fronts: dict[str, Front], bodies: dict[int, Path], args: argparse.Namespace, workdir: Path
) -> list[tuple]:
    rows = []
    baseline = fronts["baseline"]
    for tokens, body in bodies.items():
        # Closed loop to saturation: Envoy alone, the ceiling every configuration is measured
        # under, and every configuration in turn, one run of each per round, so that a shared
        # machine's load drifting during the run weighs on all of them alike.
        measured = [n for n in fronts if n != "baseline" and not n.startswith("classifier")]
        base_rates: list[float] = []
        cpu: dict[str, float] = dict.fromkeys(measured, 0.0)
        saturation: dict[str, list[Result]] = {n: [] for n in measured}
        for _ in range(args.repeat):
            base_rates.append(closed(baseline, body, args, workdir).rate)
            for name in measured:
                front = fronts[name]
                cpu0 = front.sidecar.cpu_seconds()
                saturation[name].append(closed(front, body, args, workdir))
                cpu[name] += front.sidecar.cpu_seconds() - cpu0
        base_max = statistics.median(base_rates)
        peaks = {n: statistics.median(r.rate for r in saturation[n]) for n in measured}
        cpu_ms = {n: cpu[n] / max(1, sum(len(r.latencies_ms) for r in saturation[n])) * 1000 for n in measured}
        # Open loop, rate by rate, each configuration in turn beside Envoy alone.
        found: dict[str, list[tuple]] = {n: [] for n in measured}
        for share in (50, 200, 0.5, 0.8):
            for name in measured:
                front = fronts[name]
                rate = share if share > 1 else round(share * peaks[name])
                clients = min(16, max(2, rate // 25))
                pair = [
                    [
                        h2load(t.port, body, seconds=args.seconds, clients=clients, rps=rate, workdir=workdir)
                        for _ in range(args.repeat)
                    ]
                    for t in (baseline, front)
                ]
                found[name].append(
                    (name, tokens, rate, pair[0], pair[1], peaks[name], base_max, cpu_ms[name], front.sidecar.rss_mb())
                )
        for name in measured:
            rows.extend(found[name])
    for name in fronts:
        if name.startswith("classifier"):
            rows.extend(classifier_rows(fronts, name, args))
    return rows


def closed(front: Front, body: Path, args: argparse.Namespace, workdir: Path) -> Result:
    return h2load(front.port, body, seconds=args.seconds, clients=32, rps=None, workdir=workdir)


def classifier_rows(fronts: dict[str, Front], name: str, args: argparse.Namespace) -> list[tuple]:
    """Every request carries a prompt the classifier has not seen, so its cache never answers."""
    baseline, front = fronts["baseline"], fronts[name]
    scenarios = {
        "64-token messages": lambda i: chat_body(64, i),
        "new turn, 2k-token conversation": lambda i: new_turn_body(2000, 50, i),
    }
    rows = []
    salt = 0
    for label, make in scenarios.items():
        # Each run gets salts no other run used: a repeated prompt would be a cache hit.
        def runs_of(
            n: int, measure: Callable[[Callable[[int], bytes]], Result], target: Front = front, make=make
        ) -> list[Result]:
            nonlocal salt
            results = []
            for _ in range(n):
                salt += 1
                before = classifier_timeouts(target)
                result = measure(lambda i, base=salt * 1_000_000, make=make: make(base + i))
                result.degraded = classifier_timeouts(target) - before
                results.append(result)
            return results

        cpu0 = front.sidecar.cpu_seconds()
        saturation = runs_of(
            args.repeat, lambda body: python_closed_loop(front.port, args.classifier_clients, args.seconds, body)
        )
        cpu_ms = (front.sidecar.cpu_seconds() - cpu0) / max(1, sum(len(r.latencies_ms) for r in saturation)) * 1000
        # The maximum counts only requests that got their classifier signals: past the classifier's
        # time budget a request routes on the other signals, which is fast but not this service.
        peak = statistics.median((len(r.latencies_ms) - r.degraded) / r.seconds for r in saturation)
        for rate in sorted({20, round(0.5 * peak), round(0.8 * peak)}):
            pair = [
                runs_of(
                    args.repeat, lambda body, t=target, r=rate: python_open_loop(t.port, r, args.seconds, body), target
                )
                for target in (baseline, front)
            ]
            rows.append((name, label, rate, pair[0], pair[1], peak, float("nan"), cpu_ms, front.sidecar.rss_mb()))
    return rows


def classifier_timeouts(front: Front) -> int:
    """Requests the sidecar routed without classifier signals because their budget ran out."""
    if front.sidecar is None or not front.sidecar.metrics_port:
        return 0
    with urllib.request.urlopen(f"http://127.0.0.1:{front.sidecar.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("extproc_signal_failures_total{") and 'signal="classifier"' in line
        )
    )


def _pcts(runs: list[Result]) -> tuple[float, float, float]:
    return tuple(statistics.median(r.pct(q) for r in runs) for q in (50, 90, 99))  # type: ignore[return-value]


def print_report(rows: list[tuple], args: argparse.Namespace) -> None:
    print(
        f"machine: {platform.machine()}, {cpu_model()}, {_cores()} cores; python {platform.python_version()}; "
        f"front Envoy concurrency {args.concurrency}; {args.repeat} runs x {args.seconds:.0f}s per point "
        "(medians of the per-run percentiles)"
    )
    print()
    header = (
        "config",
        "prompt",
        "rate",
        "base p50/p90/p99 ms",
        "ext p50/p90/p99 ms",
        "added p50/p90/p99 ms",
        "ext p99/p50",
        "errors",
        "max req/s (Envoy alone)",
        "sidecar CPU ms/req",
        "RSS MB",
    )
    table = [header]
    for name, tokens, rate, base, ext, peak, base_max, cpu_ms, rss in rows:
        b, e = _pcts(base), _pcts(ext)
        added = tuple(x - y for x, y in zip(e, b, strict=True))
        errors = f"{sum(r.errors for r in ext)} ({sum(r.degraded for r in ext)})"
        table.append(
            (
                name,
                f"{tokens} tok" if isinstance(tokens, int) else tokens,
                f"{rate}/s",
                "/".join(f"{v:.2f}" for v in b),
                "/".join(f"{v:.2f}" for v in e),
                "/".join(f"{v:+.2f}" for v in added),
                f"{e[2] / e[0]:.1f}",
                str(errors),
                "-" if peak != peak else f"{peak:.0f}" + ("" if base_max != base_max else f" ({base_max:.0f})"),
                "-" if cpu_ms != cpu_ms else f"{cpu_ms:.3f}",
                f"{rss:.0f}",
            )
        )
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _cores() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    sys.exit(main())
