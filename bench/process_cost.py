"""The sidecar's own work per request, in process: no Envoy, no gRPC transport, no other load.

    python bench/process_cost.py                          # rules and fallback, 5 x 3000 requests
    python bench/process_cost.py --configs fallback -n 20000 --repeat 4     # GC under a full RecentPlans
    valgrind --tool=callgrind python bench/process_cost.py -n 600 --repeat 1 --configs fallback
    EXTPROC_CHECKOUT=/tmp/before python bench/process_cost.py     # a checkout of the code before a change

Each request is what Envoy sends in the one-round-trip mode (the buffered body with the path,
method, request id and content-type as attributes), handled by the stream's Exchange and answered
(serialized); then its access-log entry, carrying the dynamic metadata of that answer as Envoy's
does, is accounted. Every request has its own request id. Prints microseconds of process CPU per
request (median of the repetitions) and what the cyclic garbage collector did. Under callgrind,
the difference between two runs of different ``-n`` divided by the difference of ``-n`` is the
instruction count per request: stable on a shared, noisy machine, where CPU time is not.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.environ.get("EXTPROC_CHECKOUT") or str(Path(__file__).resolve().parent.parent))

from bench.latency import POLICIES, chat_body
from extproc import accesslog, server
from extproc._pb.envoy.data.accesslog.v3 import accesslog_pb2
from extproc._pb.envoy.service.accesslog.v3 import als_pb2
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.app import Runtime, Settings
from extproc.policy import load_policy

ATTRIBUTES = "envoy.filters.http.ext_proc"


def request_message(body: bytes, request_id: str) -> bytes:
    message = pb.ProcessingRequest()
    message.request_body.body = body
    message.request_body.end_of_stream = True
    message.protocol_config.request_body_mode = 1  # BUFFERED
    fields = message.attributes[ATTRIBUTES].fields
    for key, value in (
        ("request.path", "/v1/chat/completions"),
        ("request.method", "POST"),
        ("request.id", request_id),
        ("request.headers['content-type']", "application/json"),
    ):
        fields[key].string_value = value
    return message.SerializeToString()


def log_message(answer: pb.ProcessingResponse, request_id: str) -> bytes:
    """The access-log entry Envoy sends for the request: 200 from upstream after one attempt,
    the answer's dynamic metadata as the request's."""
    message = als_pb2.StreamAccessLogsMessage()
    entry: accesslog_pb2.HTTPAccessLogEntry = message.http_logs.log_entry.add()
    entry.request.request_id = request_id
    entry.response.response_code.value = 200
    entry.response.response_code_details = "via_upstream"
    entry.common_properties.upstream_request_attempt_count = 1
    for namespace, value in answer.dynamic_metadata.fields.items():
        entry.common_properties.metadata.filter_metadata[namespace].CopyFrom(value.struct_value)
    return message.SerializeToString()


async def measure(name: str, n: int, repeat: int) -> tuple[list[float], dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        policy_path = Path(tmp) / "policy.yaml"
        policy_path.write_text(POLICIES[name])
        runtime = Runtime(Settings(config=policy_path, uds=None, metrics_port=None, reload=False))
        await runtime.apply(load_policy(policy_path))
    router = runtime.router
    assert router is not None
    body = chat_body(100)
    counter = iter(range(1 << 62))

    async def one() -> None:
        request_id = f"{next(counter):08d}-0000-4000-8000-000000000000"
        exchange = server.Exchange(router)
        answer = await exchange.handle(pb.ProcessingRequest.FromString(request_message(body, request_id)))
        assert answer is not None
        answer.SerializeToString()
        exchange.close()
        for entry in als_pb2.StreamAccessLogsMessage.FromString(log_message(answer, request_id)).http_logs.log_entry:
            accesslog.finished(router, entry)

    for _ in range(100):  # warm up: caches, the chain table, metric children
        await one()
    pauses: list[tuple[int, float]] = []
    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pauses.append((info["generation"], time.perf_counter() - started[0]))

    gc.callbacks.append(on_gc)
    try:
        runs = []
        for _ in range(repeat):
            t = time.process_time()
            for _ in range(n):
                await one()
            runs.append((time.process_time() - t) / n * 1e6)
    finally:
        gc.callbacks.remove(on_gc)
    full = [p for g, p in pauses if g == 2]
    stats = {
        "collections": len(pauses),
        "full": len(full),
        "longest full ms": max(full, default=0.0) * 1000,
        "tracked objects": len(gc.get_objects()),
    }
    return runs, stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="rules,fallback")
    parser.add_argument("-n", type=int, default=3000, help="requests per repetition")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for name in args.configs.split(","):
        runs, stats = asyncio.run(measure(name, args.n, args.repeat))
        print(
            f"{name}: {statistics.median(runs):.1f} us/request (runs {', '.join(f'{r:.0f}' for r in runs)}); "
            f"gc: {stats['collections']} collections, {stats['full']} full, longest full "
            f"{stats['longest full ms']:.0f} ms; {stats['tracked objects']} objects tracked"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
