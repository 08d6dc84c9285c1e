"""Slow clients through the real Envoy: headers or bodies that never finish, or arrive a few
bytes at a time, hold a stream only until Envoy's request timeouts (README "Slow clients"), get
a JSON 408 where HTTP allows a response, and reach no model server. A slow *model* is another
matter: an answer that takes longer than the stream idle timeout to start, or pauses longer
between stream chunks, is not cut. The timeouts are short here (1-2 s) so the cases run fast."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import orjson
import pytest
import yaml

from extproc.standin import StandIn
from tests.adversarial.hostile import BODY, NOTHING, assert_still_serving, check, request
from tests.harness import Stack, chat, wait_for

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

POLICY = """
version: 1
default_model: small
models:
  small: {upstream_model: small-8b, replicas: {static: ["$s1"], envoy: original_dst}}
  thinker: {upstream_model: thinker-70b, replicas: {static: ["$t1"], envoy: original_dst}}
"""
HEADERS_TIMEOUT, REQUEST_TIMEOUT, IDLE_TIMEOUT = 1, 2, 1  # seconds


@pytest.fixture(scope="module")
def slow_stack(tmp_path_factory: pytest.TempPathFactory):
    # t1 thinks longer than the stream idle timeout before answering, and pauses longer than it
    # between the chunks of a stream.
    thinker = StandIn(name="t1", delay=IDLE_TIMEOUT + 0.6, chunks=2, chunk_delay=IDLE_TIMEOUT + 0.2)
    with Stack(
        tmp_path_factory.mktemp("slow"),
        POLICY,
        [StandIn(name="s1"), thinker],
        envoy_options={
            "request_headers_timeout": f"{HEADERS_TIMEOUT}s",
            "request_timeout": f"{REQUEST_TIMEOUT}s",
            "stream_idle_timeout": f"{IDLE_TIMEOUT}s",
        },
    ) as stack:
        yield stack


HEAD = request(body=None, content_length=False).removesuffix(b"\r\n")  # request line and host, no end
WITH_LENGTH = HEAD + b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(BODY)
CHUNKED = HEAD + b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"

# (case, pieces sent one second apart at most, or pause); all must end at Envoy's request timeouts.
CUT = [
    ("headers never finished", [HEAD], 0.0),
    ("headers a few bytes at a time", [WITH_LENGTH[i : i + 12] for i in range(0, 96, 12)], 0.4),
    ("no body after the headers", [WITH_LENGTH], 0.0),
    ("a body shorter than its content-length", [WITH_LENGTH + BODY[:-5]], 0.0),
    ("a body trickled in past the request timeout", [WITH_LENGTH] + [BODY[i : i + 8] for i in range(0, 64, 8)], 0.4),
    ("a chunked body that never ends", [CHUNKED + b"%x\r\n" % len(BODY) + BODY + b"\r\n"], 0.0),
    (
        "expect: 100-continue, then no body",
        [WITH_LENGTH.replace(b"content-type:", b"expect: 100-continue\r\ncontent-type:", 1)],
        0.0,
    ),
]


@pytest.mark.parametrize(("case", "pieces", "pause"), CUT, ids=[c[0] for c in CUT])
def test_a_request_that_never_arrives_ends_at_the_request_timeouts(
    slow_stack: Stack, case: str, pieces: list[bytes], pause: float
) -> None:
    answer = check(slow_stack, pieces, status=408, code="request_timeout", param=None, upstream=NOTHING, pause=pause)
    assert "in time" in answer.error["message"]


def test_a_slow_client_within_the_timeouts_is_served(slow_stack: Stack) -> None:
    pieces = [WITH_LENGTH[:40], WITH_LENGTH[40:], BODY[:20], BODY[20:]]
    answer = check(slow_stack, pieces, status=200, upstream="s1", path="/v1/chat/completions", pause=0.3)
    assert orjson.loads(answer.received[0][1].body)["model"] == "small-8b"


def test_a_model_thinking_longer_than_the_idle_timeout_is_not_cut(slow_stack: Stack) -> None:
    # Before: the connection manager's stream_idle_timeout (300 s by default, under the 600 s
    # upstream timeout) ended the wait for the first byte with a 503 "retry shortly".
    answer = check(slow_stack, request(body=orjson.dumps(chat("hi", model="thinker"))), status=200, upstream="t1")
    assert answer.json()["choices"][0]["message"]["content"] == "answer from t1"


def test_a_stream_pausing_longer_than_the_idle_timeout_is_not_cut(slow_stack: Stack) -> None:
    body = orjson.dumps(chat("hi", model="thinker", stream=True))
    answer = check(slow_stack, request(body=body), status=200, upstream="t1")
    events = [line for line in answer.body.split(b"\n") if line.startswith(b"data: ")]
    # its chunks, the closing chunk with the finish reason, [DONE]
    assert events[-1] == b"data: [DONE]" and len(events) == 4, answer.body


def test_hundreds_of_slowloris_connections_are_closed_and_others_are_served(slow_stack: Stack) -> None:
    for replica in slow_stack.replicas:
        replica.received.clear()
    holders = []
    for i in range(200):
        conn = socket.create_connection(("127.0.0.1", slow_stack.port), timeout=10)
        conn.sendall(HEAD if i % 2 else WITH_LENGTH)  # half stop in the headers, half before the body
        holders.append(conn)
    try:
        for _ in range(5):  # while they hang on, normal requests are answered
            assert_still_serving(slow_stack)
        closed = []

        def drain(conn: socket.socket) -> None:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            closed.append(data)

        threads = [threading.Thread(target=drain, args=(c,)) for c in holders]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert len(closed) == len(holders)  # Envoy ended every one of them
        assert all(d == b"" or d.startswith(b"HTTP/1.1 408") for d in closed)
    finally:
        for conn in holders:
            conn.close()
    received = [r for r in slow_stack.replicas for r in r.received]
    assert len(received) == 5  # only the normal requests reached a model server
    wait_for(lambda: slow_stack.inflight() == {}, timeout=10)


def test_the_shipped_envoy_config_bounds_slow_clients_but_not_slow_models() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "envoy" / "envoy.yaml").read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert (hcm["request_headers_timeout"], hcm["request_timeout"]) == ("10s", "60s")
    routes = [r for r in hcm["route_config"]["virtual_hosts"][0]["routes"] if r["name"].startswith("llm-")]
    routed = [r["route"] for r in routes if "route" in r]
    assert routed and all(r["idle_timeout"] == r["timeout"] for r in routed)
