"""Faults: the classifier fails or stalls, replicas vanish, the API server goes away, clients
hang up mid-stream, the sidecar restarts under a running Envoy."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
from pathlib import Path

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.app import Runtime
from extproc.replicas.pool import Discovery
from extproc.signals.classifier import ClassifierSignal
from extproc.standin import StandIn
from tests.harness import Stack, chat, free_port, wait_for
from tests.replicas.fake_apiserver import FakeApiServer, endpoint, endpoint_slice, port

pytestmark = pytest.mark.e2e

CLASSIFIED = """
version: 1
default_model: small
classifier: {enabled: false}
models:
  small: {replicas: {static: ["$s1"], envoy: original_dst}}
  large: {replicas: {static: ["$l1"], envoy: original_dst}}
decisions:
  - name: code
    when: {keyword: [segfault]}
    model: large
  - name: math
    when: {domain: [math]}
    model: large
"""


class _Failing:
    def cached(self, *args: object) -> bool:
        return False

    async def classify(self, text: str, *args: object):
        raise RuntimeError("encoder exploded")


class _Stalled(_Failing):
    async def classify(self, text: str, *args: object):
        await asyncio.sleep(30)


def failures(s: Stack, reason: str) -> float:
    match = re.search(
        rf'extproc_signal_failures_total{{reason="{reason}",signal="classifier"}} (\S+)', s.metrics_text()
    )
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize(
    ("classifier", "reason"), [(_Failing(), "error"), (_Stalled(), "timeout")], ids=["raises", "stalls"]
)
def test_a_failing_classifier_never_fails_the_request(tmp_path: Path, classifier: object, reason: str) -> None:
    with Stack(
        tmp_path, CLASSIFIED.replace("classifier: {enabled: false}\n", ""), [StandIn(name="s1"), StandIn(name="l1")]
    ) as s:
        # Fault injection: the encoder behind the classifier signal fails or hangs.
        s.sidecar.run(lambda: setattr(s.sidecar.router, "classifier", ClassifierSignal(classifier, 0.2)))
        response = s.post(chat("prove that sqrt(2) is irrational"))
        assert response.status == 200
        assert response.headers["x-router-model"] == "small"  # routed on what remained: the default
        assert s.post(chat("my program segfaults")).headers["x-router-model"] == "large"  # cheap rules still work
        assert failures(s, reason) >= 1


def test_no_ready_replica_falls_back_to_the_decisions_fallback_model(tmp_path: Path) -> None:
    policy = """
version: 1
default_model: big
models:
  big:
    replicas: {kubernetes: {namespace: llm, service: big}, envoy: original_dst}
  small:
    replicas: {static: ["$s1"], envoy: original_dst}
decisions:
  - {name: everything, model: big, fallbacks: [small]}
"""
    with (
        FakeApiServer() as api,
        Stack(
            tmp_path, policy, [StandIn(name="s1")], discovery=Discovery(api_client=api.api_client(), sync_timeout=10)
        ) as s,
    ):
        response = s.post(chat("hello"))
        assert response.status == 200 and response.headers["x-router-model"] == "small"


def test_the_kubernetes_api_going_away_keeps_the_last_known_replicas(tmp_path: Path) -> None:
    policy = """
version: 1
default_model: chat
models:
  chat: {replicas: {kubernetes: {namespace: llm, service: chat}, envoy: original_dst}}
"""
    with FakeApiServer() as api:
        s = Stack(
            tmp_path,
            policy,
            [StandIn(name="r1"), StandIn(name="r2")],
            discovery=Discovery(api_client=api.api_client(), sync_timeout=10),
        )
        s.fleet.start()
        s.fleet.start = lambda: None  # type: ignore[method-assign]
        for r in s.replicas:
            api.apply(
                endpoint_slice(
                    f"chat-{r.name}",
                    namespace="llm",
                    service="chat",
                    endpoints=[endpoint("127.0.0.1")],
                    ports=[port(r.port)],
                )
            )
        with s:
            assert {s.replica(s.post(chat(f"a{i}"))) for i in range(6)} == {"r1", "r2"}
            api.go_down()
            api.drop_watches()
            assert {s.replica(s.post(chat(f"b{i}"))) for i in range(6)} == {"r1", "r2"}
            api.come_back()
            api.delete("chat-r1", namespace="llm")
            wait_for(
                lambda: (
                    s.sidecar.run(lambda: s.sidecar.router.state.pools.endpoints("chat")) == (s.fleet["r2"].address,)
                )
            )
            assert {s.replica(s.post(chat(f"c{i}"))) for i in range(4)} == {"r2"}


def test_a_client_hanging_up_mid_stream_leaks_no_lease_or_task(tmp_path: Path) -> None:
    policy = """
version: 1
default_model: chat
models:
  chat: {replicas: {static: ["$r1"], envoy: original_dst}}
"""
    replica = StandIn(name="r1", gate=None)
    with Stack(tmp_path, policy, [replica]) as s:
        s.post(chat("warm up"))
        # The baseline once the access-log stream is open too (its first entry has arrived).
        wait_for(lambda: 'extproc_upstream_responses_total{code="2xx",model="chat"} 1.0' in s.metrics_text())
        wait_for(lambda: s.inflight() == {})
        tasks_before = s.sidecar.run(lambda: len(asyncio.all_tasks()))
        gate = s.fleet.call(_event())
        replica.gate = gate
        for i in range(5):
            body = orjson.dumps(chat(f"stream {i}", stream=True))
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body)
            )
            seen = b""
            while b"part 0" not in seen:
                seen += sock.recv(65536)
            assert s.inflight() == {replica.address: 1}
            sock.close()  # hang up with the stream half sent
            wait_for(lambda: s.inflight() == {})
        s.fleet.call(_set(gate))
        wait_for(lambda: replica.inflight == 0)
        wait_for(lambda: s.sidecar.run(lambda: len(asyncio.all_tasks())) <= tasks_before)
        assert s.post(chat("still fine")).status == 200


async def _event() -> asyncio.Event:
    return asyncio.Event()


async def _set(event: asyncio.Event) -> None:
    event.set()


def test_sidecar_restart_under_a_running_envoy(tmp_path: Path) -> None:
    policy = """
version: 1
default_model: chat
models:
  chat: {replicas: {static: ["$r1"], envoy: original_dst}}
"""
    with Stack(tmp_path, policy, [StandIn(name="r1")]) as s:
        assert s.post(chat("before")).status == 200
        s.sidecar.call(s.sidecar.runtime.stop())
        # failure_mode_allow is false: while the sidecar is away, clients get a fast, clear 503.
        down = s.post(chat("during"))
        assert down.status == 503
        assert down.headers["content-type"] == "application/json"
        assert down.json()["error"]["code"] == "router_unavailable"
        s.sidecar.runtime = Runtime(s.sidecar.settings)
        s.sidecar.call(s.sidecar.runtime.start())
        wait_for(lambda: s.post(chat("after")).status == 200)


def test_explanations_stay_off_unless_the_policy_allows_them(tmp_path: Path) -> None:
    policy = """
version: 1
default_model: chat
models:
  chat: {replicas: {static: ["$r1"], envoy: original_dst}}
"""
    with Stack(tmp_path, policy, [StandIn(name="r1")]) as s:
        response = s.post(chat("hi"), headers={"x-router-debug": "true"})
        assert response.status == 200 and "x-router-explain" not in response.headers


def test_tcp_with_tls_serves_only_tls_clients(tmp_path: Path) -> None:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    listen = f"127.0.0.1:{free_port()}"
    policy = """
version: 1
default_model: chat
models:
  chat: {replicas: {static: ["$r1"], envoy: original_dst}}
"""
    with Stack(
        tmp_path,
        policy,
        [StandIn(name="r1")],
        sidecar_settings={"listen": listen, "tls_cert": str(cert), "tls_key": str(key)},
    ):
        request = health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor")
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(listen.replace("127.0.0.1", "localhost"), credentials) as channel:
            assert health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status == 1
        with grpc.insecure_channel(listen) as channel, pytest.raises(grpc.RpcError):
            health_pb2_grpc.HealthStub(channel).Check(request, timeout=3)


def test_a_pii_policy_fails_closed_when_the_check_cannot_run(tmp_path: Path) -> None:
    policy = """
version: 1
default_model: external
models:
  external:
    replicas: {static: ["$e1"], envoy: original_dst}
    pii: {action: block, types: [US_SSN]}
  onprem: {replicas: {static: ["$p1"], envoy: original_dst}}
  relaxed:
    replicas: {static: ["$r1"], envoy: original_dst}
    pii: {action: block, on_error: allow}
decisions:
  - name: private
    when: {header: {name: x-user-tier, equals: private}}
    model: external
    pii: {action: reroute, model: onprem}
"""
    with Stack(tmp_path, policy, [StandIn(name="e1"), StandIn(name="p1"), StandIn(name="r1")]) as s:
        s.sidecar.run(lambda: setattr(s.sidecar.router, "classifier", ClassifierSignal(_Stalled(), 0.2)))
        blocked = s.post(chat("anything at all"))
        assert blocked.status == 503 and blocked.json()["error"]["code"] == "pii_check_unavailable"
        rerouted = s.post(chat("anything at all"), headers={"x-user-tier": "private"})
        assert rerouted.status == 200 and rerouted.headers["x-router-model"] == "onprem"
        relaxed = s.post(chat("anything at all", model="relaxed"))
        assert relaxed.status == 200 and relaxed.headers["x-router-model"] == "relaxed"
