"""A second sidecar started beside a live one (a rollout overlap, a mistaken restart), as real
`extproc serve` processes behind a real Envoy: the second is refused with one clear line and a
non-zero exit, touches nothing the first serves (its socket, nor the Envoy configuration it
publishes as Envoy's control plane), and the first keeps serving requests through Envoy, on the
connections Envoy had and on new ones. A socket left by a crashed sidecar is still taken over."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.envoy.options import EnvoyOptions
from extproc.envoy.process import EnvoyProcess
from extproc.envoy.render.bootstrap import render, render_bootstrap
from extproc.policy import load_policy
from extproc.standin import StandIn, StandInFleet
from tests.harness import chat, free_port, wait_for

pytestmark = pytest.mark.e2e

POLICY = """
version: 1
default_model: chat
models:
  chat: {replicas: {static: ["%s"], envoy: original_dst}}
"""


def serve(socket_path: Path, config: Path, metrics_port: int, *extra: str) -> subprocess.Popen[str]:
    args = ["--config", str(config), "--uds", str(socket_path), "--metrics-port", str(metrics_port)]
    return subprocess.Popen(
        [sys.executable, "-c", "import sys; from extproc.cli import main; sys.exit(main())", "serve", *args, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "EXTPROC_LOG_LEVEL": "warning"},
    )


def serving(socket_path: Path) -> bool:
    request = health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor")
    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=1).status
    except grpc.RpcError:
        return False
    return status == health_pb2.HealthCheckResponse.SERVING


def refused(process: subprocess.Popen[str]) -> tuple[int, list[str]]:
    """The exit code and the stderr lines of a sidecar that must stop on its own, promptly."""
    try:
        _, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        _, err = process.communicate()
        pytest.fail(f"the second sidecar kept running; stderr: {err[-2000:]}")
    return process.returncode, [line for line in err.splitlines() if line.strip()]


class Envoy:
    """A real Envoy in front of the sidecar socket, with a client for it: on the bootstrap that
    points at what the sidecar publishes (``options``), or on its own static configuration."""

    def __init__(
        self, workdir: Path, policy_path: Path, socket_path: Path, options: EnvoyOptions | None = None
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        if options is None:
            options = EnvoyOptions(
                listen_address="127.0.0.1",
                listen_port=free_port(),
                admin_port=free_port(),
                extproc_uds=str(socket_path),
            )
            config = render(load_policy(policy_path), options)
        else:
            config = render_bootstrap(options)
        self.port = options.listen_port
        self.process = EnvoyProcess(config, str(workdir))
        self.process.start()

    def ok(self, text: str) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request(
                "POST", "/v1/chat/completions", orjson.dumps(chat(text)), {"content-type": "application/json"}
            )
            response = connection.getresponse()
            response.read()
            return response.status == 200 and response.getheader("x-router-model") == "chat"
        finally:
            connection.close()

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture
def first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Path, Path, int, subprocess.Popen[str], Envoy]]:
    with StandInFleet([StandIn(name="r1")]) as fleet:
        config = tmp_path / "policy.yaml"
        config.write_text(POLICY % fleet["r1"].address)
        socket_path = tmp_path / "run" / "extproc.sock"
        metrics_port = free_port()
        options = EnvoyOptions(
            listen_address="127.0.0.1",
            listen_port=free_port(),
            admin_port=free_port(),
            extproc_uds=str(socket_path),
            xds_dir=str(tmp_path / "xds"),
        )
        # Every sidecar of the test is Envoy's control plane on the same directory (through the
        # environment, as `extproc serve --help` documents).
        monkeypatch.setenv("EXTPROC_XDS_DIR", options.xds_dir)
        monkeypatch.setenv("EXTPROC_ENVOY_LISTEN", f"127.0.0.1:{options.listen_port}")
        monkeypatch.setenv("EXTPROC_ENVOY_ADMIN", f"127.0.0.1:{options.admin_port}")
        process = serve(socket_path, config, metrics_port)
        envoy = None
        try:
            wait_for(lambda: serving(socket_path) or process.poll() is not None, timeout=60)
            assert process.poll() is None, process.communicate()[1]
            envoy = Envoy(tmp_path / "envoy", config, socket_path, options)
            assert envoy.ok("before")
            yield socket_path, config, metrics_port, process, envoy
        finally:
            if envoy is not None:
                envoy.stop()
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.communicate(timeout=30)


def published(tmp_path: Path) -> dict[Path, tuple[int, bytes]]:
    """The Envoy configuration files the first sidecar publishes: identity and content."""
    return {p: (p.stat().st_ino, p.read_bytes()) for p in (tmp_path / "xds").rglob("*.json")}


def assert_first_still_serves(tmp_path: Path, first, inode: int, files: dict[Path, tuple[int, bytes]]) -> None:
    socket_path, config, _, process, envoy = first
    assert process.poll() is None
    assert socket_path.stat().st_ino == inode  # the same socket file: not unlinked, not replaced
    assert files and published(tmp_path) == files  # Envoy's configuration untouched
    assert all(envoy.ok(f"after {i}") for i in range(5))  # on the connection Envoy already had
    fresh = Envoy(tmp_path / f"envoy-fresh-{time.monotonic_ns()}", config, socket_path)
    try:
        assert all(fresh.ok(f"fresh {i}") for i in range(5))  # and on a new one
    finally:
        fresh.stop()


def test_a_second_sidecar_on_the_same_socket_and_metrics_port_is_refused(tmp_path: Path, first) -> None:
    socket_path, config, metrics_port, process, _ = first
    inode, files = socket_path.stat().st_ino, published(tmp_path)
    code, lines = refused(serve(socket_path, config, metrics_port))
    assert_first_still_serves(tmp_path, first, inode, files)
    assert code != 0
    assert len(lines) == 1 and f"unix:{socket_path}" in lines[0] and f"pid {process.pid}" in lines[0], lines


def test_a_second_sidecar_on_the_same_socket_never_takes_it_over(tmp_path: Path, first) -> None:
    socket_path, config, *_ = first
    inode, files = socket_path.stat().st_ino, published(tmp_path)
    code, lines = refused(serve(socket_path, config, free_port()))  # its own metrics port: nothing else stops it
    assert code != 0 and len(lines) == 1 and "another --uds" in lines[0], lines
    assert_first_still_serves(tmp_path, first, inode, files)


def test_a_metrics_port_clash_leaves_no_half_started_sidecar(tmp_path: Path, first) -> None:
    socket_path, config, metrics_port, *_ = first
    inode, files = socket_path.stat().st_ino, published(tmp_path)
    other = tmp_path / "other" / "extproc.sock"
    code, lines = refused(serve(other, config, metrics_port))
    assert code != 0 and len(lines) == 1 and f"metrics port 0.0.0.0:{metrics_port}" in lines[0], lines
    assert not other.exists()  # it bound nothing before failing
    assert_first_still_serves(tmp_path, first, inode, files)


def test_a_socket_left_by_a_crashed_sidecar_is_taken_over(tmp_path: Path, first) -> None:
    socket_path, config, metrics_port, process, envoy = first
    process.send_signal(signal.SIGKILL)  # no cleanup: the socket file and the lock file stay
    process.communicate(timeout=30)
    assert socket_path.exists()
    successor = serve(socket_path, config, metrics_port)
    try:
        wait_for(lambda: serving(socket_path) or successor.poll() is not None, timeout=60)
        assert successor.poll() is None, successor.communicate()[1]
        wait_for(lambda: envoy.ok("after the crash"), timeout=30)  # Envoy reconnects to the new process
    finally:
        successor.send_signal(signal.SIGTERM)
        successor.communicate(timeout=30)
    assert successor.returncode == 0
    assert not socket_path.exists()  # its own socket, removed on a clean stop
