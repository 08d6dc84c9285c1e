"""Normal traffic beside a stream of hostile requests, through the real Envoy, while the policy
is reloaded again and again, while the sidecar restarts, and beside a thousand idle
connections. Every normal request is answered as usual (or, while the sidecar is away, gets the
fast JSON 503 it documents); every hostile one gets its own answer; no lease is left behind."""

from __future__ import annotations

import itertools
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator

import orjson
import pytest

from extproc.app import Runtime
from extproc.standin import StandIn
from tests.adversarial.hostile import BODY, Answer, assert_still_serving, request, send
from tests.harness import Stack, chat, wait_for

pytestmark = pytest.mark.e2e

POLICY = """
version: 1
default_model: small
models:
  small: {upstream_model: small-8b, replicas: {static: ["$s1", "$s2"], envoy: original_dst}}
  large: {upstream_model: large-70b, replicas: {static: ["$l1"], envoy: original_dst}}
decisions:
  - {name: code, when: {keyword: [segfault]}, model: $code_model}
"""
HALF = request()[: -len(BODY) // 2]

# (hostile request, the statuses it may get; 0: the connection closed without an answer)
HOSTILE: list[tuple[bytes, set[int]]] = [
    (request(body=b'{"model": "auto", "messages": ['), {400}),
    (request(body=orjson.dumps(chat("x", model="gpt-9"))), {404}),
    (request("/v1/chat%2Fcompletions"), {400}),
    (request("/V1/chat/completions"), {404}),
    (request("/v1/embeddings"), {404}),
    (request(headers=[("x-session-id", b"\xff\xfe")]), {400}),
    (request(headers=[("x-note", b"a\x00b")]), {400}),
    (request(headers=[("x-gateway-destination-endpoint", "10.9.9.9:80")]), {200}),
    (request(body=orjson.dumps(chat("a" * 200_000))), {200}),
    (request(body=b"\xef\xbb\xbf" + BODY), {400}),
    (request(headers=[("content-encoding", "gzip")]), {415}),
    (b"GARBAGE\r\n\r\n", {400}),
]


def normal(port: int) -> Answer:
    return send(port, request(body=orjson.dumps(chat(f"hello {random.random()}"))), timeout=10)


class Traffic:
    """Normal and hostile clients until stopped; what each got."""

    def __init__(self, port: int, normal_clients: int = 3, hostile_clients: int = 2) -> None:
        self.port = port
        self.normal: list[tuple[float, int, str]] = []  # (time, status, error code or router model)
        self.hostile: list[tuple[int, set[int]]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._normal) for _ in range(normal_clients)]
        self.threads += [threading.Thread(target=self._hostile, args=(i,)) for i in range(hostile_clients)]

    def _normal(self) -> None:
        while not self.stop.is_set():
            answer = normal(self.port)
            label = answer.headers.get("x-router-model", "")
            if answer.status != 200 and answer.body.startswith(b"{"):
                label = answer.error["code"]
            self.normal.append((time.monotonic(), answer.status, label))

    def _hostile(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            if rng.random() < 0.2:  # leave mid-body, or reset right after sending
                conn = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                conn.sendall(HALF if rng.random() < 0.5 else request())
                conn.close()
                continue
            data, allowed = rng.choice(HOSTILE)
            self.hostile.append((send(self.port, data, timeout=10).status, allowed))

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def wait_for_normal(self, count: int) -> None:
        target = len(self.normal) + count
        wait_for(lambda: len(self.normal) >= target, timeout=30)


def no_lease_left(stack: Stack) -> None:
    wait_for(lambda: stack.inflight() == {}, timeout=5)
    assert stack.sidecar.run(lambda: stack.sidecar.router.tracker.open_leases) == 0


def hostile_as_documented(traffic: Traffic, also: set[int] = frozenset()) -> None:
    wrong = [(status, allowed) for status, allowed in traffic.hostile if status not in allowed | also]
    assert traffic.hostile and not wrong, wrong[:5]


@pytest.fixture
def live(tmp_path) -> Iterator[Stack]:
    with Stack(
        tmp_path,
        POLICY,
        [StandIn(name=n) for n in ("s1", "s2", "l1")],
        substitutions={"code_model": "large"},
        sidecar_settings={"reload": True, "reload_debounce": 0.1, "shutdown_grace": 1.0},
    ) as stack:
        yield stack


def reloads(stack: Stack) -> float:
    line = 'extproc_config_reloads_total{result="success"} '
    return sum(float(x.rsplit(" ", 1)[1]) for x in stack.metrics_text().splitlines() if x.startswith(line))


def test_reloading_the_policy_again_and_again_under_attack_fails_no_normal_request(live: Stack) -> None:
    code = orjson.dumps(chat("why does this segfault?"))
    text = live.config_path.read_text()
    with Traffic(live.port) as traffic:
        for model in itertools.islice(itertools.cycle(["small", "large"]), 6):
            before = reloads(live)
            live.config_path.write_text(text.replace("model: large}", f"model: {model}}}"))
            wait_for(lambda b=before: reloads(live) > b, timeout=10)
            answer = send(live.port, request(body=code))
            assert answer.headers["x-router-model"] == model  # the new policy routes
            traffic.wait_for_normal(5)
    assert [n for n in traffic.normal if n[1:] != (200, "small")] == []
    hostile_as_documented(traffic)
    no_lease_left(live)


def test_a_sidecar_restart_under_attack_costs_only_fast_json_503s_while_it_is_away(live: Stack) -> None:
    with Traffic(live.port) as traffic:
        traffic.wait_for_normal(10)
        down = time.monotonic()
        live.sidecar.call(live.sidecar.runtime.stop())
        time.sleep(0.5)
        live.sidecar.runtime = Runtime(live.sidecar.settings)
        live.sidecar.call(live.sidecar.runtime.start())
        wait_for(lambda: normal(live.port).status == 200, timeout=20)
        back = time.monotonic()
        traffic.wait_for_normal(10)
    before = [n for n in traffic.normal if n[0] < down]
    after = [n for n in traffic.normal if n[0] > back + 0.1]
    away = [n for n in traffic.normal if down <= n[0] <= back + 0.1]
    assert all(n[1:] == (200, "small") for n in before + after), Counter(n[1:] for n in before + after)
    assert {n[1:] for n in away} <= {(200, "small"), (503, "router_unavailable")}, Counter(n[1:] for n in away)
    hostile_as_documented(traffic, also={503})  # (routed ones got the same 503 while it was away)
    no_lease_left(live)


def test_a_thousand_idle_connections_hold_up_no_request(live: Stack) -> None:
    idle: list[socket.socket] = []
    try:
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", live.port), timeout=10))
        for conn in idle[:100]:  # some have spoken once and keep the connection open
            conn.sendall(request())
        for _ in range(10):
            assert_still_serving(live)
        for conn in idle[:100]:
            assert conn.recv(16).startswith(b"HTTP/1.1 200")
    finally:
        for conn in idle:
            conn.close()
    no_lease_left(live)
