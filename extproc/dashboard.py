"""The Grafana dashboard, as code: rows of panels whose queries name each metric through its
definition in extproc/metrics.py, so renaming a metric changes the dashboard with it.
deploy/helm/generate.py writes it to the chart (files/dashboard.json)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from extproc.envoy.names import LISTENER
from extproc.metrics import Metrics, ScrapeGauge


def _series(family: MetricWrapperBase | ScrapeGauge) -> str:
    """The name a metric's samples carry in Prometheus: a counter's ends in _total, an info's in
    _info; a histogram's is the base of its _bucket, _sum and _count."""
    if isinstance(family, ScrapeGauge):
        return family.name
    described = family.describe()[0]
    return described.name + {"counter": "_total", "info": "_info"}.get(described.type, "")


# Each of the router's metrics by its attribute on Metrics: M.requests is "extproc_requests_total".
# (process_* and python_* are prometheus_client's own collectors, which Metrics registers.)
M = SimpleNamespace(
    **{
        attr: _series(value)
        for attr, value in vars(Metrics()).items()
        if isinstance(value, MetricWrapperBase | ScrapeGauge)
    }
)

# Every query selects the dashboard's namespace and job variables.
S = 'namespace=~"$namespace", job=~"$job"'
RATE = "[$__rate_interval]"


def _q(expr: str, legend: str = "") -> dict[str, str]:
    return {"expr": expr, "legendFormat": legend}


def _quantiles(metric: str, by: str, label: str) -> list[dict[str, str]]:
    grouped = f"sum by ({by}le) (rate({metric}_bucket{{{S}}}{RATE}))"
    return [_q(f"histogram_quantile({q}, {grouped})", f"p{round(q * 100)} {label}") for q in (0.5, 0.99)]


def _stage_quantile(q: float) -> dict[str, str]:
    return _q(
        f"histogram_quantile({q}, sum by (stage, le) (rate({M.stage_seconds}_bucket{{{S}}}{RATE})))",
        "{{stage}}",
    )


# Envoy's own stats (its stats listener, the ServiceMonitor's envoy-stats endpoint) of the client
# listener, whose HTTP connection manager is named LISTENER.
ENVOY = f'{S}, envoy_http_conn_manager_prefix="{LISTENER}"'

REQUESTS = f"rate({M.requests}{{{S}}}{RATE})"
OK = f'rate({M.requests}{{{S}, status="ok"}}{RATE})'
EXPENSIVE_SHARE = f'sum(rate({M.requests}{{{S}, status="ok", model="$expensive_model"}}{RATE})) / sum({OK})'
PICKS = f"sum by (model, replica) (rate({M.picks}{{{S}}}{RATE}))"

# (row title, [(panel title, description, kind, unit, width, queries)])
ROWS: list[tuple[str, list[tuple[str, str, str, str, int, list[dict[str, str]]]]]] = [
    (
        "Overview",
        [
            ("Requests", "LLM requests the router decided on.", "stat", "reqps", 4, [_q(f"sum({REQUESTS})")]),
            (
                "Router 5xx",
                "Share of requests the router answered with a 5xx (no ready replica, router failure).",
                "stat",
                "percentunit",
                4,
                [_q(f'sum(rate({M.requests}{{{S}, status=~"5.."}}{RATE})) / sum({REQUESTS})')],
            ),
            (
                "Added latency p99",
                "p99 of the time the router adds to a request (all stages).",
                "stat",
                "s",
                4,
                [
                    _q(
                        "histogram_quantile(0.99, sum by (le) "
                        f'(rate({M.stage_seconds}_bucket{{{S}, stage="total"}}{RATE})))'
                    )
                ],
            ),
            (
                "Spend",
                "Spend over the dashboard's time range, at the configured prices.",
                "stat",
                "currencyUSD",
                4,
                [_q(f"sum(increase({M.cost}{{{S}}}[$__range]))")],
            ),
            (
                "Saved",
                "What the same tokens would have cost on the baseline model, minus the spend.",
                "stat",
                "currencyUSD",
                4,
                [_q(f"sum(increase({M.baseline_cost}{{{S}}}[$__range])) - sum(increase({M.cost}{{{S}}}[$__range]))")],
            ),
            (
                "Expensive model share",
                "Share of routed requests sent to the expensive model ($expensive_model).",
                "stat",
                "percentunit",
                4,
                [_q(EXPENSIVE_SHARE)],
            ),
        ],
    ),
    (
        "Traffic",
        [
            (
                "Request rate by model",
                "Requests per second by the model they were routed to ('none' for errors).",
                "timeseries",
                "reqps",
                12,
                [_q(f"sum by (model) ({REQUESTS})", "{{model}}")],
            ),
            (
                "Requests by status",
                "'ok' is routed, 'cached' answered by the semantic cache; numbers: the router's own error statuses.",
                "timeseries",
                "reqps",
                12,
                [_q(f"sum by (status) ({REQUESTS})", "{{status}}")],
            ),
        ],
    ),
    (
        "Cost",
        [
            (
                "Spend by model",
                "USD per hour at the configured prices, from upstream token usage.",
                "timeseries",
                "currencyUSD",
                8,
                [_q(f"sum by (model) (rate({M.cost}{{{S}}}{RATE})) * 3600", "{{model}}")],
            ),
            (
                "Savings against the baseline model",
                "USD per hour: what the baseline model would have cost, what was spent, and the difference.",
                "timeseries",
                "currencyUSD",
                8,
                [
                    _q(f"sum(rate({M.baseline_cost}{{{S}}}{RATE})) * 3600", "baseline"),
                    _q(f"sum(rate({M.cost}{{{S}}}{RATE})) * 3600", "spent"),
                    _q(
                        f"(sum(rate({M.baseline_cost}{{{S}}}{RATE})) - sum(rate({M.cost}{{{S}}}{RATE}))) * 3600",
                        "saved",
                    ),
                ],
            ),
            (
                "Tokens by model",
                "Tokens per second reported by upstream usage.",
                "timeseries",
                "short",
                8,
                [_q(f"sum by (model, kind) (rate({M.tokens}{{{S}}}{RATE}))", "{{model}} {{kind}}")],
            ),
        ],
    ),
    (
        "Added latency",
        [
            (
                "Added latency p50 by stage",
                "Median time per stage of the decision.",
                "timeseries",
                "s",
                12,
                [_stage_quantile(0.5)],
            ),
            (
                "Added latency p99 by stage",
                "p99 time per stage of the decision.",
                "timeseries",
                "s",
                12,
                [_stage_quantile(0.99)],
            ),
            (
                "Classifier batch size",
                "Texts collected per batch (each runs alone): how many classifications queue together.",
                "timeseries",
                "short",
                12,
                _quantiles(M.classifier_batch, "", "texts"),
            ),
            (
                "Classifier batch duration",
                "Encoder run time per batch.",
                "timeseries",
                "s",
                12,
                _quantiles(M.classifier_seconds, "", "run"),
            ),
        ],
    ),
    (
        "Decisions",
        [
            (
                "Decision mix",
                "Routed requests by the decision that chose the model.",
                "timeseries",
                "reqps",
                8,
                [_q(f"sum by (decision) ({OK})", "{{decision}}")],
            ),
            (
                "Domain mix",
                "Routed requests by the classifier's domain of the last user message ('none' when not classified).",
                "timeseries",
                "reqps",
                8,
                [_q(f"sum by (domain) ({OK})", "{{domain}}")],
            ),
            (
                "Expensive model share",
                "Share of routed requests sent to $expensive_model (the ExtprocExpensiveModelShareJump alert).",
                "timeseries",
                "percentunit",
                8,
                [_q(EXPENSIVE_SHARE, "$expensive_model")],
            ),
        ],
    ),
    (
        "PII",
        [
            (
                "PII events",
                "Requests with PII, by type and the action taken (allow, block, redact, reroute).",
                "timeseries",
                "reqps",
                24,
                [_q(f"sum by (type, action) (rate({M.pii}{{{S}}}{RATE}))", "{{type}} {{action}}")],
            ),
        ],
    ),
    (
        "Replicas",
        [
            (
                "Picks by replica",
                "Replicas the router picked, per second.",
                "timeseries",
                "reqps",
                12,
                [_q(PICKS, "{{model}} {{replica}}")],
            ),
            (
                "Peak in flight by replica",
                "Most requests in flight per replica at any scrape in the interval, as the routers count "
                "them (idle replicas show 0; a replica's series end when it leaves its model's pool).",
                "timeseries",
                "short",
                12,
                [
                    _q(
                        f"max by (model, replica) (max_over_time({M.replica_inflight}{{{S}}}{RATE}))",
                        "{{model}} {{replica}}",
                    )
                ],
            ),
            (
                "Replica balance",
                "Busiest replica's pick rate over the mean, per model: 1 is perfectly even.",
                "timeseries",
                "short",
                8,
                [_q(f"max by (model) ({PICKS}) / avg by (model) ({PICKS})", "{{model}}")],
            ),
            (
                "Prefix cache hits",
                "Mean estimated fraction of the prompt prefix already cached on the picked replica.",
                "timeseries",
                "percentunit",
                8,
                [
                    _q(
                        f"sum by (model) (rate({M.prefix_hit}_sum{{{S}}}{RATE})) "
                        f"/ sum by (model) (rate({M.prefix_hit}_count{{{S}}}{RATE}))",
                        "{{model}}",
                    )
                ],
            ),
            (
                "Ready replicas",
                "Ready replicas per model, as the router sees them (lowest over router pods).",
                "timeseries",
                "short",
                8,
                [_q(f"min by (model) ({M.ready_replicas}{{{S}}})", "{{model}}")],
            ),
            (
                "Ejected replicas",
                "Ready replicas outlier detection keeps out of picking (they failed requests in a row), "
                "per model (highest over router pods).",
                "timeseries",
                "short",
                12,
                [_q(f"max by (model) ({M.ejected_replicas}{{{S}}})", "{{model}}")],
            ),
            (
                "Replica ejections",
                "Ejections per reason (connect_probe: still unreachable when its time was up), and "
                "ejections refused because max_ejection_percent of the pool was already out.",
                "timeseries",
                "short",
                12,
                [
                    _q(
                        f"sum by (model, reason) (increase({M.ejections}{{{S}}}{RATE}))",
                        "{{model}} {{reason}}",
                    ),
                    _q(
                        f"sum by (model) (increase({M.ejections_overflow}{{{S}}}{RATE}))",
                        "{{model}} refused",
                    ),
                ],
            ),
        ],
    ),
    (
        "KV cache state (vLLM KV events)",
        [
            (
                "Picks by index mode",
                "What the router knew of the picked replica's KV cache: exact (its KV events), approximate "
                "(events not complete yet: the router's own guess) or none (the model has no KV events).",
                "timeseries",
                "reqps",
                8,
                [_q(f"sum by (model, mode) (rate({M.index_mode}{{{S}}}{RATE}))", "{{model}} {{mode}}")],
            ),
            (
                "Replicas by index mode",
                "Replicas subscribed to for KV events: exact, or approximate (subscribing, or resyncing after "
                "a gap the publisher could not replay), highest over router pods.",
                "timeseries",
                "short",
                8,
                [_q(f"max by (model, mode) ({M.kv_replicas}{{{S}}})", "{{model}} {{mode}}")],
            ),
            (
                "KV event lag p99",
                "From a batch's timestamp (the model server's clock) to its application in the router.",
                "timeseries",
                "s",
                8,
                [
                    _q(
                        f"histogram_quantile(0.99, sum by (model, le) (rate({M.kv_event_lag}_bucket{{{S}}}{RATE})))",
                        "{{model}}",
                    )
                ],
            ),
            (
                "KV event gaps",
                "Missed batches replayed from the publisher, or resynced (the replica's state dropped until "
                "rebuilt), publisher restarts and malformed batches.",
                "timeseries",
                "short",
                12,
                [
                    _q(
                        f'sum by (model, outcome) (increase({M.kv_events}{{{S}, outcome!="batch"}}{RATE}))',
                        "{{model}} {{outcome}}",
                    )
                ],
            ),
            (
                "KV event batches",
                "Batches of BlockStored / BlockRemoved / AllBlocksCleared applied, per second.",
                "timeseries",
                "short",
                12,
                [_q(f'sum by (model) (rate({M.kv_events}{{{S}, outcome="batch"}}{RATE}))', "{{model}}")],
            ),
        ],
    ),
    (
        "Admission and sessions",
        [
            (
                "Queued requests",
                "Requests waiting for a replica with room (every replica of their model and fallbacks full), "
                "by priority, summed over router pods.",
                "timeseries",
                "short",
                8,
                [_q(f"sum by (priority) ({M.admission_queued}{{{S}}})", "{{priority}}")],
            ),
            (
                "429s by priority",
                "Requests refused with 429 overloaded: their priority's queue was full, it does not wait, or "
                "its max_wait passed.",
                "timeseries",
                "reqps",
                8,
                [_q(f"sum by (priority) (rate({M.admission_rejected}{{{S}}}{RATE}))", "{{priority}}")],
            ),
            (
                "Queue wait p99",
                "Time in the admission queue, by priority.",
                "timeseries",
                "s",
                8,
                _quantiles(M.admission_wait, "priority, ", "{{priority}}"),
            ),
            (
                "Model switches",
                "Conversation turns that moved to another model, by reason (switch: the decision allows it; "
                "pii: a privacy reroute; unavailable: its model had no replica), and turns kept on their model "
                "against the decision.",
                "timeseries",
                "short",
                24,
                [
                    _q(
                        f'sum by (reason) (increase({M.session_models}{{{S}, outcome="switched"}}{RATE}))',
                        "switched: {{reason}}",
                    ),
                    _q(f'sum(increase({M.session_models}{{{S}, outcome="kept"}}{RATE}))', "kept"),
                ],
            ),
        ],
    ),
    (
        "Fallback chains",
        [
            (
                "Fallbacks by reason",
                "Chained requests that moved on from a failing backend to the next (429, 5xx, timeout, "
                "connect failure, reset), per model.",
                "timeseries",
                "reqps",
                8,
                [_q(f"sum by (model, reason) (rate({M.fallbacks}{{{S}}}{RATE}))", "{{model}} {{reason}}")],
            ),
            (
                "Attempts by backend",
                "Attempts Envoy made on each backend, by result (success, rate_limited, 5xx, timeout, ...).",
                "timeseries",
                "reqps",
                8,
                [_q(f"sum by (backend, result) (rate({M.attempts}{{{S}}}{RATE}))", "{{backend}} {{result}}")],
            ),
            (
                "Backends left out",
                "Hosted backends chains skip now: cooldown (answered 429, until its Retry-After) or ejected "
                "(failed repeatedly), highest over router pods; and how often each entered either state.",
                "timeseries",
                "short",
                8,
                [
                    _q(f"max by (backend, reason) ({M.backends_blocked}{{{S}}})", "{{backend}} {{reason}}"),
                    _q(
                        f"sum by (backend, reason) (increase({M.backend_blocked}{{{S}}}{RATE}))",
                        "{{backend}} entered {{reason}}",
                    ),
                ],
            ),
            (
                "Attempts per chained request",
                "Backends tried before a chained request ended (1: the first answered).",
                "timeseries",
                "short",
                24,
                _quantiles(M.chain_attempts, "", "attempts"),
            ),
        ],
    ),
    (
        "Config reloads",
        [
            (
                "Reloads by result",
                "Routing config loads: success, invalid (kept the last good policy), missing, error.",
                "timeseries",
                "short",
                8,
                [_q(f"sum by (result) (increase({M.reloads}{{{S}}}{RATE}))", "{{result}}")],
            ),
            (
                "Since the oldest successful load",
                "Time since the router pod with the oldest policy last loaded one successfully.",
                "stat",
                "s",
                8,
                [_q(f"time() - min({M.last_reload}{{{S}}})")],
            ),
            (
                "Policies in effect",
                "Router pods per policy hash: more than one hash for long means pods disagree.",
                "timeseries",
                "short",
                8,
                [_q(f"count by (hash) ({M.config}{{{S}}})", "{{hash}}")],
            ),
        ],
    ),
    (
        "Sidecar process",
        [
            (
                "Sidecar CPU",
                "CPU cores the routing sidecar uses, per pod (process_cpu_seconds_total); compare with "
                "sidecar.resources.requests.cpu.",
                "timeseries",
                "short",
                6,
                [_q(f"sum by (instance) (rate(process_cpu_seconds_total{{{S}}}{RATE}))", "{{instance}}")],
            ),
            (
                "Sidecar memory",
                "Resident memory of the routing sidecar, per pod; compare with sidecar.resources.limits.memory.",
                "timeseries",
                "bytes",
                6,
                [_q(f"max by (instance) (process_resident_memory_bytes{{{S}}})", "{{instance}}")],
            ),
            (
                "Sidecar file descriptors",
                "Share of the sidecar's file descriptor limit in use, per pod.",
                "timeseries",
                "percentunit",
                6,
                [
                    _q(
                        f"max by (instance) (process_open_fds{{{S}}} / process_max_fds{{{S}}})",
                        "{{instance}}",
                    )
                ],
            ),
            (
                "Python GC collections",
                "Garbage collections per second by generation; generation 2 pauses are the long ones.",
                "timeseries",
                "short",
                6,
                [
                    _q(
                        f"sum by (generation) (rate(python_gc_collections_total{{{S}}}{RATE}))",
                        "gen {{generation}}",
                    )
                ],
            ),
        ],
    ),
    (
        "Semantic cache",
        [
            (
                "Cache hit rate",
                "Lookups answered from the semantic cache, of all lookups (decisions with cache only).",
                "stat",
                "percentunit",
                6,
                [
                    _q(
                        f'sum(increase({M.cache_lookups}{{{S}, result="hit"}}[$__range])) / '
                        f"sum(increase({M.cache_lookups}{{{S}}}[$__range]))"
                    )
                ],
            ),
            (
                "Saved by the cache",
                "What the hits would have cost upstream at the chosen model's prices.",
                "stat",
                "currencyUSD",
                6,
                [_q(f"sum(increase({M.cache_saved_cost}{{{S}}}[$__range]))")],
            ),
            (
                "Cache entries",
                "Entries in each sidecar's index (with Redis: its mirror of what Redis holds).",
                "stat",
                "short",
                6,
                [_q(f"sum({M.cache_entries}{{{S}}})")],
            ),
            (
                "Cache backend errors",
                "Lookups and stores the backend failed or was too slow for (routed as misses).",
                "stat",
                "short",
                6,
                [_q(f"sum(increase({M.cache_errors}{{{S}}}[$__range]))")],
            ),
            (
                "Hits, misses, stores",
                "Lookups by result, answers stored, and mirrored responses not stored (by reason: errors, "
                "cut streams, unfinished answers, too large).",
                "timeseries",
                "reqps",
                8,
                [
                    _q(f"sum by (result) (rate({M.cache_lookups}{{{S}}}{RATE}))", "{{result}}"),
                    _q(f"sum(rate({M.cache_stores}{{{S}}}{RATE}))", "stored"),
                    _q(f"sum by (reason) (rate({M.cache_not_stored}{{{S}}}{RATE}))", "not stored: {{reason}}"),
                ],
            ),
            (
                "Not looked up, evicted",
                "Requests of cache decisions that were not looked up (sampling, PII, tenant...), and entries "
                "evicted (size, expired, invalidated).",
                "timeseries",
                "reqps",
                8,
                [
                    _q(f"sum by (reason) (rate({M.cache_skipped}{{{S}}}{RATE}))", "skipped: {{reason}}"),
                    _q(f"sum by (reason) (rate({M.cache_evictions}{{{S}}}{RATE}))", "evicted: {{reason}}"),
                ],
            ),
            (
                "Cache lookup latency",
                "Vector search over the scope's entries (and, on a Redis hit, the answer's GET).",
                "timeseries",
                "s",
                8,
                _quantiles(M.cache_lookup_seconds, "", "lookup"),
            ),
        ],
    ),
    (
        "Envoy",
        [
            (
                "Targets up",
                "Pods whose sidecar (endpoint metrics) and Envoy (endpoint envoy-stats) answer Prometheus.",
                "timeseries",
                "short",
                6,
                [_q(f"sum by (endpoint) (up{{{S}}})", "{{endpoint}}")],
            ),
            (
                "Router unavailable",
                "Requests Envoy answered with 503 router_unavailable, from Envoy's own stats (counted while "
                "the sidecar is down): its ext_proc stream failed (sidecar down or unreachable) or timed out "
                "(sidecar slower than envoy.messageTimeout).",
                "timeseries",
                "reqps",
                6,
                [
                    _q(f"sum(rate(envoy_http_ext_proc_streams_failed{{{ENVOY}}}{RATE}))", "stream failed"),
                    _q(f"sum(rate(envoy_http_ext_proc_message_timeouts{{{ENVOY}}}{RATE}))", "timed out"),
                ],
            ),
            (
                "Envoy responses by class",
                "Every response Envoy sent clients, by status class, whoever made it.",
                "timeseries",
                "reqps",
                6,
                [
                    _q(
                        f"sum by (envoy_response_code_class) (rate(envoy_http_downstream_rq_xx{{{ENVOY}}}{RATE}))",
                        "{{envoy_response_code_class}}xx",
                    )
                ],
            ),
            (
                "Requests in flight in Envoy",
                "Requests Envoy holds open (long streams included); a draining pod stops once it reaches 0.",
                "timeseries",
                "short",
                6,
                [_q(f"sum(envoy_http_downstream_rq_active{{{ENVOY}}})", "in flight")],
            ),
            (
                "Envoy's own replies",
                "Replies Envoy made itself (not a model server's, not the router's), by the error code the "
                "client got: router_unavailable, upstream_unavailable, upstream_timeout, codec and size "
                "refusals. From the access log, so none while the sidecar is down (see Router unavailable).",
                "timeseries",
                "reqps",
                24,
                [_q(f"sum by (status, code) (rate({M.local_replies}{{{S}}}{RATE}))", "{{status}} {{code}}")],
            ),
        ],
    ),
    (
        "Errors",
        [
            (
                "Router errors by status",
                "Requests the router answered with an error, by status.",
                "timeseries",
                "reqps",
                8,
                [_q(f'sum by (status) (rate({M.requests}{{{S}, status!~"ok|cached"}}{RATE}))', "{{status}}")],
            ),
            (
                "Upstream errors by model",
                "Model server responses other than 2xx, by model and status class.",
                "timeseries",
                "reqps",
                8,
                [
                    _q(
                        f'sum by (model, code) (rate({M.upstream}{{{S}, code!="2xx"}}{RATE}))',
                        "{{model}} {{code}}",
                    )
                ],
            ),
            (
                "No ready replica",
                "Picks that found no ready replica for a model (the request fell back or got a 503).",
                "timeseries",
                "reqps",
                8,
                [_q(f"sum by (model) (rate({M.no_replica}{{{S}}}{RATE}))", "{{model}}")],
            ),
            (
                "Signal failures",
                "Signals that failed; the request routed without them.",
                "timeseries",
                "reqps",
                12,
                [
                    _q(
                        f"sum by (signal, reason) (rate({M.signal_failures}{{{S}}}{RATE}))",
                        "{{signal}} {{reason}}",
                    )
                ],
            ),
            (
                "Stream errors",
                "ext_proc streams that ended in an error inside the router.",
                "timeseries",
                "reqps",
                12,
                [_q(f"sum by (reason) (rate({M.stream_errors}{{{S}}}{RATE}))", "{{reason}}")],
            ),
            (
                "Refused requests",
                "Requests the router answered with an error, by code (bad input such as invalid_header, "
                "PII blocks, no replica). Envoy's own refusals (malformed HTTP, unknown paths) are in its stats.",
                "timeseries",
                "reqps",
                12,
                [_q(f"sum by (code) (rate({M.errors}{{{S}}}{RATE}))", "{{code}}")],
            ),
        ],
    ),
]

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _panel(id_: int, title: str, description: str, kind: str, unit: str, grid: dict[str, int], queries) -> dict:
    panel: dict[str, Any] = {
        "id": id_,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": grid,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": q["expr"], "legendFormat": q["legendFormat"]}
            for i, q in enumerate(queries)
        ],
    }
    if kind == "timeseries":
        panel["fieldConfig"]["defaults"]["custom"] = {"fillOpacity": 10, "showPoints": "never"}
        panel["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        panel["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
        }
    return panel


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": name},
        "refresh": 2,
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


EXPENSIVE_MODEL = "expensive_model"


def _model_variable() -> dict[str, Any]:
    query = f'label_values({M.requests}{{{S}, model!="none"}}, model)'
    return {
        "name": EXPENSIVE_MODEL,
        "label": "Expensive model",
        "description": "The model whose traffic share the expensive-model panels and alert watch.",
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": EXPENSIVE_MODEL},
        "refresh": 2,
        "includeAll": False,
        "multi": False,
        # Empty: Grafana takes the first model found; the chart fills in the configured one.
        "current": {},
        "sort": 1,
    }


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for row_title, row_panels in ROWS:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        next_id += 1
        y += 1
        x, row_height = 0, 0
        for title, description, kind, unit, width, queries in row_panels:
            height = 4 if kind == "stat" else 8
            if x + width > 24:
                x, y = 0, y + row_height
                row_height = 0
            panels.append(
                _panel(next_id, title, description, kind, unit, {"h": height, "w": width, "x": x, "y": y}, queries)
            )
            next_id += 1
            x += width
            row_height = max(row_height, height)
        y += row_height
    return {
        "title": "extproc: LLM routing",
        "uid": "extproc-routing",
        "description": "Where LLM requests go, what they cost and save, what the router adds and what fails.",
        "tags": ["extproc", "llm", "envoy"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                _variable("namespace", "Namespace", f"label_values({M.requests}, namespace)"),
                _variable("job", "Router", f'label_values({M.requests}{{namespace=~"$namespace"}}, job)'),
                # A choice among the routed models, so a dashboard imported by hand works too; the
                # chart preselects monitoring.expensiveModel (templates/dashboard.yaml).
                _model_variable(),
            ]
        },
        "panels": panels,
    }
