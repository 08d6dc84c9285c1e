"""JSON and framing edge cases through the real Envoy. A body the router can read is routed and
forwarded byte for byte except `model` (escapes, NULs, huge numbers and long keys included); one
it cannot read, or one two parsers could read differently, is refused with a JSON 400 naming
the problem, and reaches no model server."""

from __future__ import annotations

import orjson
import pytest

from tests.adversarial.hostile import BODY, NOTHING, check, request
from tests.harness import Stack, chat

pytestmark = pytest.mark.e2e

MSG = '[{"role":"user","content":"hello"}]'


def spliced(raw: bytes, old: bytes, new: bytes = b'"small-8b"') -> bytes:
    assert raw.count(old) == 1
    return raw.replace(old, new)


# (case, raw body, the value of `model` as written). Routed; the replica gets the same bytes
# with only that value replaced.
ROUTED = [
    ("NUL escaped in the text", b'{"model":"auto","messages":[{"role":"user","content":"a\\u0000b"}]}', b'"auto"'),
    (
        "surrogate pair escapes",
        b'{"model":"auto","messages":[{"role":"user","content":"\\ud83d\\ude00 hi"}]}',
        b'"auto"',
    ),
    (
        "right-to-left and combining text",
        '{"model":"auto","messages":[{"role":"user","content":"\u05e9\u05dc\u05d5\u05dd e\u0301"}]}'.encode(),
        b'"auto"',
    ),
    ("the key written with an escape", b'{"m\\u006fdel":"auto","messages":' + MSG.encode() + b"}", b'"auto"'),
    ("the value written with an escape", b'{"model":"\\u0061uto","messages":' + MSG.encode() + b"}", b'"\\u0061uto"'),
    (
        "a 1 MB key elsewhere",
        b'{"metadata":{"' + b"k" * 1_000_000 + b'":1},"model":"auto","messages":' + MSG.encode() + b"}",
        b'"auto"',
    ),
    (
        "integers beyond 64 bits",
        b'{"model":"auto","seed":18446744073709551616,"x":-9223372036854775809,"messages":' + MSG.encode() + b"}",
        b'"auto"',
    ),
    (
        "denormal, negative zero and long decimals",
        b'{"model":"auto","x":[1e-400,-0.0,0.1000000000000000055511151231257827],"messages":' + MSG.encode() + b"}",
        b'"auto"',
    ),
    (
        "whitespace around everything",
        b' \r\n\t{ "model" :\n "auto" , "messages" : ' + MSG.encode() + b" }\n\n",
        b'"auto"',
    ),
    (
        "model last, after a large conversation",
        b'{"messages":['
        + b",".join([b'{"role":"user","content":"' + b"x" * 100 + b'"}'] * 5000)
        + b'],"model":"auto"}',
        b'"auto"',
    ),
    (
        "model as a text and as a nested key",
        b'{"metadata":{"model":"large"},"model":"auto","messages":[{"role":"user","content":"model"}]}',
        b'"auto"',
    ),
    (
        '\\"model\\" inside a string',
        b'{"model":"auto","messages":[{"role":"user","content":"say \\"model\\": \\"large\\""}]}',
        b'"auto"',
    ),
    (
        "a string ending in an escaped backslash before model",
        b'{"x":"a\\\\","model":"auto","messages":' + MSG.encode() + b"}",
        b'"auto"',
    ),
    (
        "ten thousand one-character content parts",
        b'{"model":"auto","messages":[{"role":"user","content":['
        + b",".join([b'{"type":"text","text":"a"}'] * 10000)
        + b"]}]}",
        b'"auto"',
    ),
    (
        "a duplicated key that carries no prompt",
        b'{"model":"auto","temperature":1,"temperature":0,"messages":' + MSG.encode() + b"}",
        b'"auto"',
    ),
    (
        "stream null, stream_options without stream",
        b'{"model":"auto","stream":null,"stream_options":{"include_usage":true},"messages":' + MSG.encode() + b"}",
        b'"auto"',
    ),
]


@pytest.mark.parametrize(("case", "raw", "value"), ROUTED, ids=[c[0] for c in ROUTED])
def test_a_readable_body_is_routed_and_forwarded_byte_for_byte(
    hostile_stack: Stack, case: str, raw: bytes, value: bytes
) -> None:
    answer = check(hostile_stack, request(body=raw), status=200, upstream="s1")
    assert answer.received[0][1].body == spliced(raw, value)


# (case, raw body, error code, param)
REFUSED = [
    ("a UTF-8 byte order mark", b"\xef\xbb\xbf" + BODY, "invalid_json", None),
    ("UTF-16", BODY.decode().encode("utf-16"), "invalid_json", None),
    ("UTF-16 without a byte order mark", BODY.decode().encode("utf-16-le"), "invalid_json", None),
    ("UTF-32", BODY.decode().encode("utf-32"), "invalid_json", None),
    (
        "a lone surrogate escape",
        b'{"model":"auto","messages":[{"role":"user","content":"\\ud800"}]}',
        "invalid_json",
        None,
    ),
    (
        "a raw control character in a string",
        b'{"model":"auto","messages":[{"role":"user","content":"a\x01b"}]}',
        "invalid_json",
        None,
    ),
    (
        "an overlong UTF-8 sequence",
        b'{"model":"auto","messages":[{"role":"user","content":"\xc0\xaf"}]}',
        "invalid_json",
        None,
    ),
    ("content after the object", BODY + b" {}", "invalid_json", None),
    ("a comment", b'{"model":"auto", /* hi */ "messages":' + MSG.encode() + b"}", "invalid_json", None),
    ("a form-encoded body", b"model=auto&messages=hello", "invalid_json", None),
    ("stream as a string", orjson.dumps(chat("hi", stream="true")), "invalid_type", "stream"),
    ("stream as a number", orjson.dumps(chat("hi", stream=1)), "invalid_type", "stream"),
    (
        "a text part that is not a string",
        orjson.dumps(chat([{"type": "text", "text": 42}])),
        "invalid_request",
        "messages[0].content[0].text",
    ),
    (
        "a message without a role",
        b'{"model":"auto","messages":[{"content":"hi"}]}',
        "invalid_request",
        "messages[0].role",
    ),
    # Which copy wins depends on the parser (Python's json and orjson: the last; RapidJSON and
    # simdjson lookups: the first): the model might read the one the router did not.
    (
        "messages twice",
        b'{"model":"auto","messages":[{"role":"user","content":"a"}],"messages":' + MSG.encode() + b"}",
        "invalid_request",
        "messages",
    ),
    (
        "messages twice, once escaped",
        b'{"model":"auto","m\\u0065ssages":[{"role":"user","content":"a"}],"messages":' + MSG.encode() + b"}",
        "invalid_request",
        "messages",
    ),
    (
        "tools twice",
        b'{"model":"auto","tools":[],"tools":[],"messages":' + MSG.encode() + b"}",
        "invalid_request",
        "tools",
    ),
]


@pytest.mark.parametrize(("case", "raw", "code", "param"), REFUSED, ids=[c[0] for c in REFUSED])
def test_a_body_the_router_cannot_read_safely_is_a_json_400(
    hostile_stack: Stack, case: str, raw: bytes, code: str, param: str | None
) -> None:
    check(hostile_stack, request(body=raw), status=400, code=code, param=param, upstream=NOTHING)


@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/completions", b'{"model":"auto","prompt":"a","prompt":"b"}', "prompt"),
        ("/v1/completions", b'{"model":"auto","prompt":"a","suffix":"b","suffix":"c"}', "suffix"),
        ("/v1/responses", b'{"model":"auto","input":"a","input":"b"}', "input"),
        ("/v1/responses", b'{"model":"auto","instructions":"a","input":"x","instructions":"b"}', "instructions"),
    ],
    ids=["prompt", "suffix", "input", "instructions"],
)
def test_a_duplicated_prompt_field_is_refused_on_every_api(
    hostile_stack: Stack, path: str, raw: bytes, param: str
) -> None:
    check(hostile_stack, request(path, body=raw), status=400, code="invalid_request", param=param, upstream=NOTHING)


def test_a_byte_order_mark_is_named_in_the_error(hostile_stack: Stack) -> None:
    answer = check(
        hostile_stack, request(body=b"\xef\xbb\xbf" + BODY), status=400, code="invalid_json", upstream=NOTHING
    )
    assert "UTF-8" in answer.error["message"] and "byte order mark" in answer.error["message"]


# --- content types and encodings ---------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/json; charset=utf-8", "application/x-ndjson"]
)
def test_json_under_any_content_type_is_read_as_json(hostile_stack: Stack, content_type: str | None) -> None:
    raw = request(body=None, content_length=False).removesuffix(b"\r\n")
    if content_type:
        raw += f"content-type: {content_type}\r\n".encode()
    raw += b"content-length: %d\r\n\r\n" % len(BODY) + BODY
    answer = check(hostile_stack, raw, status=200, upstream="s1")
    assert orjson.loads(answer.received[0][1].body)["model"] == "small-8b"


@pytest.mark.parametrize(
    "encodings",
    [["GZIP"], ["br"], ["deflate"], ["identity, gzip"], ["identity", "gzip"], ["gzip", "identity"], ["x-gzip"]],
    ids=repr,
)
def test_any_content_encoding_but_identity_is_a_415(hostile_stack: Stack, encodings: list[str]) -> None:
    headers = [("content-encoding", e) for e in encodings]
    check(hostile_stack, request(headers=headers), status=415, code="unsupported_media_type", upstream=NOTHING)


def test_identity_encoding_in_any_case_is_routed(hostile_stack: Stack) -> None:
    check(hostile_stack, request(headers=[("content-encoding", "IDENTITY")]), status=200, upstream="s1")


# --- chunked framing ---------------------------------------------------------------------------

HEAD = (
    request(body=None).removesuffix(b"\r\n") + b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
)


def test_a_body_in_one_byte_chunks_is_routed_whole_with_a_true_length(hostile_stack: Stack) -> None:
    chunks = b"".join(b"1\r\n" + BODY[i : i + 1] + b"\r\n" for i in range(len(BODY))) + b"0\r\n\r\n"
    answer = check(hostile_stack, HEAD + chunks, status=200, upstream="s1")
    got = answer.received[0][1]
    assert got.body == spliced(BODY, b'"auto"') and int(got.headers["content-length"]) == len(got.body)


def test_chunk_sizes_with_leading_zeros_are_routed(hostile_stack: Stack) -> None:
    chunked = b"000%x\r\n" % len(BODY) + BODY + b"\r\n0000\r\n\r\n"
    check(hostile_stack, HEAD + chunked, status=200, upstream="s1")


@pytest.mark.parametrize("size", [b"ffffffffffffffffff", b"-1", b"0x10"], ids=repr)
def test_a_chunk_size_that_overflows_or_is_not_hex_is_a_400(hostile_stack: Stack, size: bytes) -> None:
    check(
        hostile_stack,
        HEAD + size + b"\r\n" + BODY + b"\r\n0\r\n\r\n",
        status=400,
        code="malformed_request",
        upstream=NOTHING,
    )


def test_a_chunked_body_over_the_limit_is_a_413(hostile_stack: Stack) -> None:
    piece = b"x" * 65536
    chunks = b"".join(b"%x\r\n" % len(piece) + piece + b"\r\n" for _ in range(5 * 16)) + b"0\r\n\r\n"  # 5 MiB
    check(hostile_stack, HEAD + chunks, status=413, code="request_too_large", upstream=NOTHING)
