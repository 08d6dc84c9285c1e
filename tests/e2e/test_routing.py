"""End to end through a real Envoy: routing, body rewrite, streaming, errors, passthrough."""

from __future__ import annotations

import asyncio
import gzip
import socket

import orjson
import pytest

from extproc.replicas.pool import Discovery
from extproc.standin import StandIn
from tests.harness import Stack, chat, stack, wait_for
from tests.replicas.fake_apiserver import FakeApiServer

pytestmark = pytest.mark.e2e

POLICY = """
version: 1
default_model: small
debug: {explain: true}
limits: {max_body_bytes: 65536}
models:
  small:
    upstream_model: small-8b
    replicas: {static: ["$s1", "$s2"], envoy: original_dst}
  large:
    upstream_model: large-70b
    replicas: {static: ["$l1", "$l2"], envoy: override_host}
  direct:
    upstream_model: direct-model
decisions:
  - name: premium
    when: {header: {name: x-user-tier, equals: premium}}
    model: large
  - name: code
    when: {keyword: ["segfault", "traceback"]}
    model: large
  - name: long
    when: {tokens: {min: 400}}
    model: direct
"""
REPLICAS = ["s1", "s2", "l1", "l2", "d1"]


@pytest.fixture(scope="module")
def envoy_stack(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("routing")
    with Stack(tmp, POLICY, [StandIn(name=n) for n in REPLICAS], envoy_options=_direct) as s:
        yield s


def _direct(fleet) -> dict:
    """Envoy balances the 'direct' model itself; non-LLM paths go there too."""
    return {"cluster_endpoints": {"direct": [fleet["d1"].address]}, "default_cluster": "direct"}


def _names(stack: Stack, model: str) -> set[str]:
    return {"small": {"s1", "s2"}, "large": {"l1", "l2"}, "direct": {"d1"}}[model]


def test_keyword_rule_routes_to_the_large_cluster_and_a_large_replica(envoy_stack: Stack) -> None:
    response = envoy_stack.post(chat("my program segfaults on start"))
    assert response.status == 200
    assert response.headers["x-router-model"] == "large"
    assert response.headers["x-router-decision"] == "code"
    assert envoy_stack.replica(response) in _names(envoy_stack, "large")
    assert response.json()["model"] == "large-70b"


def test_header_rule_routes_premium_users_to_large(envoy_stack: Stack) -> None:
    response = envoy_stack.post(chat("hello"), headers={"x-user-tier": "premium"})
    assert response.headers["x-router-decision"] == "premium"
    assert envoy_stack.replica(response) in _names(envoy_stack, "large")


def test_token_rule_routes_long_prompts_to_a_cluster_envoy_balances(envoy_stack: Stack) -> None:
    response = envoy_stack.post(chat("lorem ipsum dolor sit amet " * 120))
    assert response.headers["x-router-model"] == "direct"
    assert envoy_stack.replica(response) == "d1"


def test_default_model_reaches_a_small_replica_through_original_dst(envoy_stack: Stack) -> None:
    seen = {envoy_stack.replica(envoy_stack.post(chat(f"hi number {i}"))) for i in range(6)}
    assert seen == {"s1", "s2"}  # both replicas take work; nothing else does


def test_upstream_gets_the_body_with_only_model_changed_and_a_true_content_length(envoy_stack: Stack) -> None:
    raw = (
        b'{ "messages" : [ {"role":"user","content":"caf\\u00e9 \xe2\x98\x95 \\"quoted\\" segfault"} ],\n'
        b'  "model":"auto", "temperature": 1.0e1, "n": 1, "big": 123456789012345678901234567890,\n'
        b'  "tools": [{"type":"function","function":{"name":"f","parameters":{"model":"keep-me"}}}] }'
    )
    response = envoy_stack.post(raw)
    assert response.status == 200
    replica = envoy_stack.fleet[envoy_stack.replica(response)]
    received = replica.received[-1]
    assert received.body == raw.replace(b'"model":"auto"', b'"model":"large-70b"')
    assert int(received.headers["content-length"]) == len(received.body)
    assert received.headers["x-selected-model"] == "large-70b"


def test_explicit_model_is_honoured_and_still_gets_a_replica(envoy_stack: Stack) -> None:
    response = envoy_stack.post(chat("my program segfaults", model="small"))
    assert response.headers["x-router-model"] == "small"
    assert response.headers["x-router-decision"] == "explicit"
    assert envoy_stack.replica(response) in _names(envoy_stack, "small")
    assert response.json()["model"] == "small-8b"


def test_clients_cannot_pick_the_replica_or_cluster_themselves(envoy_stack: Stack) -> None:
    l1 = envoy_stack.fleet["l1"].address
    for _ in range(4):
        response = envoy_stack.post(
            chat("hello there"),
            headers={"x-gateway-destination-endpoint": l1, "x-extproc-cluster": "large", "x-selected-model": "evil"},
        )
        assert envoy_stack.replica(response) in _names(envoy_stack, "small")
        received = envoy_stack.fleet[envoy_stack.replica(response)].received[-1]
        assert received.headers["x-selected-model"] == "small-8b"


def test_sse_stream_passes_through_chunk_by_chunk(envoy_stack: Stack) -> None:
    gate = asyncio.Event()
    for name in ("s1", "s2"):
        envoy_stack.fleet[name].gate = gate
    body = orjson.dumps(chat("stream please", stream=True, stream_options={"include_usage": True}))
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )
    with socket.create_connection(("127.0.0.1", envoy_stack.port), timeout=20) as sock:
        sock.sendall(request)
        seen = b""
        # The upstream holds the rest of the stream until the gate opens: the first event can only
        # arrive here if nothing between us and it buffers the stream.
        while b"part 0" not in seen:
            data = sock.recv(65536)
            assert data, "stream closed before its first event"
            seen += data
        assert b"part 1" not in seen
        assert b"content-type: text/event-stream" in seen.lower()
        envoy_stack.fleet.call(_set(gate))
        while not seen.endswith(b"0\r\n\r\n"):
            data = sock.recv(65536)
            if not data:
                break
            seen += data
    for name in ("s1", "s2"):
        envoy_stack.fleet[name].gate = None
    assert b"part 2" in seen and b'"usage"' in seen and b"data: [DONE]" in seen


async def _set(event: asyncio.Event) -> None:
    event.set()


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "code"),
    [
        ("POST", "/v1/chat/completions", b'{"model": "auto", "messages": [', {}, 400, "invalid_json"),
        ("POST", "/v1/chat/completions", b"[1, 2]", {}, 400, "invalid_json"),
        ("POST", "/v1/chat/completions", b'{"model": "auto", "messages": "hi"}', {}, 400, "invalid_request"),
        ("POST", "/v1/chat/completions", b'{"model": 7, "messages": []}', {}, 400, "invalid_type"),
        (
            "POST",
            "/v1/chat/completions",
            b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}',
            {},
            404,
            "model_not_found",
        ),
        ("GET", "/v1/chat/completions", None, {}, 405, "method_not_allowed"),
        ("PUT", "/v1/completions", b"{}", {}, 405, "method_not_allowed"),
        ("POST", "/v1/chat/completions", b"", {}, 400, "invalid_request"),
        ("POST", "/v1/chat/completions", orjson.dumps(chat("x" * 70000)), {}, 413, "request_too_large"),
        (
            "POST",
            "/v1/chat/completions",
            gzip.compress(orjson.dumps(chat("hi"))),
            {"content-encoding": "gzip"},
            415,
            "unsupported_media_type",
        ),
    ],
    ids=[
        "malformed",
        "not-object",
        "wrong-type",
        "model-not-string",
        "unknown-model",
        "get",
        "put",
        "empty",
        "too-large",
        "gzip",
    ],
)
def test_errors_come_back_as_openai_json_with_the_right_status(
    envoy_stack: Stack, method: str, path: str, body: bytes | None, headers: dict, status: int, code: str
) -> None:
    response = envoy_stack.request(method, path, body, headers)
    assert response.status == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code
    assert set(error) >= {"message", "type", "code"} and error["message"]
    # The stream keeps serving.
    assert envoy_stack.post(chat("still there?")).status == 200


def test_only_the_forward_paths_pass_through_unrouted(envoy_stack: Stack) -> None:
    listing = envoy_stack.request("GET", "/v1/models?limit=5")
    assert listing.status == 200 and listing.json()["object"] == "list"
    assert "x-router-model" not in listing.headers
    assert envoy_stack.fleet["d1"].received[-1].path == "/v1/models?limit=5"
    seen = len(envoy_stack.fleet["d1"].received)
    other = envoy_stack.request("POST", "/v2/embeddings-like", b'{"model": "auto", "anything": [1, 2, 3]}')
    assert other.status == 404 and other.json()["error"]["code"] == "not_found"
    assert len(envoy_stack.fleet["d1"].received) == seen


def test_explanation_only_when_asked(envoy_stack: Stack) -> None:
    plain = envoy_stack.post(chat("my code segfaults"))
    assert "x-router-explain" not in plain.headers
    explained = envoy_stack.post(chat("my code segfaults"), headers={"x-router-debug": "true"})
    explanation = orjson.loads(explained.headers["x-router-explain"])
    assert explanation["decision"] == "code"
    assert [t["decision"] for t in explanation["trace"]] == ["premium", "code"]
    assert "segfault" not in explained.headers["x-router-explain"].replace('"segfault"', "")


def test_inflight_counts_return_to_zero(envoy_stack: Stack) -> None:
    for i in range(5):
        envoy_stack.post(chat(f"count {i}", stream=i % 2 == 0))
    wait_for(lambda: envoy_stack.inflight() == {})


def test_no_ready_replica_answers_503(tmp_path) -> None:
    policy = """
version: 1
default_model: pooled
models:
  pooled:
    replicas:
      kubernetes: {namespace: llm, service: pooled, port: 8000}
      envoy: original_dst
"""
    with FakeApiServer() as api:
        discovery = Discovery(api_client=api.api_client(), sync_timeout=10)
        with stack(tmp_path, policy, [], discovery=discovery) as s:
            response = s.post(chat("hello"))
            assert response.status == 503
            assert response.json()["error"]["code"] == "no_available_replica"


def test_two_round_trip_envoy_config_routes_the_same_way(tmp_path) -> None:
    with stack(
        tmp_path, POLICY, REPLICAS, envoy_options=lambda fleet: {**_direct(fleet), "two_round_trips": True}
    ) as s:
        response = s.post(chat("my program segfaults"))
        assert response.headers["x-router-model"] == "large"
        received = s.fleet[s.replica(response)].received[-1]
        assert received.headers["x-selected-model"] == "large-70b"
        assert orjson.loads(received.body)["model"] == "large-70b"
        assert s.request("GET", "/v1/chat/completions").status == 405
