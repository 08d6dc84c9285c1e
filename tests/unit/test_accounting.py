"""The end of each request, as Envoy's access log reports it: leases, statuses, tokens, cost."""

from __future__ import annotations

import subprocess
import sys

import pytest

from extproc._pb.envoy.data.accesslog.v3 import accesslog_pb2
from extproc.accesslog import finished
from extproc.policy import parse_policy
from extproc.replicas.pool import Discovery, Pools
from extproc.router import Router, RouterState

POLICY = parse_policy("""
default_model: small
cost: {baseline_model: large}
models:
  small:
    pricing: {input_per_million: 0.20, output_per_million: 0.60}
    replicas: {static: ["10.0.0.1:8000"]}
  large:
    pricing: {input_per_million: 3.00, output_per_million: 15.00}
  free: {}
""")


def router() -> Router:
    return Router(RouterState(POLICY, Pools.build(POLICY, Discovery())))


def entry(
    model: str | None,
    status: int = 200,
    lease: str | None = None,
    usage: dict | None = None,
    intermediate: bool = False,
) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.common_properties.intermediate_log_entry = intermediate
    if model is not None:
        decision = e.common_properties.metadata.filter_metadata["extproc"]
        decision.update({"model": model, **({"lease": lease} if lease else {})})
    if usage is not None:
        e.common_properties.metadata.filter_metadata["extproc.usage"].update(usage)
    e.response.response_code.value = status
    return e


def sample(r: Router, name: str, **labels: str) -> float:
    return r.metrics.registry.get_sample_value(name, labels) or 0.0


def test_cost_and_baseline_cost_match_hand_computed_values() -> None:
    r = router()
    finished(r, entry("small", usage={"input": 1200, "output": 300}))
    finished(r, entry("small", usage={"input": 800, "output": 700}))
    # small: (2000 x 0.20 + 1000 x 0.60) / 1e6 = 0.001 USD; on large: (2000 x 3 + 1000 x 15) / 1e6 = 0.021 USD
    assert sample(r, "extproc_tokens_total", model="small", kind="input") == 2000
    assert sample(r, "extproc_tokens_total", model="small", kind="output") == 1000
    assert sample(r, "extproc_cost_usd_total", model="small") == pytest.approx(0.001)
    assert sample(r, "extproc_baseline_cost_usd_total", model="small") == pytest.approx(0.021)
    # savings = baseline - cost = 0.020 USD
    saved = sample(r, "extproc_baseline_cost_usd_total", model="small") - sample(
        r, "extproc_cost_usd_total", model="small"
    )
    assert saved == pytest.approx(0.020)


def test_the_baseline_model_itself_saves_nothing_and_unpriced_models_cost_nothing() -> None:
    r = router()
    finished(r, entry("large", usage={"input": 1000, "output": 1000}))
    assert sample(r, "extproc_cost_usd_total", model="large") == pytest.approx(0.018)
    assert sample(r, "extproc_baseline_cost_usd_total", model="large") == pytest.approx(0.018)
    finished(r, entry("free", usage={"input": 10, "output": 10}))
    assert sample(r, "extproc_tokens_total", model="free", kind="input") == 10
    assert sample(r, "extproc_cost_usd_total", model="free") == 0.0


def test_failed_responses_are_counted_but_not_billed() -> None:
    r = router()
    finished(r, entry("small", status=503, usage={"input": 100, "output": 100}))
    finished(r, entry("small", status=200))
    assert sample(r, "extproc_upstream_responses_total", model="small", code="5xx") == 1
    assert sample(r, "extproc_upstream_responses_total", model="small", code="2xx") == 1
    assert sample(r, "extproc_tokens_total", model="small", kind="input") == 0


def test_access_log_entries_end_leases_once() -> None:
    r = router()
    lease = r.tracker.acquire("10.0.0.1:8000", "small")
    finished(r, entry("small", lease=str(lease.id), intermediate=True))
    assert r.tracker.inflight["10.0.0.1:8000"] == 1  # intermediate entries do not end requests
    finished(r, entry("small", status=0, lease=str(lease.id)))  # a reset request has no status
    finished(r, entry("small", lease=str(lease.id)))  # duplicates are harmless
    assert dict(r.tracker.inflight) == {} and r.tracker.open_leases == 0
    finished(r, entry(None))  # requests the router never decided on are ignored


def test_leases_older_than_the_longest_request_expire() -> None:
    r = router()
    lease = r.tracker.acquire("10.0.0.1:8000", "small")
    assert r.tracker.expire(now=lease.taken + r.tracker.max_age_seconds - 1) == 0
    # (not exactly max_age later: taken + max_age - max_age need not round back to taken)
    assert r.tracker.expire(now=lease.taken + r.tracker.max_age_seconds + 0.01) == 1
    assert dict(r.tracker.inflight) == {}


def test_generated_protocol_code_is_fresh() -> None:
    pytest.importorskip("grpc_tools")
    result = subprocess.run([sys.executable, "protos/compile.py", "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
