"""A model server misbehaving, through the real Envoy: resets, garbage, answers cut short,
malformed or huge answers, a slow or keep-alive-closing server. The client gets the answer when
there is one, else a JSON 5xx (never a hang); the lease comes back; other requests are served."""

from __future__ import annotations

import threading

import orjson
import pytest

from extproc.standin import StandIn
from tests.adversarial.hostile import assert_still_serving, check, request, send
from tests.harness import Stack, chat, wait_for

pytestmark = pytest.mark.e2e

POLICY = """
version: 1
default_model: small
models:
  small: {upstream_model: small-8b, replicas: {static: ["$s1"], envoy: original_dst}}
  flaky: {upstream_model: flaky-8b, replicas: {static: ["$f1"], envoy: original_dst}}
  slow: {upstream_model: slow-8b, replicas: {static: ["$w1"], envoy: original_dst}}
"""
MAX_RESPONSE = 16 * 1024 * 1024


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory):
    replicas = [StandIn(name="s1"), StandIn(name="f1"), StandIn(name="w1", delay=2.0)]
    with Stack(
        tmp_path_factory.mktemp("upstream"), POLICY, replicas, envoy_options={"max_response_bytes": MAX_RESPONSE}
    ) as stack:
        yield stack


@pytest.fixture
def flaky(s: Stack):
    replica = s.fleet["f1"]
    yield replica
    replica.fault, replica.answer_bytes, replica.status = "", 0, 200
    wait_for(lambda: s.inflight() == {}, timeout=5)  # every lease came back


def to_flaky(**extra: object) -> bytes:
    return request(body=orjson.dumps(chat("hello", model="flaky", **extra)))


def on_flaky(times: int):
    def received(got: list) -> None:
        assert [name for name, _ in got] == ["f1"] * times, [name for name, _ in got]

    return received


# (fault, status, error code, requests f1 receives). A reset before any byte of an answer is
# sent once more on a new connection (README "When a replica fails").
FAILING = [
    ("reset", 503, "upstream_unavailable", 2),
    ("garbage", 503, "upstream_unavailable", 2),
    ("cut", 503, "upstream_unavailable", 1),  # (the answer had begun: not sent again)
    ("bad-length", 503, "upstream_unavailable", 2),
    ("huge-headers", 503, "upstream_unavailable", 2),
]


@pytest.mark.parametrize(("fault", "status", "code", "times"), FAILING, ids=[c[0] for c in FAILING])
def test_a_replica_failing_to_answer_gets_a_json_5xx(
    s: Stack, flaky: StandIn, fault: str, status: int, code: str, times: int
) -> None:
    flaky.fault = fault
    check(s, to_flaky(), status=status, code=code, param=None, upstream=on_flaky(times))


def test_a_stream_cut_short_by_the_replica_ends_the_response_without_done(s: Stack, flaky: StandIn) -> None:
    flaky.fault = "cut"
    answer = check(s, to_flaky(stream=True), status=200, upstream=on_flaky(1))
    assert answer.body.startswith(b"data: ") and b"[DONE]" not in answer.body, answer.body[:300]


def test_an_answer_that_is_not_json_passes_through_as_the_replica_sent_it(s: Stack, flaky: StandIn) -> None:
    flaky.fault = "not-json"
    answer = check(s, to_flaky(), status=200, upstream=on_flaky(1))
    assert answer.headers["content-type"] == "text/html" and answer.body.startswith(b"<html>")


def test_a_replica_5xx_reaches_the_client_as_the_replica_sent_it_and_is_counted(s: Stack, flaky: StandIn) -> None:
    flaky.status = 500
    before = upstream_5xx(s)
    answer = check(s, to_flaky(), status=500, upstream=on_flaky(1))
    assert answer.json()["error"]["message"] == "stand-in f1 fails"
    wait_for(lambda: upstream_5xx(s) == before + 1, timeout=5)


def upstream_5xx(s: Stack) -> float:
    line = 'extproc_upstream_responses_total{code="5xx",model="flaky"} '
    return sum(float(x.rsplit(" ", 1)[1]) for x in s.metrics_text().splitlines() if x.startswith(line))


@pytest.mark.parametrize("size", [9 * 1024 * 1024, MAX_RESPONSE - 4096], ids=["9 MiB", "just under the limit"])
def test_a_large_json_answer_is_delivered_whole(s: Stack, flaky: StandIn, size: int) -> None:
    # Before: an answer over the 8 MiB request buffer failed with 503 "retry shortly" once the
    # replica had done all the work (Envoy buffers a JSON answer to read its token usage).
    flaky.answer_bytes = size
    answer = check(s, to_flaky(), status=200, upstream=on_flaky(1))
    assert len(answer.json()["choices"][0]["message"]["content"]) == size


def test_an_answer_over_the_limit_is_a_json_502_that_says_not_to_retry_as_is(s: Stack, flaky: StandIn) -> None:
    flaky.answer_bytes = MAX_RESPONSE + 1024
    answer = check(s, to_flaky(), status=502, code="response_too_large", param=None, upstream=on_flaky(1))
    assert "fewer tokens" in answer.error["message"]


def test_large_stream_events_pass_whole(s: Stack, flaky: StandIn) -> None:
    flaky.answer_bytes = 2 * 1024 * 1024  # each event over sse_to_metadata's 1 MiB event limit
    answer = check(s, to_flaky(stream=True), status=200, upstream=on_flaky(1))
    events = [line for line in answer.body.split(b"\n") if line.startswith(b"data: ")]
    # Every padded event whole, then the small closing chunk (finish_reason) and [DONE].
    assert events[-1] == b"data: [DONE]" and b'"finish_reason":"stop"' in events[-2]
    assert all(len(e) > 2 * 1024 * 1024 for e in events[:-2])


def test_a_replica_closing_a_kept_alive_connection_as_it_is_reused_loses_no_request(s: Stack, flaky: StandIn) -> None:
    # vLLM's server (uvicorn) closes a connection idle for 5 s; a request Envoy sent on it at that
    # moment was reset and the client got 503 (4 of 40 here, with requests spaced at the
    # keep-alive time). Now it is sent again, on a new connection.
    flaky.fault = "close-reused"
    for _ in range(3):
        check(s, to_flaky(), status=200, upstream=lambda got: None)
    assert len(flaky.received) == 2  # the last request, once on the old connection and once anew


def test_a_slow_replica_holds_up_no_other_model(s: Stack) -> None:
    slow: list = []
    thread = threading.Thread(
        target=lambda: slow.append(send(s.port, request(body=orjson.dumps(chat("x", model="slow")))))
    )
    thread.start()
    wait_for(lambda: s.fleet["w1"].inflight == 1, timeout=5)
    for _ in range(10):
        assert_still_serving(s)
    assert thread.is_alive()  # ten answers from s1 came while w1 was still thinking
    thread.join()
    assert slow[0].status == 200
    wait_for(lambda: s.inflight() == {}, timeout=5)
