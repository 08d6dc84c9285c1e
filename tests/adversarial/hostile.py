"""Hostile requests through the real Envoy, one reusable check.

``check(stack, raw_bytes, status=..., code=..., upstream=...)`` sends bytes exactly as given on
a fresh TCP connection (so malformed requests stay malformed; a list of pieces is sent with
``pause`` seconds between them, as a slow client would), then asserts, in this order:

* the HTTP status;
* for an error, an OpenAI-style JSON body: ``{"error": {"message", "type", "param", "code"}}``
  with ``content-type: application/json`` and the expected code;
* what the stand-in model servers received during the exchange: ``NOTHING``, one request on a
  named replica (optionally with its path), or any callable over the received list;
* that a normal request right after is served and routed, within ``FOLLOW_UP_TIMEOUT``.

``request(...)`` builds the raw bytes; header names and values may be bytes, so invalid ones
(NUL, bare CR, bytes that are not UTF-8) reach Envoy as written.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from extproc.standin import Received
from tests.harness import Stack, chat

FOLLOW_UP_TIMEOUT = 10.0  # a liveness bound for the request after each case, not a benchmark


class _Nothing:
    def __repr__(self) -> str:
        return "NOTHING"


NOTHING = _Nothing()  # no model server may receive anything
BODY = orjson.dumps(chat("hello there"))

Header = tuple[str | bytes, str | bytes]


def _b(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def request(
    path: str | bytes = "/v1/chat/completions",
    body: bytes | None = BODY,
    headers: Sequence[Header] = (),
    *,
    method: str | bytes = "POST",
    version: str | bytes = "HTTP/1.1",
    host: bool = True,
    content_length: bool = True,
) -> bytes:
    """One raw HTTP/1 request: the request line, ``host`` and ``content-type`` and
    ``content-length`` unless told otherwise, the given headers in order, then the body."""
    lines = [b" ".join((_b(method), _b(path), _b(version)))]
    if host:
        lines.append(b"host: router.test")
    if body is not None:
        lines.append(b"content-type: application/json")
        if content_length:
            lines.append(b"content-length: %d" % len(body))
    lines += [_b(name) + b": " + _b(value) for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


@dataclass
class Answer:
    status: int  # 0: the connection closed without a response
    headers: dict[str, str]
    body: bytes
    received: list[tuple[str, Received]] = field(default_factory=list)  # (replica, request) this exchange

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        return self.json()["error"]


def send(port: int, data: bytes | Sequence[bytes], timeout: float = 10.0, pause: float = 0.0) -> Answer:
    """Send data (or its pieces, ``pause`` seconds apart) on a new connection and read one HTTP/1
    response (content-length, chunked or until close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        for i, piece in enumerate([data] if isinstance(data, bytes) else data):
            if i:
                time.sleep(pause)
            try:
                conn.sendall(piece)
            except OSError:  # closed by Envoy before the client was done: read what it said
                break
        buffer = b""
        while b"\r\n\r\n" not in buffer or buffer.startswith(b"HTTP/1.1 1"):
            if buffer.startswith(b"HTTP/1.1 1") and b"\r\n\r\n" in buffer:
                buffer = buffer.partition(b"\r\n\r\n")[2]  # an interim response (100 Continue)
                continue
            chunk = _recv(conn)
            if not chunk:
                return Answer(0, {}, buffer)
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        status = int(status_line.split(" ")[1])
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(rest) < length:
                chunk = _recv(conn)
                if not chunk:
                    break
                rest += chunk
            body = rest[:length]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while not rest.endswith(b"0\r\n\r\n"):
                chunk = _recv(conn)
                if not chunk:
                    break
                rest += chunk
            body = _dechunk(rest)
        else:
            while chunk := _recv(conn):
                rest += chunk
            body = rest
        return Answer(status, headers, body)


def _recv(conn: socket.socket) -> bytes:
    try:
        return conn.recv(65536)
    except (ConnectionResetError, TimeoutError):
        return b""


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2 :]
    return out


def check(
    stack: Stack,
    data: bytes | Sequence[bytes],
    *,
    status: int,
    code: str | None = None,
    param: Any = ...,
    upstream: Any = NOTHING,
    path: str | None = None,
    follow_up: bool = True,
    pause: float = 0.0,
) -> Answer:
    """Send data through stack's Envoy and assert the outcome (see the module docstring).

    ``code``: the error code of an OpenAI-style JSON error body (None: not an error body).
    ``param``: the error's param (``...``: any value, but the key must be there).
    ``upstream``: NOTHING, a replica name (exactly one request, there), a callable over the
    received (replica, request) pairs, or None (not checked). ``path``: the path that replica
    must have received.
    """
    for replica in stack.replicas:
        replica.received.clear()
    answer = send(stack.port, data, pause=pause)
    answer.received = [(r.name, got) for r in stack.replicas for got in r.received]
    assert answer.status == status, (answer.status, answer.body[:300])
    if code is not None:
        assert answer.headers.get("content-type") == "application/json", answer.headers
        error = answer.error
        assert set(error) == {"message", "type", "param", "code"}, error
        assert error["code"] == code, error
        assert isinstance(error["message"], str) and error["message"], error
        assert error["type"] in ("invalid_request_error", "server_error"), error
        if param is not ...:
            assert error["param"] == param, error
    if upstream is NOTHING:
        assert answer.received == [], [(name, got.path) for name, got in answer.received]
    elif isinstance(upstream, str):
        assert [name for name, _ in answer.received] == [upstream], [(n, g.path) for n, g in answer.received]
        if path is not None:
            assert answer.received[0][1].path == path
    elif callable(upstream):
        upstream(answer.received)
    if follow_up:
        assert_still_serving(stack)
    return answer


def assert_still_serving(stack: Stack) -> None:
    """A plain routed request right after is answered by a replica, through the router."""
    answer = send(stack.port, request(body=orjson.dumps(chat("are you still there?"))), timeout=FOLLOW_UP_TIMEOUT)
    assert answer.status == 200, (answer.status, answer.body[:300])
    assert answer.headers.get("x-router-model"), answer.headers
