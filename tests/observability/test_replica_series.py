"""Per-replica series end when the replica leaves its pool, so pod churn cannot grow /metrics
without bound; and the sidecar exports its own process and runtime metrics."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from extproc.app import Runtime, Settings
from extproc.replicas.pool import Discovery
from extproc.router import Call
from tests.harness import Sidecar, free_port, wait_for
from tests.replicas.fake_apiserver import FakeApiServer, endpoint, endpoint_slice, port

STATIC = """
version: 1
default_model: small
models:
  small: {{replicas: {{static: [{endpoints}]}}}}
"""
DISCOVERED = """
version: 1
default_model: small
models:
  small: {replicas: {kubernetes: {namespace: llm, service: vllm, port: 8000}}}
"""


def scrape(sidecar: Sidecar) -> str:
    url = f"http://127.0.0.1:{sidecar.settings.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def replica_series(text: str) -> set[tuple[str, str]]:
    """(metric, replica) of every sample labelled with a replica."""
    return {
        (m["metric"], m["replica"])
        for m in re.finditer(r'^(?P<metric>extproc_\w+)\{[^}]*replica="(?P<replica>[^"]+)"', text, re.M)
    }


def pick_until_both_are_used(sidecar: Sidecar, replicas: set[str]) -> None:
    """Route requests (their leases stay open, so the load scorer spreads them) until every
    replica has been picked."""
    for i in range(40):
        body = orjson.dumps({"model": "small", "messages": [{"role": "user", "content": f"question {i}"}]})
        sidecar.call(sidecar.router.route(Call("POST", "/v1/chat/completions", {}, body, f"r{i}")))
        picked = {r for metric, r in replica_series(scrape(sidecar)) if metric == "extproc_replica_picks_total"}
        if picked >= replicas:
            return
    pytest.fail(f"picks never reached every replica: {picked}")


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator:
    started: list[Sidecar] = []

    def start(policy: str, discovery: Discovery | None = None) -> Sidecar:
        config = tmp_path / "policy.yaml"
        config.write_text(policy)
        settings = Settings(
            config=config,
            uds=str(tmp_path / "extproc.sock"),
            metrics_port=free_port(),
            metrics_address="127.0.0.1",
            reload=True,
            reload_debounce=0.1,
        )
        sidecar = Sidecar(settings, Runtime(settings, discovery=discovery)).start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        sidecar.stop()


def test_a_replica_dropped_from_a_static_pool_on_reload_loses_its_series(start_sidecar) -> None:
    sidecar = start_sidecar(STATIC.format(endpoints='"10.0.0.1:8000", "10.0.0.2:8000"'))
    pick_until_both_are_used(sidecar, {"10.0.0.1:8000", "10.0.0.2:8000"})
    before = replica_series(scrape(sidecar))
    assert ("extproc_replica_picks_total", "10.0.0.2:8000") in before
    assert ("extproc_replica_inflight", "10.0.0.2:8000") in before

    sidecar.settings.config.write_text(STATIC.format(endpoints='"10.0.0.1:8000"'))

    wait_for(lambda: ("extproc_replica_picks_total", "10.0.0.2:8000") not in replica_series(scrape(sidecar)))
    text = scrape(sidecar)
    assert 'extproc_replica_picks_total{model="small",replica="10.0.0.1:8000"}' in text
    # Its leases are still open: they show under model "unknown" until they end, never as "small".
    assert 'extproc_replica_inflight{model="small",replica="10.0.0.2:8000"}' not in text


def test_a_pod_leaving_a_discovered_pool_loses_its_series_without_a_reload(start_sidecar) -> None:
    def vllm(*addresses: str) -> dict:
        return endpoint_slice(
            "vllm-a", namespace="llm", service="vllm", endpoints=[endpoint(a) for a in addresses], ports=[port(8000)]
        )

    with FakeApiServer() as api:
        api.apply(vllm("10.1.0.1", "10.1.0.2"))
        sidecar = start_sidecar(DISCOVERED, Discovery(api_client=api.api_client(), sync_timeout=10))
        pick_until_both_are_used(sidecar, {"10.1.0.1:8000", "10.1.0.2:8000"})

        api.apply(vllm("10.1.0.1", "10.1.0.3"))  # a rollout replaced one pod

        def gone() -> bool:
            series = replica_series(scrape(sidecar))
            return ("extproc_replica_picks_total", "10.1.0.2:8000") not in series and (
                "extproc_replica_inflight",
                "10.1.0.3:8000",
            ) in series

        wait_for(gone)
        assert ("extproc_replica_picks_total", "10.1.0.1:8000") in replica_series(scrape(sidecar))


def test_process_and_python_runtime_metrics_are_exported(start_sidecar) -> None:
    sidecar = start_sidecar(STATIC.format(endpoints='"10.0.0.1:8000"'))
    text = scrape(sidecar)
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "python_info",
        "python_gc_collections_total",
    ):
        assert re.search(rf"^{name}(\{{| )", text, re.M), name
