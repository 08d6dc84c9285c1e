"""A large body whose routing outlasts Envoy's 1 s message_timeout (a busy machine parsing
100,000 messages): the sidecar asks Envoy first to wait for it (override_message_timeout, up to
the filter's max_message_timeout), so the client gets its answer, not 503; past the large body's
own deadline the sidecar answers 503 router_timeout itself. Normal requests beside it are served.

The slow parse is the real parse plus an injected delay (the sidecar runs in this process), so
the test does not depend on how fast this machine happens to be."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import orjson
import pytest

from extproc import lanes, request
from tests.adversarial.test_large_and_long import many_messages
from tests.harness import Response, Stack, chat

pytestmark = pytest.mark.e2e

NORMAL = chat("What is the capital of Portugal?")


@pytest.fixture
def slow_large_parse(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """Parsing a body over the large-body size takes `delay[0]` seconds longer (in its thread)."""
    delay = [1.6]
    parse = request.parse

    def slow(api: request.Api, raw: bytes) -> request.LLMRequest:
        if len(raw) > lanes.LARGE_BODY_BYTES:
            time.sleep(delay[0])
        return parse(api, raw)

    monkeypatch.setattr(request, "parse", slow)
    yield delay


def beside_normal_traffic(s: Stack, body: bytes) -> tuple[Response, float, list[Response]]:
    """Send `body` while two clients keep sending normal requests; its response and time."""
    result: list[tuple[Response, float]] = []

    def send() -> None:
        t0 = time.perf_counter()
        response = s.post(body)
        result.append((response, time.perf_counter() - t0))

    thread = threading.Thread(target=send)
    normal: list[Response] = []
    lock = threading.Lock()

    def keep_sending() -> None:
        while thread.is_alive() or len(normal) < 4:
            response = s.post(NORMAL)
            with lock:
                normal.append(response)

    clients = [threading.Thread(target=keep_sending) for _ in range(2)]
    thread.start()
    for c in clients:
        c.start()
    thread.join()
    for c in clients:
        c.join()
    return result[0][0], result[0][1], normal


def test_a_large_body_slower_than_the_message_timeout_is_routed_not_503(
    hostile_stack: Stack, slow_large_parse: list[float]
) -> None:
    body = many_messages(100_000)
    response, took, normal = beside_normal_traffic(hostile_stack, body)
    assert took > 1.0  # longer than Envoy's message_timeout: without the extension this was a 503
    assert response.status == 200, response.body[:300]
    assert response.headers["x-router-decision"] == "default"
    assert all(r.status == 200 for r in normal), [(r.status, r.body[:100]) for r in normal]


def test_a_large_body_past_its_own_deadline_gets_503_router_timeout(
    hostile_stack: Stack, slow_large_parse: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    from extproc import server

    monkeypatch.setattr(server, "LARGE_BODY_SECONDS", 1.2)
    slow_large_parse[0] = 3.0
    response, took, normal = beside_normal_traffic(hostile_stack, many_messages(100_000))
    assert response.status == 503, response.body[:300]
    error = orjson.loads(response.body)["error"]
    assert error["code"] == "router_timeout" and "deadline" in error["message"]
    assert took < 2.9  # the sidecar's own deadline answered, not the parse finishing
    assert all(r.status == 200 for r in normal), [(r.status, r.body[:100]) for r in normal]
    assert 'extproc_request_errors_total{code="router_timeout"}' in hostile_stack.metrics_text()
