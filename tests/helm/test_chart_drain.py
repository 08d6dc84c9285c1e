"""Stopping the chart's pod as the kubelet does (tests/helm/pod.py ``terminate``): Envoy's preStop
hook (the chart's files/envoy-drain.sh, run by bash), SIGTERM to each container after its hook,
SIGKILL at the end of the rendered grace period, against a real Envoy, the sidecar and a slow
stand-in model server. A stream started before the stop finishes; while the pod drains, Envoy
fails readiness and asks new connections to go, then refuses them; the sidecar serves until Envoy
has exited; a stream longer than the drain bound is cut at the bound, within the grace period."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

from extproc.app import DRAIN_START_SECONDS
from extproc.standin import StandIn, StandInFleet
from tests.harness import chat, free_port, wait_for
from tests.helm.chart import render
from tests.helm.pod import Pod

pytestmark = pytest.mark.e2e

DELAY = 2  # preStopSleepSeconds: Envoy keeps accepting this long


@dataclass
class Stream:
    """A streamed chat answer read chunk by chunk on its own thread."""

    port: int
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    status: int = 0
    error: str = ""
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Stream:
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            body = orjson.dumps(chat("tell me a long story", stream=True))
            connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
            response = connection.getresponse()
            self.status = response.status
            while chunk := response.read1(65536):
                self.chunks.append((time.monotonic(), chunk))
        except (OSError, http.client.HTTPException) as exc:
            self.error = repr(exc)
        finally:
            connection.close()
            self.done.set()

    @property
    def text(self) -> bytes:
        return b"".join(chunk for _, chunk in self.chunks)


def post(port: int) -> tuple[int, str | None]:
    """One request on a new connection: (status, its connection header)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(
            "POST", "/v1/chat/completions", orjson.dumps(chat("hi")), {"content-type": "application/json"}
        )
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader("connection")
    finally:
        connection.close()


def refused(port: int) -> bool:
    try:
        post(port)
    except ConnectionRefusedError:
        return True
    return False


def stats_status(pod: Pod) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", pod.port("envoy", "envoy-stats"), timeout=5)
    try:
        connection.request("GET", "/stats/prometheus")
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def upstream_2xx(pod: Pod) -> float:
    port = pod.port("extproc", "metrics")
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("extproc_upstream_responses_total{") and 'code="2xx"' in line
    )


@pytest.fixture
def pod(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Pod, StandIn]]:
    chunks, drain = request.param
    slow = StandIn(name="slow", chunks=chunks, chunk_delay=1.0)
    with StandInFleet([slow]) as fleet:
        values = {
            "routing": {"version": 1, "default_model": "m", "models": {"m": {"replicas": {"static": [slow.address]}}}},
            "envoy": {
                "port": free_port(),
                "readinessPort": free_port(),
                "statsPort": free_port(),
                "adminPort": free_port(),
                "concurrency": 2,
            },
            "sidecar": {
                "socketDir": str(tmp_path / "run"),
                "healthPort": free_port(),
                "metricsPort": free_port(),
            },
            "preStopSleepSeconds": DELAY,
            "drainTimeoutSeconds": drain,
        }
        running = Pod(render(values), tmp_path)
        try:
            running.init()
            running.start("extproc")
            running.wait_ready("extproc", "readinessProbe", running.grpc_probe)
            running.start("envoy")
            running.wait_ready("envoy", "readinessProbe", running.http_probe)
            yield running, slow
        finally:
            running.stop()
            fleet.call(slow.kill())  # a stream cut at the bound would otherwise outlive the fleet


@pytest.mark.parametrize("pod", [(8, 60)], indirect=True, ids=["8s-stream-60s-bound"])
def test_a_stream_started_before_the_stop_finishes_and_the_pod_stops_when_it_has(pod) -> None:
    running, _slow = pod
    port = running.port("envoy", "http")
    answered_before = upstream_2xx(running)
    stream = Stream(port).start()
    wait_for(lambda: stream.chunks, timeout=20)  # the answer has begun
    started = time.monotonic()
    result: dict[str, float] = {}
    stopping = threading.Thread(target=lambda: result.update(running.terminate()))
    stopping.start()

    # The drain's first seconds: readiness fails, new connections are served and told to go.
    wait_for(lambda: not running.http_probe("envoy", "readinessProbe"), timeout=DELAY)
    status, connection = post(port)
    assert (status, connection) == (200, "close")  # routed by the sidecar, which still serves
    # Then Envoy stops accepting: a refused connection is safe to retry on another pod.
    wait_for(lambda: refused(port), timeout=DELAY + 5, interval=0.2)
    assert time.monotonic() - started >= DELAY - 0.5
    assert running.processes["envoy"].poll() is None  # still draining the stream
    # The readiness and stats listeners are not inbound and stay open: the liveness probe's TCP
    # connect and Prometheus still reach the draining Envoy.
    socket.create_connection(("127.0.0.1", running.port("envoy", "envoy-ready")), timeout=2).close()
    assert stats_status(running) == 200
    assert running.processes["extproc"].poll() is None  # and the sidecar with it

    assert stream.done.wait(60), "the stream never ended"
    stream_end = time.monotonic() - started
    assert stream.status == 200 and not stream.error, stream.error
    # all 8 chunks, the closing chunk with the finish reason, [DONE]
    assert stream.text.count(b"data: {") == 9 and b'"finish_reason":"stop"' in stream.text
    assert stream.text.rstrip().endswith(b"data: [DONE]")
    # The stream's access-log entry reached the sidecar before it stopped.
    wait_for(lambda: running.processes["extproc"].poll() is None and upstream_2xx(running) >= answered_before + 2)

    stopping.join(90)
    assert set(result) == {"extproc", "envoy"}
    assert stream_end <= result["envoy"] < stream_end + 5, (stream_end, result, running.hook_log("envoy"))
    assert result["envoy"] <= result["extproc"] < result["envoy"] + 5, result
    assert result["extproc"] < 60, "the pod waited for the bound instead of the stream"
    assert "no request in flight" in running.hook_log("envoy")


@pytest.mark.parametrize("pod", [(60, 3)], indirect=True, ids=["60s-stream-3s-bound"])
def test_a_stream_longer_than_the_drain_bound_is_cut_at_the_bound_within_the_grace_period(pod) -> None:
    running, _slow = pod
    stream = Stream(running.port("envoy", "http")).start()
    wait_for(lambda: stream.chunks, timeout=20)
    grace = running.rendered.pod["terminationGracePeriodSeconds"]
    assert grace == DELAY + 3 + 25
    exited = running.terminate()
    assert stream.done.wait(10)
    assert stream.text.count(b"data: {") < 60  # cut
    assert DELAY + 3 <= exited["envoy"] < DELAY + 3 + 5, (exited, running.hook_log("envoy"))
    assert max(exited.values()) < grace
    assert "requests still in flight after 3s" in running.hook_log("envoy")


@pytest.mark.parametrize("pod", [(3, 600)], indirect=True, ids=["idle-600s-bound"])
def test_an_idle_pod_stops_in_seconds_whatever_the_bound(pod) -> None:
    running, _slow = pod
    exited = running.terminate()
    assert exited["envoy"] < DELAY + 4, (exited, running.hook_log("envoy"))
    assert exited["extproc"] < exited["envoy"] + 5, exited


@pytest.mark.parametrize("pod", [(3, 600)], indirect=True, ids=["sidecar-only"])
def test_a_sidecar_stopped_alone_does_not_wait_for_an_envoy_that_is_not_draining(pod) -> None:
    """The kubelet restarting only the sidecar (its liveness probe failed) sends it SIGTERM with no
    drain of Envoy: the sidecar stops within seconds, and Envoy is left ready for its successor."""
    running, _slow = pod
    sidecar = running.processes["extproc"]
    started = time.monotonic()
    sidecar.terminate()
    sidecar.wait(30)
    assert time.monotonic() - started < DRAIN_START_SECONDS + 5
    assert running.http_probe("envoy", "readinessProbe")  # Envoy was never told to drain
    assert "is not draining" in running.log("extproc")
