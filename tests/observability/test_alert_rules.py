"""The chart's alerts, unit-tested with `promtool test rules`: each fires on the series that
describe its fault and stays quiet on healthy ones. Series carry the labels a ServiceMonitor
gives them (namespace, job = the Service name)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.observability.prom import (
    TARGET_LABELS,
    alert_rules,
    chart_monitoring,
    needs_prometheus,
    promtool,
    write_rules,
)

pytestmark = needs_prometheus

MINUTES = 420  # 7 hours of one-minute samples: enough for the 6h window of the share alert


def series(name: str, values: list[float | None], **labels: str) -> dict[str, str]:
    """An input series from per-minute values (None: no sample, the series does not exist yet)."""
    text = ",".join(f'{k}="{v}"' for k, v in {**TARGET_LABELS, **labels}.items())
    return {"series": f"{name}{{{text}}}", "values": " ".join("_" if v is None else f"{v:g}" for v in values)}


def counter(per_minute: float | list[float], minutes: int = MINUTES, start: int = 0) -> list[float | None]:
    """A counter growing by per_minute (a number, or one number per minute); absent before start."""
    rates = per_minute if isinstance(per_minute, list) else [per_minute] * minutes
    values: list[float | None] = [None] * start
    total = 0.0
    for rate in rates[start:]:
        values.append(total)
        total += rate
    return values


def requests(model: str, status: str, per_minute: float | list[float], **extra: Any) -> dict[str, str]:
    labels = {"model": model, "decision": "default", "domain": "none", "status": status}
    return series("extproc_requests_total", counter(per_minute, **extra), **labels)


def alerts(name: str, labels: dict[str, str] | None) -> list[dict[str, Any]]:
    return [] if labels is None else [{"exp_labels": {**TARGET_LABELS, **labels}}]


def latency_buckets(le_seconds: float, per_minute: float) -> list[dict[str, str]]:
    """Every decision takes le_seconds (it lands in that bucket and all above)."""
    out = []
    for le in ("0.005", "0.1", "0.5", "+Inf"):
        rate = per_minute if le == "+Inf" or float(le) >= le_seconds else 0
        out.append(series("extproc_decision_duration_seconds_bucket", counter(rate), stage="total", le=le))
    return out


# What the ServiceMonitor's two endpoints add: the pod, and the Service port a series came from.
SIDECAR = {"pod": "router-0", "endpoint": "metrics"}
ENVOY = {"pod": "router-0", "endpoint": "envoy-stats"}
LLM = {**ENVOY, "envoy_http_conn_manager_prefix": "llm"}


def up(target: dict[str, str], values: list[float | None]) -> dict[str, str]:
    return series("up", values, **target)


def envoy_traffic(per_minute: float, failed: float = 0, timeouts: float = 0, server_errors: float = 0):
    """Envoy's own stats for the client listener: requests, ext_proc streams that failed or timed
    out (each answered 503 router_unavailable), and 5xx responses of any origin."""
    return [
        series("envoy_http_downstream_rq_total", counter(per_minute), **LLM),
        series("envoy_http_ext_proc_streams_failed", counter(failed), **LLM),
        series("envoy_http_ext_proc_message_timeouts", counter(timeouts), **LLM),
        series("envoy_http_downstream_rq_xx", counter(server_errors), envoy_response_code_class="5", **LLM),
        series(
            "envoy_http_downstream_rq_xx", counter(per_minute - server_errors), envoy_response_code_class="2", **LLM
        ),
    ]


def sidecar_down_for(minutes: int, start: int = 5, per_minute: float = 60) -> list[dict[str, str]]:
    """The sidecar dies at `start` and stays down for `minutes`: its target is down, and Envoy,
    still scraped, fails every request it gets with router_unavailable (streams_failed)."""
    down = [1.0] * start + [0.0] * minutes + [1.0] * 60
    failed = [0.0] * start + [per_minute] * minutes + [0.0] * 60
    return [
        up(SIDECAR, down),
        up(ENVOY, [1.0] * len(down)),
        series("envoy_http_downstream_rq_total", counter(per_minute, minutes=len(down)), **LLM),
        series("envoy_http_ext_proc_streams_failed", counter(failed), **LLM),
        series("envoy_http_ext_proc_message_timeouts", counter(0, minutes=len(down)), **LLM),
        series("envoy_http_downstream_rq_xx", counter(failed), envoy_response_code_class="5", **LLM),
    ]


def shifted_share(before: float, after: float, shift_at: int, total: float = 60) -> list[dict[str, str]]:
    """Requests per minute to large (the expensive model) and small; large's share moves at shift_at."""
    large = [total * (before if m < shift_at else after) for m in range(MINUTES)]
    small = [total - x for x in large]
    return [requests("large", "ok", large), requests("small", "ok", small)]


# alert -> [(case, input series, evaluation minute, expected alert labels or None for quiet)]
CASES: dict[str, list[tuple[str, list[dict[str, str]], int, dict[str, str] | None]]] = {
    "ExtprocSidecarDown": [
        ("the sidecar down for 20 minutes", sidecar_down_for(20), 20, {"severity": "critical", "pod": "router-0"}),
        ("down for a minute (a restart)", sidecar_down_for(1), 20, None),
        (
            "no sidecar of the release scraped at all",
            [up(ENVOY, [1.0] * 60)],
            10,
            {"severity": "critical", "endpoint": "metrics"},
        ),
        ("up", [up(SIDECAR, [1.0] * 60), up(ENVOY, [1.0] * 60)], 20, None),
    ],
    "ExtprocEnvoyDown": [
        (
            "Envoy's stats target down",
            [up(SIDECAR, [1.0] * 60), up(ENVOY, [1.0] * 5 + [0.0] * 60)],
            15,
            {"severity": "critical", "pod": "router-0"},
        ),
        (
            "no Envoy of the release scraped",
            [up(SIDECAR, [1.0] * 60)],
            10,
            {"severity": "critical", "endpoint": "envoy-stats"},
        ),
        ("up", [up(SIDECAR, [1.0] * 60), up(ENVOY, [1.0] * 60)], 20, None),
    ],
    "ExtprocRouterUnavailable": [
        ("the sidecar down for 20 minutes", sidecar_down_for(20), 20, {"severity": "critical"}),
        ("streams failing for 5% of the requests", envoy_traffic(100, failed=5), 20, {"severity": "critical"}),
        ("the sidecar slower than the message timeout", envoy_traffic(100, timeouts=3), 20, {"severity": "critical"}),
        ("a rare timeout", envoy_traffic(1000, timeouts=1), 20, None),
        ("healthy", envoy_traffic(100), 20, None),
    ],
    "ExtprocEnvoyServerErrors": [
        ("the sidecar down for 20 minutes", sidecar_down_for(20), 20, {"severity": "warning"}),
        ("a tenth of the answers are 5xx", envoy_traffic(100, server_errors=10), 20, {"severity": "warning"}),
        ("1% 5xx", envoy_traffic(100, server_errors=1), 20, None),
    ],
    "ExtprocRouterErrorRate": [
        ("10% 503s", [requests("small", "ok", 90), requests("none", "503", 10)], 20, {"severity": "critical"}),
        ("1% 503s", [requests("small", "ok", 99), requests("none", "503", 1)], 20, None),
        ("4xx are the client's", [requests("small", "ok", 50), requests("none", "404", 50)], 20, None),
    ],
    "ExtprocDecisionLatencyHigh": [
        ("decisions take 0.5s", latency_buckets(0.5, 60), 30, {"severity": "warning"}),
        ("decisions take 5ms", latency_buckets(0.005, 60), 30, None),
    ],
    "ExtprocConfigReloadFailed": [
        (
            "first failure of a pod's life: the series appears at 1",
            [
                series("extproc_config_reloads_total", counter(0, start=0), result="success"),
                series("extproc_config_reloads_total", [None] * 5 + [1] * 60, result="invalid"),
            ],
            8,
            {"severity": "warning", "result": "invalid"},
        ),
        (
            "a later failure: the counter grows",
            [series("extproc_config_reloads_total", [0] * 10 + [1] * 60, result="invalid")],
            14,
            {"severity": "warning", "result": "invalid"},
        ),
        (
            "quiet once the window has passed",
            [series("extproc_config_reloads_total", [None] * 5 + [1] * 60, result="invalid")],
            30,
            None,
        ),
    ],
    "ExtprocStalePolicy": [
        (
            "the current file was refused: the pod keeps an older policy",
            [series("extproc_config_last_reload_successful", [1] * 5 + [0] * 60)],
            15,
            {"severity": "warning"},
        ),
        (
            "a refused file that was fixed within the waiting period",
            [series("extproc_config_last_reload_successful", [1] * 5 + [0] * 2 + [1] * 60)],
            15,
            None,
        ),
    ],
    "ExtprocNoReadyReplica": [
        (
            "replicas gone",
            [series("extproc_ready_replicas", [2] * 5 + [0] * 60, model="small")],
            12,
            {"severity": "critical", "model": "small"},
        ),
        (
            "picks found none",
            [
                series("extproc_ready_replicas", [2] * 60, model="small"),
                series("extproc_no_ready_replica_total", counter(3), model="small"),
            ],
            12,
            {"severity": "critical", "model": "small"},
        ),
        ("replicas ready", [series("extproc_ready_replicas", [2] * 60, model="small")], 12, None),
    ],
    "ExtprocSustainedFallback": [
        (
            "a third of the requests fall back for half an hour",
            [
                series("extproc_chain_attempts_count", counter(60), model="llama-70b"),
                series("extproc_fallbacks_total", counter(20), model="llama-70b", reason="rate_limited"),
            ],
            30,
            {"severity": "warning", "model": "llama-70b"},
        ),
        (
            "an occasional fallback",
            [
                series("extproc_chain_attempts_count", counter(60), model="llama-70b"),
                series("extproc_fallbacks_total", counter(3), model="llama-70b", reason="5xx"),
            ],
            30,
            None,
        ),
        (
            "a short burst is over before the waiting period",
            [
                series("extproc_chain_attempts_count", counter(60), model="llama-70b"),
                series(
                    "extproc_fallbacks_total",
                    counter([0] * 10 + [40] * 5 + [0] * (MINUTES - 15)),
                    model="llama-70b",
                    reason="timeout",
                ),
            ],
            40,
            None,
        ),
    ],
    "ExtprocReplicaEjected": [
        (
            "a replica out for ten minutes",
            [series("extproc_ejected_replicas", [0] * 5 + [1] * 60, model="small")],
            20,
            {"severity": "warning", "model": "small"},
        ),
        (
            "out for a minute, then back",
            [series("extproc_ejected_replicas", [0] * 5 + [1] + [0] * 60, model="small")],
            20,
            None,
        ),
        (
            "too many failing to eject one more",
            [
                series("extproc_ejected_replicas", [1] * 60, model="small"),
                series("extproc_replica_ejections_overflow_total", counter(2), model="small"),
            ],
            20,
            {"severity": "warning", "model": "small"},
        ),
    ],
    "ExtprocKvEventsApproximate": [
        (
            "a replica's publisher unreachable for half an hour",
            [
                series("extproc_kv_replicas", [3] * 60, model="small", mode="exact"),
                series("extproc_kv_replicas", [None] * 5 + [1] * 60, model="small", mode="approximate"),
            ],
            30,
            {"severity": "warning", "model": "small"},
        ),
        (
            "approximate only while subscribing, then exact",
            [
                series("extproc_kv_replicas", [None] * 2 + [4] * 60, model="small", mode="exact"),
                series("extproc_kv_replicas", [4, 4] + [0] * 60, model="small", mode="approximate"),
            ],
            30,
            None,
        ),
    ],
    "ExtprocAdmissionRejecting": [
        (
            "a tenth of the requests refused: every replica full",
            [
                requests("small", "ok", 90),
                requests("none", "429", 10),
                series("extproc_admission_rejected_total", counter(10), priority="free"),
            ],
            30,
            {"severity": "warning"},
        ),
        (
            "a burst of 429s now and then",
            [
                requests("small", "ok", 99),
                series("extproc_admission_rejected_total", counter([0.5] * MINUTES), priority="free"),
            ],
            30,
            None,
        ),
    ],
    "ExtprocExpensiveModelShareJump": [
        ("share jumps from 20% to 80%", shifted_share(0.2, 0.8, 375), 405, {"severity": "warning", "model": "large"}),
        ("share falls from 50% to 0%", shifted_share(0.5, 0.0, 375), 405, {"severity": "warning", "model": "large"}),
        ("share steady at 20%", shifted_share(0.2, 0.2, 375), 405, None),
        ("share drifts by 10 points", shifted_share(0.2, 0.3, 375), 405, None),
        ("too little traffic to tell", shifted_share(0.2, 0.8, 375, total=3), 405, None),
    ],
    "ExtprocUpstreamErrorRate": [
        (
            "10% 5xx from large",
            [
                series("extproc_upstream_responses_total", counter(90), model="large", code="2xx"),
                series("extproc_upstream_responses_total", counter(10), model="large", code="5xx"),
                series("extproc_upstream_responses_total", counter(100), model="small", code="2xx"),
            ],
            20,
            {"severity": "warning", "model": "large"},
        ),
        (
            "healthy",
            [series("extproc_upstream_responses_total", counter(100), model="large", code="2xx")],
            20,
            None,
        ),
    ],
    "ExtprocPiiFailClosed": [
        (
            "a tenth of the requests miss the classifier deadline and fail closed",
            [
                requests("private", "ok", 100),
                series("extproc_pii_detections_total", counter(10), type="unchecked", action="reroute"),
                series("extproc_pii_detections_total", counter(5), type="US_SSN", action="reroute"),
            ],
            30,
            {"severity": "warning"},
        ),
        (
            "PII found and rerouted, every check ran",
            [
                requests("private", "ok", 100),
                series("extproc_pii_detections_total", counter(40), type="US_SSN", action="reroute"),
                series("extproc_pii_detections_total", counter(0.5), type="unchecked", action="reroute"),
            ],
            30,
            None,
        ),
    ],
    "ExtprocSignalFailures": [
        (
            "classifier unavailable for half the requests",
            [
                requests("small", "ok", 60),
                series("extproc_signal_failures_total", counter(30), signal="classifier", reason="unavailable"),
            ],
            30,
            {"severity": "warning", "signal": "classifier"},
        ),
        (
            "a rare timeout",
            [
                requests("small", "ok", 100),
                series("extproc_signal_failures_total", counter(1), signal="classifier", reason="timeout"),
            ],
            30,
            None,
        ),
    ],
}


def test_every_alert_has_unit_cases() -> None:
    assert set(CASES) == set(alert_rules(chart_monitoring()))


@pytest.mark.parametrize("alert", list(CASES))
def test_alert_fires_on_its_fault_and_stays_quiet_otherwise(alert: str, tmp_path: Path) -> None:
    rules = write_rules(chart_monitoring(), tmp_path / "rules.yaml", annotations=False)
    tests = [
        {
            "interval": "1m",
            "input_series": inputs,
            "alert_rule_test": [{"eval_time": f"{minute}m", "alertname": alert, "exp_alerts": alerts(alert, labels)}],
            "name": case,
        }
        for case, inputs, minute, labels in CASES[alert]
    ]
    test_file = tmp_path / "test.yaml"
    test_file.write_text(yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": tests}))
    result = promtool("test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules_is_clean(tmp_path: Path) -> None:
    rendered = chart_monitoring()
    result = promtool("check", "rules", str(write_rules(rendered, tmp_path / "rules.yaml")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules(rendered))} rules found" in result.stdout
