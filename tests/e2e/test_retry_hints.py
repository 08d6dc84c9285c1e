"""What a client is told when a request fails, through the real Envoy: a model server that takes
longer than the upstream timeout is a 504 upstream_timeout (not "retry shortly"); the transient
503s (router unavailable, no model server connection, no ready replica) carry Retry-After; every
error body has OpenAI's four keys with ``param`` null unless one field is at fault. Envoy's own
replies are counted by the sidecar under the code their client got."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from extproc.replicas.pool import Discovery
from extproc.standin import StandIn
from tests.harness import Response, Stack, chat, wait_for
from tests.replicas.fake_apiserver import FakeApiServer

pytestmark = pytest.mark.e2e

POLICY = """
version: 1
default_model: small
models:
  small: {replicas: {static: ["$s1"], envoy: original_dst}}
  slow: {replicas: {static: ["$slow"], envoy: original_dst}}
  dead: {replicas: {static: ["127.0.0.1:1"], envoy: original_dst}}
  pooled: {replicas: {kubernetes: {namespace: llm, service: pooled, port: 8000}, envoy: original_dst}}
decisions:
  - {name: slow, when: {keyword: [slowly]}, model: slow}
  - {name: dead, when: {keyword: [dead]}, model: dead}
  - {name: pooled, when: {keyword: [pooled]}, model: pooled}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    replicas = [StandIn(name="s1"), StandIn(name="slow", delay=3.0)]
    with FakeApiServer() as api:
        discovery = Discovery(api_client=api.api_client(), sync_timeout=10)
        s = Stack(
            tmp_path_factory.mktemp("retry-hints"),
            POLICY,
            replicas,
            envoy_options={"upstream_timeout": "1s"},
            discovery=discovery,
        )
        with s:
            yield s
            # The slow replica's answers outlive their 504s: let them end before it stops.
            wait_for(lambda: replicas[1].inflight == 0, timeout=10)


def error_of(answer: Response) -> dict:
    assert answer.headers["content-type"] == "application/json", answer.headers
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    return error


def local_replies(stack: Stack) -> dict[tuple[str, str], float]:
    pattern = r'extproc_envoy_local_replies_total\{code="(\w+)",status="(\d+)"\} (\S+)'
    return {(status, code): float(n) for code, status, n in re.findall(pattern, stack.metrics_text())}


def test_an_upstream_timeout_stays_a_504_without_a_retry_hint(stack: Stack) -> None:
    started = time.monotonic()
    answer = stack.post(chat("answer slowly"))
    assert answer.status == 504 and time.monotonic() - started < 3
    error = error_of(answer)
    assert (error["code"], error["type"], error["param"]) == ("upstream_timeout", "server_error", None)
    assert "retry-after" not in answer.headers


def test_no_model_server_connection_is_a_503_with_retry_after(stack: Stack) -> None:
    answer = stack.post(chat("send it to the dead one"))
    assert answer.status == 503 and answer.headers["retry-after"] == "1"
    assert (error_of(answer)["code"], error_of(answer)["param"]) == ("upstream_unavailable", None)


def test_no_ready_replica_is_the_routers_503_with_retry_after(stack: Stack) -> None:
    answer = stack.post(chat("pooled please"))
    assert answer.status == 503 and answer.headers["retry-after"] == "5"
    assert (error_of(answer)["code"], error_of(answer)["param"]) == ("no_available_replica", None)


def test_a_router_slower_than_the_message_timeout_is_a_503_with_retry_after(stack: Stack) -> None:
    stack.sidecar.loop.call_soon_threadsafe(time.sleep, 2.5)  # the sidecar's loop stalls past 1 s
    answer = stack.post(chat("hello"))
    assert answer.status == 503 and answer.headers["retry-after"] == "1"
    assert (error_of(answer)["code"], error_of(answer)["param"]) == ("router_unavailable", None)
    wait_for(lambda: stack.post(chat("hello")).status == 200, timeout=10)


def test_client_errors_carry_no_retry_hint_and_param_only_when_one_field_is_at_fault(stack: Stack) -> None:
    unknown = stack.post(chat("hi", model="gpt-9"))
    assert unknown.status == 404 and "retry-after" not in unknown.headers
    assert error_of(unknown)["param"] == "model"
    for answer, status in (
        (stack.post(b"{not json"), 400),
        (stack.post(chat("hi"), path="/v1/chat%2Fcompletions"), 400),
        (stack.post(chat("hi"), headers={"x-big": "a" * 70000}), 431),
        (stack.request("GET", "/v1/chat/completions"), 405),
        (stack.request("GET", "/v1/embeddings"), 404),
    ):
        assert answer.status == status and "retry-after" not in answer.headers, (answer.status, answer.headers)
        assert error_of(answer)["param"] is None, answer.body


def test_envoys_own_replies_are_counted_under_the_code_their_client_got(stack: Stack) -> None:
    before = local_replies(stack)
    sent: list[tuple[str, str]] = []
    for answer in (
        stack.post(chat("answer slowly")),
        stack.post(chat("send it to the dead one")),
        stack.post(chat("hi"), headers={"x-big": "a" * 70000}),
        stack.post(chat("hi"), path="/v1/chat%2Fcompletions"),
        stack.post(chat("pooled please")),  # the router's own: not Envoy's
        stack.post(chat("hi", model="gpt-9")),  # likewise
    ):
        sent.append((str(answer.status), error_of(answer)["code"]))

    def counted() -> dict[tuple[str, str], float]:
        now = local_replies(stack)
        return {key: now[key] - before.get(key, 0) for key in now}

    assert sent[:4] == [
        ("504", "upstream_timeout"),
        ("503", "upstream_unavailable"),
        ("431", "headers_too_large"),
        ("400", "invalid_path"),
    ]
    # (Entries of the tests before may still be on their way: at least one more of each.)
    wait_for(lambda: all(counted().get(key, 0) >= 1 for key in sent[:4]), timeout=10)
    codes = {code for _, code in local_replies(stack)}
    assert not codes & {"no_available_replica", "model_not_found"}, codes  # the router counts its own
