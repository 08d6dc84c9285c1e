"""Outlier detection without a server: counts, ejection times, the pool share, probes, and
reading Envoy's access log entries into outcomes."""

from __future__ import annotations

import asyncio
import socket

import pytest

from extproc._pb.envoy.data.accesslog.v3 import accesslog_pb2
from extproc.accesslog import upstream_outcomes
from extproc.policy import parse_policy
from extproc.policy.config import OutlierDetection, PickingSettings
from extproc.replicas.health import (
    CONNECT_PROBE,
    CONSECUTIVE_5XX,
    CONSECUTIVE_LOCAL_ORIGIN_FAILURE,
    Outcome,
    OutlierDetector,
)
from extproc.replicas.load import LoadTracker
from extproc.replicas.picking import PickRequest, build_picker
from extproc.replicas.prefix import PrefixIndex

POOL = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000")
A, B, C, D = POOL
FAIL, ERR, OK = Outcome.LOCAL_ORIGIN_FAILURE, Outcome.ERROR_5XX, Outcome.SUCCESS


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def detector(**settings: object) -> tuple[OutlierDetector, Clock, list[tuple[str, str]]]:
    clock, events = Clock(), []
    d = OutlierDetector(
        OutlierDetection(**{"connect_probe": False, **settings}),  # type: ignore[arg-type]
        on_eject=lambda model, reason: events.append((model, reason)),
        on_overflow=lambda model: events.append((model, "overflow")),
        clock=clock,
    )
    return d, clock, events


def feed(d: OutlierDetector, endpoint: str, *outcomes: Outcome, pool: tuple[str, ...] = POOL) -> list[str | None]:
    return [d.observe(endpoint, "m", o, pool) for o in outcomes]


def test_consecutive_connect_failures_eject_and_a_success_in_between_resets_the_count() -> None:
    d, _, events = detector(consecutive_local_origin_failure=3)
    feed(d, A, FAIL, FAIL, OK, FAIL, FAIL)
    assert not d.is_ejected(A)
    assert feed(d, A, FAIL) == [CONSECUTIVE_LOCAL_ORIGIN_FAILURE]
    assert d.is_ejected(A) and events == [("m", CONSECUTIVE_LOCAL_ORIGIN_FAILURE)]


def test_5xx_answers_count_apart_from_connect_failures() -> None:
    d, _, _ = detector(consecutive_5xx=3, consecutive_local_origin_failure=3)
    feed(d, A, ERR, ERR, FAIL, FAIL)  # split counters: neither reaches three
    assert not d.is_ejected(A)
    assert feed(d, A, ERR) == [CONSECUTIVE_5XX]  # a connect failure does not reset the 5xx count
    feed(d, B, FAIL, FAIL, ERR, FAIL)  # but an answer (even a 5xx) resets the connect-failure count
    assert not d.is_ejected(B)


def test_ejection_time_grows_with_each_ejection_up_to_the_cap_and_decays_when_healthy() -> None:
    d, clock, _ = detector(
        consecutive_local_origin_failure=1, base_ejection_time=10, max_ejection_time=25, interval=100
    )
    spans = []
    for _ in range(4):
        feed(d, A, FAIL)
        start = clock.now
        while d.is_ejected(A):
            clock.now += 1
        spans.append(clock.now - start)
    assert spans == [10, 20, 25, 25]  # base x ejections, capped
    clock.now += 350  # healthy for three and a half intervals: three off the count (4 -> 1)
    feed(d, A, FAIL)
    start = clock.now
    while d.is_ejected(A):
        clock.now += 1
    assert clock.now - start == 20


def test_never_more_than_max_ejection_percent_of_a_pool_is_out() -> None:
    d, _, events = detector(consecutive_local_origin_failure=1, max_ejection_percent=50)
    for endpoint in POOL:
        feed(d, endpoint, FAIL)
    assert [e for e in POOL if d.is_ejected(e)] == [A, B]
    assert events.count(("m", "overflow")) == 2
    single, _, _ = detector(consecutive_local_origin_failure=1, max_ejection_percent=50)
    feed(single, A, FAIL, pool=(A,))
    assert not single.is_ejected(A)  # the only replica stays: an error beats no replica at all


def test_disabled_detection_ejects_nothing_and_disabling_returns_every_replica() -> None:
    d, _, _ = detector(consecutive_local_origin_failure=1)
    feed(d, A, FAIL)
    assert d.is_ejected(A)
    d.configure(OutlierDetection(enabled=False))
    assert not d.is_ejected(A)
    feed(d, B, FAIL, FAIL, FAIL, FAIL, FAIL)
    assert not d.ejected


def test_picks_leave_ejected_replicas_out_even_as_fallbacks_and_explain_why() -> None:
    d, _, _ = detector(consecutive_local_origin_failure=1)
    tracker = LoadTracker()
    picker = build_picker(PickingSettings(fallbacks=3), tracker, PrefixIndex(100), health=d)
    feed(d, B, FAIL)
    for i in range(20):
        pick = picker.pick(PickRequest("m", [], session=f"s{i}"), POOL, explain=True)
        assert pick is not None
        assert B not in pick.endpoints and len(pick.endpoints) == 3
        assert pick.excluded == {B: "outlier_detection"}


def test_a_pool_whose_every_replica_is_out_is_picked_from_whole() -> None:
    d, _, _ = detector(consecutive_local_origin_failure=1, max_ejection_percent=100)
    picker = build_picker(PickingSettings(), LoadTracker(), PrefixIndex(100), health=d)
    feed(d, A, FAIL, pool=(A, B))
    feed(d, B, FAIL, pool=(A, B))
    pick = picker.pick(PickRequest("m", []), (A, B))
    assert pick is not None and set(pick.endpoints) == {A, B}


def listening() -> socket.socket:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    return server


def test_with_connect_probe_a_replica_returns_only_once_it_accepts_connections() -> None:
    clock, events = Clock(), []
    server = listening()
    endpoint = f"127.0.0.1:{server.getsockname()[1]}"
    server.close()  # the replica is down
    d = OutlierDetector(
        OutlierDetection(consecutive_local_origin_failure=1, base_ejection_time=10),
        on_eject=lambda model, reason: events.append(reason),
        clock=clock,
        probe_timeout=0.5,
    )
    d.observe(endpoint, "m", FAIL, (endpoint, A))
    clock.now += 10
    assert d.due() == [endpoint]
    asyncio.run(d.probe_due())
    assert d.is_ejected(endpoint) and events == [CONSECUTIVE_LOCAL_ORIGIN_FAILURE, CONNECT_PROBE]
    clock.now += 19
    assert d.due() == []  # the second ejection is twice as long
    clock.now += 1
    host, port = endpoint.rsplit(":", 1)
    with socket.create_server((host, int(port))):  # the replica is back
        asyncio.run(d.probe_due())
    assert not d.is_ejected(endpoint)


def test_replicas_that_left_every_pool_are_forgotten() -> None:
    d, _, _ = detector(consecutive_local_origin_failure=1)
    feed(d, A, FAIL)
    feed(d, B, FAIL)
    feed(d, C, ERR)  # a failure on record, not an ejection
    d.retain([B, D])
    assert d.ejected == {B}
    d.retain([D])
    assert not d.ejected and not d.tracked


def test_outlier_detection_from_yaml_keeps_unset_defaults_and_matches_the_schema() -> None:
    from extproc.policy.load import schema

    text = "models: {m: {}}\ndefault_model: m\npicking: {outlier_detection: {consecutive_5xx: 2, interval: 0.5s}}\n"
    settings = parse_policy(text).picking.outlier_detection
    assert settings == OutlierDetection(consecutive_5xx=2, interval=0.5)
    declared = schema()["$defs"]["outlier_detection"]["properties"]
    defaults = OutlierDetection()
    assert set(declared) == set(OutlierDetection.__dataclass_fields__)
    for name, spec in declared.items():
        value = spec["default"]
        if isinstance(value, str):
            value = float(value.removesuffix("s"))
        assert value == getattr(defaults, name), name


def entry(
    code: int,
    details: str = "via_upstream",
    host: str = "10.0.0.1",
    port: int = 8000,
    attempts: int = 1,
    **flags: bool,
) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.common_properties.upstream_request_attempt_count = attempts
    if host:
        e.common_properties.upstream_remote_address.socket_address.address = host
        e.common_properties.upstream_remote_address.socket_address.port_value = port
    for name, value in flags.items():
        setattr(e.common_properties.response_flags, name, value)
    if code:
        e.response.response_code.value = code
    e.response.response_code_details = details
    return e


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        (entry(200), [(A, OK)]),
        (entry(404), [(A, OK)]),  # the replica answered: a client error is not its failure
        (entry(503), [(A, ERR)]),
        (
            entry(
                503,
                "upstream_reset_before_response_started{remote_connection_failure}",
                upstream_connection_failure=True,
            ),
            [(A, FAIL)],
        ),
        (entry(200, upstream_connection_termination=True), [(A, FAIL)]),  # died mid-stream
        (entry(504, "upstream_response_timeout", upstream_request_timeout=True), [(A, FAIL)]),
        (entry(0, "downstream_remote_disconnect", downstream_connection_termination=True), []),  # the client left
        (entry(503, "no_healthy_upstream", host="", attempts=0, no_healthy_upstream=True), []),
        (entry(200, host="10.0.0.3", attempts=3), [(A, FAIL), (B, FAIL), (C, OK)]),  # retried down the list
    ],
    ids=[
        "200",
        "404",
        "503",
        "connect-failure",
        "reset-mid-stream",
        "timeout",
        "client-left",
        "no-upstream",
        "retried",
    ],
)
def test_access_log_entries_become_outcomes_per_replica_tried(log, expected) -> None:
    assert upstream_outcomes(log, [A, B, C]) == expected
