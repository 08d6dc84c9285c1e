"""Header values that are not UTF-8, through the real Envoy (issue 15, item 4). Envoy copies the
headers it forwards to the router into protobuf strings as they came; one such byte used to make
the whole ext_proc message unreadable, and the client got a retryable 503 for its own input."""

from __future__ import annotations

import re

import pytest

from extproc.standin import StandIn
from tests.adversarial.hostile import NOTHING, check, request
from tests.harness import Stack, chat

pytestmark = pytest.mark.e2e

FORWARDED = ["x-session-id", "x-user-tier", "x-router-debug", "x-user-id", "x-tenant-id", "content-encoding"]
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def metric(stack: Stack, name: str, labels: str) -> float:
    for line in stack.metrics_text().splitlines():
        if line.startswith(f"{name}{{{labels}}}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.mark.parametrize("value", [b"a\xffb", b"\xc3\x28", b"caf\xe9", b"\xed\xa0\x80"], ids=repr)
@pytest.mark.parametrize("name", FORWARDED)
def test_a_forwarded_header_that_is_not_utf8_is_a_counted_400(hostile_stack: Stack, name: str, value: bytes) -> None:
    before = metric(hostile_stack, "extproc_request_errors_total", 'code="invalid_header"')
    answer = check(
        hostile_stack, request(headers=[(name, value)]), status=400, code="invalid_header", param=name, upstream=NOTHING
    )
    assert value.decode("latin-1") not in answer.error["message"]  # names the header, never echoes the value
    assert metric(hostile_stack, "extproc_request_errors_total", 'code="invalid_header"') == before + 1
    assert metric(hostile_stack, "extproc_stream_errors_total", 'reason="DecodeError"') == 0


def test_a_client_request_id_that_is_not_utf8_is_replaced_by_envoys(hostile_stack: Stack) -> None:
    answer = check(hostile_stack, request(headers=[("x-request-id", b"id-\xff")]), status=200, upstream="s1")
    assert UUID.match(answer.received[0][1].headers["x-request-id"])


def test_latin1_in_a_header_the_router_is_not_sent_passes_byte_for_byte(hostile_stack: Stack) -> None:
    answer = check(hostile_stack, request(headers=[("x-app-name", b"caf\xe9")]), status=200, upstream="s1")
    assert answer.received[0][1].headers["x-app-name"] == "caf\xe9"  # (the stand-in reads latin-1)


def test_two_round_trips_refuse_a_header_that_is_not_utf8_too(tmp_path) -> None:
    with Stack(
        tmp_path,
        "version: 1\ndefault_model: small\nmodels:\n  small: {replicas: {static: ['$s1'], envoy: original_dst}}\n",
        [StandIn(name="s1")],
        envoy_options={"two_round_trips": True},
    ) as stack:
        check(
            stack,
            request(headers=[("x-session-id", b"s-\xff")]),
            status=400,
            code="invalid_header",
            param="x-session-id",
            upstream=NOTHING,
        )


def test_long_session_ids_cost_the_session_table_a_digest_each(hostile_stack: Stack) -> None:
    """Distinct 48 KiB x-session-id values (Envoy allows 60 KiB of headers): the table that keeps
    each conversation on its model holds a fixed-size digest per session, not the id, so
    max_sessions (100,000) of them cannot grow the sidecar by gigabytes."""
    sessions = hostile_stack.sidecar.router.sessions
    before = hostile_stack.sidecar.run(lambda: len(sessions))
    for i in range(200):
        session = f"{i:06d}" + "s" * (48 * 1024)
        response = hostile_stack.post(chat(f"hello {i}"), headers={"x-session-id": session})
        assert response.status == 200, response.body[:200]
    keys = hostile_stack.sidecar.run(lambda: list(sessions._table))
    assert len(keys) - before == 200  # every conversation remembered
    assert max(len(k) for k in keys) <= 64
