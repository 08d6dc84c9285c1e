"""The outage nobody saw before: the sidecar dies while Envoy keeps taking requests. A real
Prometheus scrapes the sidecar and Envoy's stats listener as the chart's ServiceMonitor does and
evaluates the chart's alerts; Envoy answers every request with a fast 503 router_unavailable (and
Retry-After); the alerts for it fire from Envoy's own stats, which outlive the sidecar. Then Envoy
dies too, and its alert fires."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from extproc.standin import StandIn
from tests.harness import Stack, chat, free_port, wait_for
from tests.observability.prom import (
    POD,
    Prometheus,
    chart_monitoring,
    needs_prometheus,
    write_rules,
)

pytestmark = [needs_prometheus, pytest.mark.e2e]

POLICY = """
version: 1
default_model: small
models:
  small:
    replicas: {static: ["$s1"], envoy: original_dst}
"""
IMMEDIATE = {"for": "0s"}
OUTAGE_ALERTS = {"ExtprocSidecarDown", "ExtprocRouterUnavailable", "ExtprocEnvoyServerErrors"}


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Stack, Prometheus]]:
    rendered = chart_monitoring(
        {name: IMMEDIATE for name in ("sidecarDown", "envoyDown", "routerUnavailable", "envoyServerErrors")}
    )
    stats_port = free_port()
    stack = Stack(tmp_path, POLICY, [StandIn(name="s1")], envoy_options={"stats_port": stats_port})
    with stack:
        prometheus = Prometheus(
            tmp_path, stack.metrics_port, write_rules(rendered, tmp_path / "rules.yaml"), envoy_stats_port=stats_port
        )
        try:
            prometheus.start()
            yield stack, prometheus
        finally:
            prometheus.stop()


def query_value(prometheus: Prometheus, expr: str) -> float:
    result = prometheus.query(expr)["data"]["result"]
    return sum(float(sample["value"][1]) for sample in result)


def test_the_sidecar_down_fires_its_alerts_from_envoys_own_stats(watched: tuple[Stack, Prometheus]) -> None:
    stack, prometheus = watched
    for _ in range(20):
        assert stack.post(chat("hello")).status == 200
    wait_for(lambda: prometheus.last_scrape() > 0, timeout=60, interval=0.2)
    wait_for(lambda: query_value(prometheus, 'sum(up{endpoint="envoy-stats"})') == 1, timeout=30, interval=0.2)
    # (Before the first scrapes, absent() held: with no waiting period those fired at first.)
    wait_for(lambda: not set(prometheus.firing()) & (OUTAGE_ALERTS | {"ExtprocEnvoyDown"}), timeout=30, interval=0.2)

    stack.sidecar.stop()
    del stack.sidecar  # stopped here, not again by the stack
    answers = []

    def outage_seen() -> bool:
        answer = stack.post(chat("hello"))
        answers.append((answer.status, answer.json()["error"]["code"], answer.headers.get("retry-after")))
        return set(prometheus.firing()) >= OUTAGE_ALERTS

    wait_for(outage_seen, timeout=90, interval=0.3)
    assert set(answers) == {(503, "router_unavailable", "1")}
    firing = prometheus.firing()
    assert firing["ExtprocSidecarDown"][0]["pod"] == POD  # the pod whose sidecar is down
    failed = 'sum(envoy_http_ext_proc_streams_failed{envoy_http_conn_manager_prefix="llm"})'
    # Every one of those replies is counted by Envoy and scraped while the sidecar is away (the
    # alerts may have fired on a scrape taken before the last few answers).
    wait_for(lambda: query_value(prometheus, failed) >= len(answers), timeout=30, interval=0.3)
    assert "ExtprocEnvoyDown" not in firing

    stack.envoy.stop()
    wait_for(lambda: "ExtprocEnvoyDown" in prometheus.firing(), timeout=60, interval=0.3)
