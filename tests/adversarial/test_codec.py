"""Malformed HTTP/1 through the real Envoy (issue 15, item 8): every refusal of Envoy's own HTTP
codec is an OpenAI-style JSON error, nothing reaches a model server, and the next request is
served. (What Envoy cannot answer with a body is listed in the README, "Bad input".)"""

from __future__ import annotations

import orjson
import pytest

from tests.adversarial.hostile import BODY, NOTHING, check, request
from tests.harness import Stack

pytestmark = pytest.mark.e2e

LINE = b"POST /v1/chat/completions HTTP/1.1\r\nhost: router.test\r\n"
CHUNKED = b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n\r\n"

# (case, raw request, status, error code)
REFUSED = [
    ("NUL in a header value", request(headers=[("x-note", b"a\x00b")]), 400, "malformed_request"),
    ("DEL in a header value", request(headers=[("x-note", b"a\x7fb")]), 400, "malformed_request"),
    ("header name with a space", request(headers=[("x bad", "1")]), 400, "malformed_request"),
    ("header line without a colon", LINE + b"bogus\r\ncontent-length: 0\r\n\r\n", 400, "malformed_request"),
    ("space before the colon", LINE + b"content-length : 5\r\n\r\nhello", 400, "malformed_request"),
    (
        "content-length and transfer-encoding",
        LINE + b"content-length: %d\r\ntransfer-encoding: chunked\r\n\r\n" % len(BODY) + CHUNKED,
        400,
        "malformed_request",
    ),
    (
        "two different content-lengths",
        LINE + b"content-length: %d\r\ncontent-length: %d\r\n\r\n" % (len(BODY), len(BODY) + 1) + BODY,
        400,
        "malformed_request",
    ),
    (
        "the same content-length twice",
        LINE + b"content-length: %d\r\ncontent-length: %d\r\n\r\n" % (len(BODY), len(BODY)) + BODY,
        400,
        "malformed_request",
    ),
    ("negative content-length", LINE + b"content-length: -1\r\n\r\n", 400, "malformed_request"),
    ("content-length beyond 64 bits", LINE + b"content-length: 99999999999999999999\r\n\r\n", 400, "malformed_request"),
    ("content-length with a sign", LINE + b"content-length: +60\r\n\r\n" + BODY, 400, "malformed_request"),
    ("transfer-encoding gzip", LINE + b"transfer-encoding: gzip\r\n\r\n", 501, "unsupported_transfer_encoding"),
    (
        "transfer-encoding chunked twice",
        LINE + b"transfer-encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        501,
        "unsupported_transfer_encoding",
    ),
    ("a bad chunk size", LINE + b"transfer-encoding: chunked\r\n\r\nzz\r\n", 400, "malformed_request"),
    ("a raw #fragment", request("/v1/chat/completions#frag"), 400, "invalid_path"),
    ("a space in the path", request("/v1/chat completions"), 400, "malformed_request"),
    ("a byte above 0x7f in the path", request(b"/v1/chat/completions\xff"), 400, "malformed_request"),
    ("garbage instead of a request line", b"HELLO\r\n\r\n", 400, "malformed_request"),
    ("a method with a symbol", request(method="P@ST"), 400, "malformed_request"),
    ("a lower-case method", request(method="post"), 400, "malformed_request"),
    ("an unknown method", request(method="FOO"), 400, "malformed_request"),
    ("HTTP/3 on the request line", request(version="HTTP/3"), 400, "malformed_request"),
    ("a lower-case version", request(version="http/1.1"), 400, "malformed_request"),
    ("HTTP/1.1 without host", request(host=False), 400, "malformed_request"),
    ("headers over 60 KiB", request(headers=[("x-big", "a" * 70000)]), 431, "headers_too_large"),
    ("more than 100 headers", request(headers=[(f"x-h{i}", "v") for i in range(120)]), 431, "headers_too_large"),
    ("a path over 60 KiB", request("/v1/chat/completions?" + "a" * 70000), 431, "headers_too_large"),
    (
        "a websocket upgrade",
        request(body=None, method="GET", headers=[("connection", "upgrade"), ("upgrade", "websocket")]),
        403,
        "invalid_request",
    ),
    ("OPTIONS *", request("*", body=None, method="OPTIONS"), 404, "not_found"),
    ("CONNECT", request("evil.test:443", body=None, method="CONNECT"), 403, "invalid_request"),
]


@pytest.mark.parametrize(("case", "data", "status", "code"), REFUSED, ids=[c[0] for c in REFUSED])
def test_a_malformed_request_gets_a_json_error_and_reaches_no_model_server(
    hostile_stack: Stack, case: str, data: bytes, status: int, code: str
) -> None:
    check(hostile_stack, data, status=status, code=code, param=None, upstream=NOTHING)


SERVED = [
    ("HTTP/1.0", request(version="HTTP/1.0")),
    ("HTTP/1.0 without host", request(version="HTTP/1.0", host=False)),
    (
        "chunked body with an extension",
        LINE + b"transfer-encoding: chunked\r\n\r\n" + CHUNKED.replace(b"\r\n", b";x=1\r\n", 1),
    ),
    (
        "chunked body with a trailer",
        LINE + b"transfer-encoding: chunked\r\n\r\n" + CHUNKED[:-2] + b"x-trailer: 1\r\n\r\n",
    ),
]


@pytest.mark.parametrize(("case", "data"), SERVED, ids=[c[0] for c in SERVED])
def test_unusual_but_valid_framing_is_routed(hostile_stack: Stack, case: str, data: bytes) -> None:
    answer = check(hostile_stack, data, status=200, upstream="s1", path="/v1/chat/completions")
    assert orjson.loads(answer.received[0][1].body)["model"] == "small-8b"


def test_a_bare_cr_or_lf_in_a_header_never_reaches_a_model_server_as_one(hostile_stack: Stack) -> None:
    # Envoy drops a bare CR and ends the line at a bare LF (RFC 9112 2.2); a header "injected"
    # that way is a header like any other: the router's own ones are stripped before routing.
    injected = [("x-user-tier", b"a\rb"), ("x-note", b"a\nx-gateway-destination-endpoint: 10.9.9.9:80")]
    answer = check(hostile_stack, request(headers=injected), status=200, upstream="s1")
    headers = answer.received[0][1].headers
    assert headers["x-user-tier"] == "ab" and "\r" not in "".join(headers.values())
    assert headers.get("x-gateway-destination-endpoint") != "10.9.9.9:80"
