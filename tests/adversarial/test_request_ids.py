"""A client-chosen x-request-id never reaches the logs (issue 15, item 9): Envoy drops it and
makes its own id, which the decision log carries and the client gets back."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator

import orjson
import pytest

from extproc.logs import JsonFormatter
from tests.adversarial.hostile import check, request
from tests.harness import Stack

pytestmark = pytest.mark.e2e

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def captured() -> Iterator[_Capture]:
    capture, root = _Capture(), logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)


@pytest.mark.parametrize(
    "client_id",
    ["078-05-1120-ZEBRAREQID", "3f2c1a9e-0000-4000-8000-000000000001", "a" * 200],
    ids=["ssn-shaped", "uuid-shaped", "long"],
)
def test_the_decision_log_carries_envoys_request_id_never_the_clients(
    hostile_stack: Stack, captured: _Capture, client_id: str
) -> None:
    answer = check(hostile_stack, request(headers=[("x-request-id", client_id)]), status=200, upstream="s1")
    envoy_id = answer.headers["x-request-id"]  # returned to the client for support requests
    assert UUID.match(envoy_id) and envoy_id != client_id
    assert answer.received[0][1].headers["x-request-id"] == envoy_id
    decisions = [orjson.loads(line) for line in captured.lines if '"event":"decision"' in line]
    assert envoy_id in [d["request_id"] for d in decisions]
    assert not any(client_id in line for line in captured.lines)
