"""Every dashboard query and alert expression of the chart, run through a real Prometheus that
scrapes a sidecar serving traffic through a real Envoy (tests/harness.py), and that Envoy's own
stats listener, as the chart's ServiceMonitor does.

The traffic is chosen to give every panel and alert data: routed requests of several models
with usage (cost, savings, tokens), long prompts (prefix blocks), a model whose replica answers
500 (upstream errors), a model with no ready replica (503s, no-ready-replica picks), an unknown
model (404), a path Envoy refuses itself (a local reply), a PII prompt and a science prompt
(classifier signals), a rejected config reload, a request held in flight while Prometheus
scrapes, a model whose replicas publish KV events (one publisher unreachable, two batches lost
and replayed), a conversation kept on its model and then switched, and a full model (one request
queued, one refused with 429). What may legitimately stay empty is
listed below with the reason.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from extproc.envoy.names import STATS_LISTENER
from extproc.replicas.pool import Discovery
from extproc.standin import KvCache, StandIn
from tests.harness import Stack, chat, free_port, wait_for
from tests.kv.common import TEMPLATE, TOKENIZER
from tests.kv.common import tokenizer as kv_tokenizer
from tests.observability.prom import (
    Prometheus,
    alert_rules,
    chart_monitoring,
    dashboard_targets,
    finite_samples,
    grafana_variables,
    needs_prometheus,
    promtool,
    substitute,
    write_rules,
)
from tests.replicas.fake_apiserver import FakeApiServer

pytestmark = [needs_prometheus, pytest.mark.e2e]

POLICY = """
version: 1
default_model: small
cost: {baseline_model: large}
models:
  small:
    upstream_model: small-8b
    pricing: {input_per_million: 0.2, output_per_million: 0.4}
    replicas: {static: ["$s1", "$s2"], envoy: original_dst}
  large:
    upstream_model: large-70b
    pricing: {input_per_million: 1.0, output_per_million: 3.0}
    replicas: {static: ["$l1", "$l2"], envoy: override_host}
  flaky:
    pricing: {input_per_million: 0.5, output_per_million: 0.5}
    replicas: {static: ["$f1"], envoy: original_dst}
  pooled:
    replicas: {kubernetes: {namespace: llm, service: pooled, port: 8000}, envoy: original_dst}
  cached:
    replicas:
      static: ["$c1"]
      kv_events:
        tokenizer: $tokenizer
        chat_template: $template
        endpoints: {"$c1": "$c1_kv"}
        replay_endpoints: {"$c1": "$c1_replay"}
  unheard:
    replicas:
      static: ["$c2"]
      kv_events:
        tokenizer: $tokenizer
        chat_template: $template
        endpoints: {"$c2": "tcp://127.0.0.1:9"}
        warm_seconds: 3600
  busy:
    replicas: {static: ["$b1"]}
    capacity: {max_inflight: 1}
pii: {action: redact, types: [US_SSN, CREDIT_CARD]}
admission:
  priorities:
    - {name: premium, max_wait: 5s}
    - {name: free, max_wait: 0s}
decisions:
  - {name: cached, when: {keyword: [cached]}, model: cached, switch: always}
  - {name: busy, when: {keyword: [busy]}, model: busy}
  - {name: code, when: {keyword: [segfault]}, model: large}
  - {name: flaky, when: {keyword: [flaky]}, model: flaky, cache: true}
  - {name: faq, when: {keyword: [faq]}, model: small, cache: true}
  - {name: pooled, when: {keyword: [pooled]}, model: pooled}
  - {name: science, when: {domain: [math, physics]}, model: large}
"""

# Thresholds at which this traffic makes the alerts fire, and no waiting period.
LIVE_ALERTS: dict[str, dict[str, Any]] = {
    "routerErrorRate": {"threshold": 0.01, "for": "0s"},
    "decisionLatency": {"thresholdSeconds": 0, "for": "0s"},
    "noReadyReplica": {"for": "0s"},
    "expensiveModelShareJump": {"threshold": 0, "minRequestRate": 0, "for": "0s"},
    "upstreamErrorRate": {"threshold": 0.01, "for": "0s"},
    "signalFailures": {"threshold": 0.01, "for": "0s"},
    "kvEventsApproximate": {"for": "0s"},
    "admissionRejecting": {"threshold": 0.01, "for": "0s"},
    "envoyServerErrors": {"threshold": 0.01, "for": "0s"},
}

# Queries that may return nothing here, and why.
MAY_BE_EMPTY = {
    "Stream errors": "only a bug in the router ends a stream in an error; nothing here provokes one",
    "Replica ejections": "the one failing replica (flaky) fails three times here, below consecutive_5xx, and "
    "is alone in its pool; tests/adversarial/test_dead_replica.py ejects replicas",
    "Fallbacks by reason": "this stack has no provider and no chained decision; tests/e2e/test_fallback_chains.py checks these series through real Envoy",
    "Attempts by backend": "this stack has no provider and no chained decision; tests/e2e/test_fallback_chains.py checks these series through real Envoy",
    "Backends left out": "this stack has no provider and no chained decision; tests/e2e/test_fallback_chains.py checks these series through real Envoy",
    "Attempts per chained request": "this stack has no provider and no chained decision; tests/e2e/test_fallback_chains.py checks these series through real Envoy",
}
NEEDS_CLASSIFIER = {"Classifier batch size", "Classifier batch duration", "PII events"}
# The semantic cache embeds with the encoder: without it nothing is looked up.
NEEDS_CLASSIFIER |= {"Cache hit rate", "Saved by the cache", "Hits, misses, stores", "Cache lookup latency"}
NEEDS_CLASSIFIER_FAILURE = {"Signal failures"}  # data when the encoder is missing (or times out)
MAY_NOT_FIRE = {
    "ExtprocExpensiveModelShareJump": "compares the expensive model's share over the last 15 minutes with the last "
    "6 hours; in a test of seconds both windows hold the same traffic (test_alert_rules.py makes it fire)",
    "ExtprocSustainedFallback": "no chained requests in this stack (test_alert_rules.py makes it fire)",
}
# alert -> the labels the firing alert must carry besides namespace, job and severity
EXPECTED_FIRING: dict[str, list[dict[str, str]]] = {
    "ExtprocRouterErrorRate": [{}],
    "ExtprocDecisionLatencyHigh": [{}],
    "ExtprocConfigReloadFailed": [{"result": "invalid"}],
    "ExtprocNoReadyReplica": [{"model": "pooled"}],
    "ExtprocUpstreamErrorRate": [{"model": "flaky"}],
    "ExtprocKvEventsApproximate": [{"model": "unheard"}],  # c2's publisher does not exist
    "ExtprocAdmissionRejecting": [{}],
    "ExtprocEnvoyServerErrors": [{}],  # from Envoy's stats: the flaky model's 500s and the 503s
}
LONG = "Please review the following paragraph about our quarterly planning and the roadmap. " * 5


class Observed:
    def __init__(self, stack: Stack, prometheus: Prometheus, rendered) -> None:
        self.stack, self.prometheus, self.rendered = stack, prometheus, rendered
        self.exposition = stack.metrics_text()
        self.envoy_exposition = envoy_stats(stack)
        # The encoder is loaded unless the sidecar counted a failure to load it (no model shipped).
        self.classifier = 'extproc_signal_failures_total{reason="load",signal="classifier"}' not in self.exposition

    def query(self, expr: str) -> dict[str, Any]:
        result = self.prometheus.query(expr)
        assert result.get("status") == "success", f"{expr}\n-> {result.get('errorType')}: {result.get('error')}"
        return result


def envoy_stats(stack: Stack) -> str:
    """What Envoy's stats listener serves Prometheus."""
    import urllib.request

    (listener,) = [x for x in stack.envoy.config["static_resources"]["listeners"] if x["name"] == STATS_LISTENER]
    port = listener["address"]["socket_address"]["port_value"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats/prometheus", timeout=5) as response:
        return response.read().decode()


def traffic(stack: Stack, round_: int) -> None:
    for i in range(4):
        assert stack.post(chat(f"{LONG} hello {round_}.{i}")).status == 200
    for i in range(3):
        assert stack.post(chat(f"{LONG} my build segfaults {round_}.{i}")).status == 200
    streamed = chat(f"{LONG} segfault, streamed", stream=True, stream_options={"include_usage": True})
    assert stack.post(streamed).status == 200
    assert stack.post(chat("a flaky one")).status == 500
    assert stack.post(chat("pooled please")).status == 503
    assert stack.post(chat("hi", model="gpt-9")).status == 404
    assert stack.post(chat("hi"), path="/v1/chat%2Fcompletions").status == 400  # Envoy's own reply
    pii = "hi, my card 4111 1111 1111 1111 was charged twice, ssn 460-89-9847"
    assert stack.post(chat(pii)).status == 200
    science = "Derive the period of a pendulum from Newton's second law and solve the differential equation."
    assert stack.post(chat(science)).status == 200
    conversation_turns(stack, round_)
    overload(stack)
    cache_traffic(stack, round_)


def cache_traffic(stack: Stack, round_: int) -> None:
    """A question stored, its paraphrase served from the cache; an upstream error not stored."""
    question = chat(f"faq {round_}: how do I reset my password?", temperature=0)
    assert stack.post(question).status == 200
    if not stack.sidecar.router.classifier:
        return
    # (until the mirrored answer is stored, a paraphrase misses, and is stored itself)
    paraphrase = chat(f"faq {round_}: how can I reset my password?", temperature=0)
    wait_for(lambda: stack.post(paraphrase).headers.get("x-cache") == "hit", timeout=30)
    assert stack.post(chat("a flaky faq", temperature=0)).status == 500


def conversation_turns(stack: Stack, round_: int) -> None:
    """A conversation kept on its model against a decision, then moved by one that may switch it;
    the KV-event model's replica drops two batches on the way (replayed)."""
    session = {"x-session-id": f"conversation-{round_}"}
    history = [{"role": "user", "content": f"{LONG} let us talk {round_}"}]
    for text in ("my build segfaults", "now the cached model please", "and again, cached"):
        response = stack.post({"model": "auto", "messages": history}, headers=session)
        assert response.status == 200
        history += [{"role": "assistant", "content": "sure " * 40}, {"role": "user", "content": text}]
        stack.fleet["c1"].kv.publisher.drop_next = 2 if "again" in text else 0
    assert stack.post({"model": "auto", "messages": history}, headers=session).status == 200
    stack.post(chat(f"{LONG} cached, once more {round_}"))


def overload(stack: Stack) -> None:
    """The busy model's one slot taken: a premium request waits for it, a free one gets 429."""
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(stack.post, chat("busy one"), "/v1/chat/completions", {"x-user-tier": "premium"})
        wait_for(lambda: stack.inflight().get(stack.fleet["b1"].address), timeout=10)
        queued = pool.submit(stack.post, chat("busy two"), "/v1/chat/completions", {"x-user-tier": "premium"})
        refused = stack.post(chat("busy three"), headers={"x-user-tier": "free"})
        assert refused.status == 429
        assert first.result().status == queued.result().status == 200


def scraped_after(prometheus: Prometheus, moment: float) -> None:
    """Wait until Prometheus has scraped the sidecar after `moment`."""
    wait_for(lambda: prometheus.last_scrape() > moment, timeout=60, interval=0.2)


def hold_one_request_in_flight_while_scraped(stack: Stack, prometheus: Prometheus) -> None:
    gate = asyncio.Event()
    for name in ("s1", "s2"):
        stack.fleet[name].gate = gate
    worker = threading.Thread(target=stack.post, args=(chat(f"{LONG} hold", stream=True),))
    worker.start()
    try:
        wait_for(lambda: prometheus.query("extproc_replica_inflight > 0")["data"]["result"], timeout=60, interval=0.2)
    finally:

        async def release() -> None:
            gate.set()

        stack.fleet.call(release())
        worker.join(30)
        for name in ("s1", "s2"):
            stack.fleet[name].gate = None


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    workdir = tmp_path_factory.mktemp("observability")
    rendered = chart_monitoring(LIVE_ALERTS)
    replicas = [StandIn(name=n) for n in ("s1", "s2", "l1", "l2")] + [StandIn(name="f1", status=500)]
    cache = KvCache(kv_tokenizer(), capacity=200, block_size=16)
    replicas += [StandIn(name="c1", kv=cache), StandIn(name="c2"), StandIn(name="b1", delay=0.5)]
    substitutions = {
        "c1_kv": cache.endpoint,
        "c1_replay": cache.replay_endpoint or "",
        "tokenizer": str(TOKENIZER),
        "template": str(TEMPLATE),
    }
    with FakeApiServer() as api:
        discovery = Discovery(api_client=api.api_client(), sync_timeout=10)
        stats_port = free_port()
        stack = Stack(
            workdir,
            POLICY,
            replicas,
            sidecar_settings={"reload": True, "reload_debounce": 0.1},
            discovery=discovery,
            substitutions=substitutions,
            envoy_options={"stats_port": stats_port},
        )
        with stack:
            rules = write_rules(rendered, workdir / "rules.yaml")
            prometheus = Prometheus(workdir, stack.metrics_port, rules, envoy_stats_port=stats_port)
            try:
                prometheus.start()
                scraped_after(prometheus, 0)
                traffic(stack, 1)
                scraped_after(prometheus, time.time())
                # A rejected reload: the sidecar keeps the last good policy.
                stack.config_path.write_text("version: 1\nmodels: {}\n")
                wait_for(lambda: 'result="invalid"' in stack.metrics_text(), timeout=60)
                hold_one_request_in_flight_while_scraped(stack, prometheus)
                for round_ in (2, 3):
                    traffic(stack, round_)
                    scraped_after(prometheus, time.time())
                yield Observed(stack, prometheus, rendered)
            finally:
                prometheus.stop()


def test_every_dashboard_query_parses_and_the_traffic_driven_ones_return_data(observed: Observed) -> None:
    variables = grafana_variables(observed.rendered, rate_interval="1m", dashboard_range="10m")
    empty = []
    for title, expr in dashboard_targets(observed.rendered):
        values = finite_samples(observed.query(substitute(expr, variables)))
        if title in MAY_BE_EMPTY:
            continue
        if title in NEEDS_CLASSIFIER and not observed.classifier:
            continue  # no encoder model in this checkout: nothing is classified
        if title in NEEDS_CLASSIFIER_FAILURE and observed.classifier:
            continue  # the encoder works: no signal fails
        if not values:
            empty.append(f"{title}: {expr}")
    assert not empty, "no data for:\n" + "\n".join(empty)


def test_dashboard_variables_find_this_router(observed: Observed) -> None:
    for variable in observed.rendered.dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        metric, label = variable["definition"].removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
        metric = substitute(metric, grafana_variables(observed.rendered, "1m", "10m"))
        series = observed.prometheus.api("series", **{"match[]": metric})["data"]
        expected = {"namespace": "llm", "job": "demo-extproc", "model": "large"}[label]
        assert expected in {s.get(label) for s in series}, variable["name"]


def test_every_alert_expression_parses_and_the_driven_ones_fire(observed: Observed) -> None:
    rules = alert_rules(observed.rendered)
    silent = []
    for name, rule in rules.items():
        result = observed.query(rule["expr"])["data"]["result"]
        expected = name in EXPECTED_FIRING or (name == "ExtprocSignalFailures" and not observed.classifier)
        if name in MAY_NOT_FIRE or not expected:
            continue
        if not result:
            silent.append(name)
        for labels in EXPECTED_FIRING.get(name, []):
            assert any(labels.items() <= sample["metric"].items() for sample in result), (name, result)
    assert not silent, f"did not fire: {silent}"


def test_prometheus_evaluates_the_rules_and_renders_their_annotations(observed: Observed) -> None:
    def evaluated() -> list[dict[str, Any]]:
        groups = observed.prometheus.api("rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(not r["lastEvaluation"].startswith("0001") for r in rules) else []

    rules = wait_for(evaluated, timeout=60, interval=0.2)
    assert {r["name"] for r in rules} == set(alert_rules(observed.rendered))
    assert all(r["health"] == "ok" and not r.get("lastError") for r in rules), rules

    def firing() -> set[str]:
        alerts = observed.prometheus.api("alerts")["data"]["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}

    wait_for(lambda: firing() >= set(EXPECTED_FIRING), timeout=60, interval=0.2)
    for alert in observed.prometheus.api("alerts")["data"]["alerts"]:
        for text in alert["annotations"].values():
            assert "<error" not in text and "{{" not in text and "<no value>" not in text, (alert["labels"], text)


def test_promtool_check_metrics_on_the_sidecar_exposition_is_clean(observed: Observed) -> None:
    result = promtool("check", "metrics", stdin=observed.exposition)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_the_exposition_has_every_metric_the_chart_queries(observed: Observed) -> None:
    """A rename in extproc/metrics.py must not leave the dashboard or the alerts on a dead name."""
    texts = [expr for _, expr in dashboard_targets(observed.rendered)]
    texts += [rule["expr"] for rule in alert_rules(observed.rendered).values()]
    queried = {re.sub(r"_(bucket|sum|count)$", "", m) for t in texts for m in re.findall(r"\b(extproc_\w+)", t)}
    exported = set(re.findall(r"^# TYPE (\w+)", observed.exposition, re.M))
    assert queried <= exported, queried - exported
    # Likewise Envoy's names, against what its stats listener serves.
    envoy = {m for t in texts for m in re.findall(r"\b(envoy_\w+)\{", t)}  # metric names, not labels
    envoy_exported = set(re.findall(r"^# TYPE (\w+)", observed.envoy_exposition, re.M))
    assert envoy and envoy <= envoy_exported, envoy - envoy_exported
