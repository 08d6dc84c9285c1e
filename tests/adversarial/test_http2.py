"""Hostile HTTP/2 through the real Envoy, frame by frame (tests/adversarial/h2frames.py): rapid
resets, CONTINUATION and control-frame floods, too many streams, a zero window, malformed header
blocks. Envoy resets the stream or closes the connection (HTTP/2 has no JSON answer for a
malformed header block: README "Bad input"), nothing half-sent reaches a model server, every
lease comes back, and other clients are served."""

from __future__ import annotations

import orjson
import pytest

from tests.adversarial import h2frames as h2
from tests.adversarial.hostile import BODY, assert_still_serving
from tests.harness import Stack, chat, wait_for

pytestmark = pytest.mark.e2e


def received(stack: Stack) -> list[str]:
    return [r.name for r in stack.replicas for _ in r.received]


@pytest.fixture
def s(hostile_stack: Stack):
    for replica in hostile_stack.replicas:
        replica.received.clear()
    yield hostile_stack
    wait_for(lambda: hostile_stack.inflight() == {}, timeout=5)  # every lease came back
    assert hostile_stack.sidecar.run(lambda: hostile_stack.sidecar.router.tracker.open_leases) == 0
    assert_still_serving(hostile_stack)


def post(stream: int, body: bytes = BODY, extra=()) -> bytes:
    headers = h2.request_headers(length=len(body), extra=extra)
    return h2.frame(h2.HEADERS, h2.END_HEADERS, stream, headers) + h2.frame(h2.DATA, h2.END_STREAM, stream, body)


def test_a_request_and_an_error_over_raw_frames_are_answered_as_over_http1(s: Stack) -> None:
    conn = h2.Connection(s.port)
    unknown = orjson.dumps(chat("hi", model="gpt-9"))
    conn.send(post(1, unknown) + post(3))
    out = h2.collect(conn, {1, 3})
    conn.close()
    assert out.statuses[1] == 404 and orjson.loads(out.bodies[1])["error"]["code"] == "model_not_found"
    assert 3 in out.statuses and b'"answer from s1"' in out.bodies[3]
    assert received(s) == ["s1"]


def test_a_rapid_reset_flood_closes_the_connection_and_leaves_no_lease(s: Stack) -> None:
    # Whole requests, each reset at once (CVE-2023-44487): the router may have picked a replica
    # for some before Envoy saw the reset.
    conn = h2.Connection(s.port)
    flood = b"".join(
        post(sid) + h2.frame(h2.RST_STREAM, 0, sid, h2.CANCEL.to_bytes(4, "big")) for sid in range(1, 2001, 2)
    )
    conn.send(flood)
    out = h2.collect(conn, set(), until_closed=True)
    conn.close()
    assert out.closed  # Envoy's premature-reset limit ended the connection
    assert len(received(s)) < 1000


def test_resets_of_half_sent_requests_reach_no_model_server(s: Stack) -> None:
    conn = h2.Connection(s.port)
    flood = b"".join(
        h2.frame(h2.HEADERS, h2.END_HEADERS, sid, h2.request_headers(length=len(BODY)))
        + h2.frame(h2.DATA, 0, sid, BODY[:10])
        + h2.frame(h2.RST_STREAM, 0, sid, h2.CANCEL.to_bytes(4, "big"))
        for sid in range(1, 401, 2)
    )
    conn.send(flood)
    conn.sock.settimeout(1.0)  # (Envoy keeps this connection: 200 resets are under its limit)
    h2.collect(conn, set(), until_closed=True)
    conn.close()
    assert received(s) == []


def test_an_endless_header_block_is_cut_off(s: Stack) -> None:
    conn = h2.Connection(s.port)
    conn.send(h2.frame(h2.HEADERS, 0, 1, h2.request_headers(length=len(BODY))))
    junk = h2.block([(f"x-j{i}", "v" * 100) for i in range(50)])
    sent = 0
    while sent < 5000 and conn.send(h2.frame(h2.CONTINUATION, 0, 1, junk)):
        sent += 1
    out = h2.collect(conn, {1}, until_closed=True)
    conn.close()
    assert sent < 5000 or out.closed or 1 in out.resets  # Envoy stopped reading it: ~60 KiB of headers
    assert 1 not in out.statuses and received(s) == []


@pytest.mark.parametrize(
    "kind",
    [h2.PING, h2.SETTINGS, h2.WINDOW_UPDATE],
    ids=["PING", "SETTINGS", "WINDOW_UPDATE"],
)
def test_a_control_frame_flood_from_a_client_that_never_reads_ends_its_connection(s: Stack, kind: int) -> None:
    payload = {h2.PING: b"12345678", h2.SETTINGS: b"", h2.WINDOW_UPDATE: (1).to_bytes(4, "big")}[kind]
    conn = h2.Connection(s.port)
    one = h2.frame(kind, 0, 0, payload)
    for _ in range(200):  # 200 x 200 frames, never reading the answers (acks)
        if not conn.send(one * 200):
            break
    out = h2.collect(conn, set(), until_closed=True)
    conn.close()
    assert out.closed or kind == h2.WINDOW_UPDATE  # (window updates need no answer)
    assert received(s) == []


def test_streams_beyond_the_hundredth_open_at_once_are_refused(s: Stack) -> None:
    conn = h2.Connection(s.port)
    ids = list(range(1, 241, 2))  # 120 streams, bodies still to come
    conn.send(b"".join(h2.frame(h2.HEADERS, h2.END_HEADERS, i, h2.request_headers(length=len(BODY))) for i in ids))
    conn.sock.settimeout(1.0)
    early = h2.collect(conn, set(ids))  # (returns on the socket timeout)
    refused = {i for i, code in early.resets.items() if code == h2.REFUSED_STREAM}
    assert refused == set(ids[100:]), sorted(early.resets.items())[:5]
    conn.sock.settimeout(10)
    conn.send(b"".join(h2.frame(h2.DATA, h2.END_STREAM, i, BODY) for i in ids[:100]))
    out = h2.collect(conn, set(ids[:100]))
    conn.close()
    assert set(out.statuses) == set(ids[:100])  # (their status codes: see the dynamic-table note)
    assert received(s) == ["s1"] * 100


def test_a_client_that_opens_no_window_holds_up_no_one_and_its_lease_ends_with_it(s: Stack) -> None:
    zero = h2.SETTINGS_INITIAL_WINDOW_SIZE.to_bytes(2, "big") + (0).to_bytes(4, "big")
    conn = h2.Connection(s.port, settings=zero)
    conn.send(post(1, orjson.dumps(chat("stream to me", stream=True))))
    wait_for(lambda: received(s) == ["s1"], timeout=5)
    for _ in range(3):
        assert_still_serving(s)  # others are answered while this answer waits for a window
    conn.close()  # the fixture checks that its lease ended


MALFORMED = [
    ("an upper-case field name", [("X-Upper", "v")]),
    ("a connection-specific field", [("connection", "keep-alive")]),
    ("te other than trailers", [("te", "gzip")]),
    ("a second :path", [(":path", "/v1/completions")]),
    ("over 100 fields", [(f"x-h{i}", "v") for i in range(120)]),
    ("a NUL in a value", [("x-note", b"a\x00b")]),
]


@pytest.mark.parametrize(("case", "headers"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_a_malformed_header_block_resets_its_stream_and_the_connection_carries_on(
    s: Stack, case: str, headers: list
) -> None:
    conn = h2.Connection(s.port)
    conn.send(post(1, extra=headers))
    bad = h2.collect(conn, {1})
    assert 1 not in bad.statuses and (1 in bad.resets or bad.closed), bad
    if not bad.closed:
        conn.send(post(3))  # the next stream on the same connection is served
        assert h2.collect(conn, {3}).statuses.get(3) == 200
    conn.close()
    assert received(s) == (["s1"] if not bad.closed else [])


@pytest.mark.parametrize("delta", [-5, 5], ids=["shorter", "longer"])
def test_a_body_that_disagrees_with_its_content_length_reaches_no_model_server(s: Stack, delta: int) -> None:
    conn = h2.Connection(s.port)
    headers = h2.request_headers(length=len(BODY) + delta)
    conn.send(h2.frame(h2.HEADERS, h2.END_HEADERS, 1, headers) + h2.frame(h2.DATA, h2.END_STREAM, 1, BODY))
    out = h2.collect(conn, {1})
    conn.close()
    assert 1 not in out.statuses or out.statuses[1] >= 400
    assert received(s) == []


def test_the_routers_headers_sent_over_http2_are_stripped_too(s: Stack) -> None:
    l1 = s.fleet["l1"].address
    conn = h2.Connection(s.port)
    conn.send(post(1, extra=[("x-gateway-destination-endpoint", l1), ("x-extproc-cluster", "large")]))
    assert h2.collect(conn, {1}).statuses[1] == 200
    conn.close()
    assert received(s) == ["s1"]
    assert "x-gateway-destination-endpoint" not in s.fleet["s1"].received[0].headers
