"""``extproc demo``: the whole path on this machine, with the bundled policy and model.

Starts stand-in model servers on the replica addresses of the bundled policy, the sidecar on a
Unix socket as Envoy's control plane, and a real Envoy in front on the bootstrap the chart uses;
sends a handful of varied prompts through Envoy and prints where each one went. Needs no cluster
and no network.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from extproc import headers as h
from extproc.app import Runtime, Settings
from extproc.envoy.options import EnvoyOptions
from extproc.envoy.process import EnvoyProcess
from extproc.envoy.render.bootstrap import render_bootstrap
from extproc.policy import load_policy
from extproc.policy.load import DEFAULT_POLICY
from extproc.standin import StandIn

PRIVATE_REPLICA = "127.0.0.1:18301"


@dataclass(frozen=True)
class Sample:
    label: str
    body: dict
    headers: dict[str, str] | None = None
    path: str = "/v1/chat/completions"


def _chat(text: str, **extra: object) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], **extra}


SAMPLES = [
    Sample("small talk", _chat("What is a good name for a grey cat?")),
    Sample("code question", _chat("Why does this segfault?\n```c\nint *p = 0; *p = 1;\n```")),
    Sample(
        "multi-step physics",
        _chat(
            "A 2.0 kg block slides down a 30 degree incline with kinetic friction coefficient 0.25, then "
            "compresses a spring of constant 400 N/m. Find the maximum compression.\n"
            "A) 0.21 m\nB) 0.34 m\nC) 0.42 m\nD) 0.55 m"
        ),
    ),
    Sample("premium user", _chat("Summarise the plot of Hamlet."), {"x-user-tier": "premium"}),
    Sample("contains an SSN", _chat("My SSN is 078-05-1120, please fill in the W-4 form for me.")),
    Sample("explicit model", {"model": "large", "messages": [{"role": "user", "content": "Hello!"}]}),
    Sample("streaming", _chat("Count to three.", stream=True, stream_options={"include_usage": True})),
    Sample("session, turn 1", _chat("Let's plan a trip to Lisbon. " * 20), {"x-session-id": "trip-42"}),
    Sample(
        "session, turn 2",
        {
            "model": "auto",
            "messages": [
                {"role": "user", "content": "Let's plan a trip to Lisbon. " * 20},
                {"role": "assistant", "content": "Sure, when?"},
                {"role": "user", "content": "In May, for five days."},
            ],
        },
        {"x-session-id": "trip-42"},
    ),
    Sample(
        "responses API", {"model": "auto", "input": "Translate 'good morning' to Portuguese."}, path="/v1/responses"
    ),
    Sample("unknown model", {"model": "gpt-7", "messages": [{"role": "user", "content": "hi"}]}),
    Sample("malformed JSON", {"raw": '{"model": "auto", "messages": ['}),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _send(port: int, sample: Sample) -> tuple[int, dict[str, str], bytes, float]:
    raw = sample.body["raw"].encode() if "raw" in sample.body else orjson.dumps(sample.body)
    headers = {"content-type": "application/json", **(sample.headers or {})}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    start = time.perf_counter()
    connection.request("POST", sample.path, body=raw, headers=headers)
    response = connection.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - start
    connection.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, body, elapsed


async def _demo(keep_running: bool) -> int:
    policy = load_policy(DEFAULT_POLICY)
    addresses = sorted({e for m in policy.models.values() if m.replicas for e in m.replicas.static} | {PRIVATE_REPLICA})
    standins = [StandIn(name=f"replica-{a.rsplit(':', 1)[1]}", port=int(a.rsplit(":", 1)[1])) for a in addresses]
    for standin in standins:
        try:
            await standin.start()
        except OSError as exc:
            print(f"cannot start the stand-in model server on {standin.address}: {exc}", file=sys.stderr)
            return 1
    with tempfile.TemporaryDirectory(prefix="extproc-demo-") as tmp:
        uds = str(Path(tmp) / "extproc.sock")
        port = _free_port()
        options = EnvoyOptions(
            listen_address="127.0.0.1",
            listen_port=port,
            admin_port=_free_port(),
            extproc_uds=uds,
            xds_dir=str(Path(tmp) / "xds"),
            cluster_endpoints={"private": [PRIVATE_REPLICA]},
        )
        # The sidecar publishes Envoy's listener, routes and clusters before Envoy starts on the
        # bootstrap that points at them, as the chart's pod does.
        runtime = Runtime(
            Settings(
                config=DEFAULT_POLICY,
                uds=uds,
                metrics_port=_free_port(),
                metrics_address="127.0.0.1",
                reload=False,
                xds_dir=Path(options.xds_dir),
                envoy=options,
                envoy_admin=f"127.0.0.1:{options.admin_port}",
            )
        )
        await runtime.start()
        envoy = EnvoyProcess(render_bootstrap(options), tmp)
        try:
            await asyncio.to_thread(envoy.start)
            print(f"Envoy on 127.0.0.1:{port} -> extproc on {uds} -> {len(standins)} stand-in model servers\n")
            rows = []
            for sample in SAMPLES:
                status, headers, body, elapsed = await asyncio.to_thread(_send, port, sample)
                rows.append(_row(sample, status, headers, body, elapsed))
            _print_table(rows)
            if keep_running:
                print(
                    f"\nStill running: try  curl -s localhost:{port}/v1/chat/completions "
                    '-d \'{"model":"auto","messages":[{"role":"user","content":"hi"}]}\''
                )
                print("Ctrl-C to stop.")
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.Event().wait()
        finally:
            await asyncio.to_thread(envoy.stop)
            await runtime.stop()
            for standin in standins:
                await standin.stop()
    return 0 if all(r[1] for r in rows) else 1


def _row(sample: Sample, status: int, headers: dict[str, str], body: bytes, elapsed: float) -> tuple:
    expected_error = sample.label in ("unknown model", "malformed JSON")
    ok = (status == 200) != expected_error
    if status == 200:
        return (
            sample.label,
            ok,
            str(status),
            headers.get(h.ROUTER_MODEL, "-"),
            headers.get("x-replica", "-"),
            headers.get(h.ROUTER_DECISION, "-"),
            f"{elapsed * 1000:.1f}",
        )
    try:
        error = orjson.loads(body)["error"]
        what = f"{error['code']}: {error['message'][:48]}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        what = body[:60].decode(errors="replace")
    return (sample.label, ok, str(status), "-", "-", what, f"{elapsed * 1000:.1f}")


def _print_table(rows: list[tuple]) -> None:
    header = ("request", "status", "model", "replica", "decision", "ms")
    table = [header] + [(r[0], r[2], r[3], r[4], r[5], r[6]) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * width for width in widths))


def run_demo(keep_running: bool = False) -> int:
    from extproc import logs

    logs.setup("warning", json_lines=False)
    try:
        return asyncio.run(_demo(keep_running))
    except KeyboardInterrupt:
        return 0
