"""Bad input through the real Envoy: every case gets its documented answer and the next request
is served. The table here is the one in the README ("Bad input")."""

from __future__ import annotations

import gzip

import orjson
import pytest

from extproc.standin import StandIn
from tests.harness import Stack, chat

pytestmark = pytest.mark.e2e

POLICY = """
version: 1
default_model: small
limits: {max_body_bytes: 65536}
models:
  small:
    upstream_model: small-8b
    replicas: {static: ["$s1", "$s2"], envoy: original_dst}
"""

MSG = [{"role": "user", "content": "hello"}]
PASS = "routed"  # 200 from a replica, body forwarded with only the model rewritten

# (case, method, path, body, headers, expected status, expected error code or PASS)
CASES = [
    ("malformed JSON", "POST", "/v1/chat/completions", b'{"model": "auto", "messages": [', {}, 400, "invalid_json"),
    ("JSON that is not an object", "POST", "/v1/chat/completions", b'["auto"]', {}, 400, "invalid_json"),
    (
        "wrong field type",
        "POST",
        "/v1/chat/completions",
        orjson.dumps({"model": "auto", "messages": {"a": 1}}),
        {},
        400,
        "invalid_request",
    ),
    (
        "empty messages",
        "POST",
        "/v1/chat/completions",
        orjson.dumps({"model": "auto", "messages": []}),
        {},
        400,
        "invalid_request",
    ),
    (
        "body over the limit",
        "POST",
        "/v1/chat/completions",
        orjson.dumps(chat("x" * 70000)),
        {},
        413,
        "request_too_large",
    ),
    (
        "nesting deeper than 1024",
        "POST",
        "/v1/chat/completions",
        b'{"model":"auto","messages":[{"role":"user","content":"x"}],"x":' + b"[" * 3000 + b"]" * 3000 + b"}",
        {},
        400,
        "invalid_json",
    ),
    (
        "nesting 200 deep",
        "POST",
        "/v1/chat/completions",
        b'{"model":"auto","messages":[{"role":"user","content":"x"}],"x":' + b"[" * 200 + b"]" * 200 + b"}",
        {},
        200,
        PASS,
    ),
    (
        "invalid UTF-8",
        "POST",
        "/v1/chat/completions",
        b'{"model":"auto","messages":[{"role":"user","content":"\xc3\x28"}]}',
        {},
        400,
        "invalid_json",
    ),
    (
        "gzip content-encoding",
        "POST",
        "/v1/chat/completions",
        gzip.compress(orjson.dumps(chat("hi"))),
        {"content-encoding": "gzip"},
        415,
        "unsupported_media_type",
    ),
    (
        "duplicate model key",
        "POST",
        "/v1/chat/completions",
        b'{"model":"auto","model":"small","messages":[{"role":"user","content":"x"}]}',
        {},
        400,
        "invalid_request",
    ),
    (
        "duplicate other key",
        "POST",
        "/v1/chat/completions",
        b'{"model":"auto","n":1,"n":2,"messages":[{"role":"user","content":"x"}]}',
        {},
        200,
        PASS,
    ),
    (
        "NaN",
        "POST",
        "/v1/chat/completions",
        b'{"model":"auto","temperature":NaN,"messages":[{"role":"user","content":"x"}]}',
        {},
        400,
        "invalid_json",
    ),
    (
        "1e999",
        "POST",
        "/v1/chat/completions",
        b'{"model":"auto","temperature":1e999,"messages":[{"role":"user","content":"x"}]}',
        {},
        400,
        "invalid_json",
    ),
    (
        "image and audio parts",
        "POST",
        "/v1/chat/completions",
        orjson.dumps(
            {
                "model": "auto",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this?"},
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                            {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                        ],
                    }
                ],
            }
        ),
        {},
        200,
        PASS,
    ),
    (
        "tool and function messages",
        "POST",
        "/v1/chat/completions",
        orjson.dumps(
            {
                "model": "auto",
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "wx", "arguments": "{}"}}],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                    {"role": "assistant", "content": None, "function_call": {"name": "wx", "arguments": "{}"}},
                    {"role": "function", "name": "wx", "content": "sunny"},
                ],
            }
        ),
        {},
        200,
        PASS,
    ),
    ("n > 1", "POST", "/v1/chat/completions", orjson.dumps(chat("hi", n=3)), {}, 200, PASS),
    (
        "stream without stream_options",
        "POST",
        "/v1/chat/completions",
        orjson.dumps(chat("hi", stream=True)),
        {},
        200,
        PASS,
    ),
    (
        "stream with include_usage",
        "POST",
        "/v1/chat/completions",
        orjson.dumps(chat("hi", stream=True, stream_options={"include_usage": True})),
        {},
        200,
        PASS,
    ),
    ("missing model", "POST", "/v1/chat/completions", orjson.dumps({"messages": MSG}), {}, 400, "invalid_request"),
    (
        "unconfigured model",
        "POST",
        "/v1/chat/completions",
        orjson.dumps({"model": "gpt-9", "messages": MSG}),
        {},
        404,
        "model_not_found",
    ),
    (
        "CR/LF in the model name",
        "POST",
        "/v1/chat/completions",
        orjson.dumps({"model": "a\r\nx-evil: 1", "messages": MSG}),
        {},
        404,
        "model_not_found",
    ),
    ("GET on an LLM path", "GET", "/v1/chat/completions", None, {}, 405, "method_not_allowed"),
    ("POST without a body", "POST", "/v1/completions", b"", {}, 400, "invalid_request"),
    ("unknown path", "POST", "/v1/unknown", b"{}", {}, 404, "not_found"),
    (
        "huge headers",
        "POST",
        "/v1/chat/completions",
        orjson.dumps(chat("hi")),
        {"x-big": "a" * 70000},
        431,
        "headers_too_large",
    ),
    (
        "too many headers",
        "POST",
        "/v1/chat/completions",
        orjson.dumps(chat("hi")),
        {f"x-h{i}": "v" for i in range(120)},
        431,
        "headers_too_large",
    ),
]


@pytest.fixture(scope="module")
def envoy_stack(tmp_path_factory: pytest.TempPathFactory):
    with Stack(tmp_path_factory.mktemp("bad"), POLICY, [StandIn(name="s1"), StandIn(name="s2")]) as s:
        yield s


@pytest.mark.parametrize(
    ("case", "method", "path", "body", "headers", "status", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_input_gets_its_documented_answer_and_the_sidecar_keeps_serving(
    envoy_stack: Stack, case: str, method: str, path: str, body: bytes | None, headers: dict, status: int, expected: str
) -> None:
    response = envoy_stack.request(method, path, body, headers)
    assert response.status == status, response.body[:300]
    if expected == PASS:
        assert envoy_stack.replica(response) in ("s1", "s2")
        received = envoy_stack.fleet[envoy_stack.replica(response)].received[-1]
        assert received.body == body.replace(b'"model":"auto"', b'"model":"small-8b"')
    else:
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert error["code"] == expected and error["message"] and error["type"] and "param" in error
    follow_up = envoy_stack.post(chat("are you still there?"))
    assert follow_up.status == 200 and follow_up.headers["x-router-model"] == "small"


def test_cr_lf_never_reaches_a_header_we_set(tmp_path) -> None:
    policy = POLICY.replace("limits:", "unknown_models: passthrough\npassthrough_cluster: other\nlimits:")
    with Stack(
        tmp_path,
        policy,
        [StandIn(name="s1"), StandIn(name="s2"), StandIn(name="o1")],
        envoy_options=lambda fleet: {"cluster_endpoints": {"other": [fleet["o1"].address]}},
    ) as s:
        response = s.post({"model": "evil\r\nx-injected: 1", "messages": MSG})
        assert response.status == 200 and s.replica(response) == "o1"
        received = s.fleet["o1"].received[-1]
        assert "x-injected" not in received.headers and "x-selected-model" not in received.headers
        assert orjson.loads(received.body)["model"] == "evil\r\nx-injected: 1"  # forwarded as the client sent it
