"""Every Prometheus metric the router exports, defined in one place.

Labels stay bounded: model, decision and domain names come from the policy and the classifier's
fixed label set; replica labels are pool members, and a replica's series are removed when it
leaves its model's pool (:meth:`Metrics.retain_replicas`); nothing derived from prompts or users.
The process's own CPU, memory, file descriptors and garbage collector are exported too
(``process_*``, ``python_*``), as prometheus_client's default registry would.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import NamedTuple

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Decision latency buckets: the router's budget is milliseconds.
_LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.2,
    0.5,
    1.0,
)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64, 128)
_FRACTION_BUCKETS = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


class ScrapeGauge(NamedTuple):
    """A gauge family whose samples are computed at scrape time (Metrics.add_gauge)."""

    name: str
    documentation: str
    labels: tuple[str, ...]


class Metrics:
    """The router's metrics in their own registry (several routers can live in one test process)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # The collectors prometheus_client's default registry has, in this one: the sidecar's
        # CPU, memory and descriptors (process_*, Linux /proc), interpreter and GC (python_*).
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            r.register(collector)
        self.requests = Counter(
            "extproc_requests_total",
            "LLM requests the router decided on, by outcome.",
            ["model", "decision", "domain", "status"],
            registry=r,
        )
        self.stage_seconds = Histogram(
            "extproc_decision_duration_seconds",
            "Time the router spent on a request, by stage.",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.classifier_batch = Histogram(
            "extproc_classifier_batch_size",
            "Texts per batch (collected together, run one by one).",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.classifier_seconds = Histogram(
            "extproc_classifier_batch_duration_seconds",
            "Encoder run time per batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.classifier_skipped_chars = Counter(
            "extproc_classifier_skipped_chars_total",
            "Characters the encoder did not read because of the per-request budget: part=topic is the "
            "middle of a long latest user message, part=pii text past classifier.pii_tokens (structured "
            "values there are still found by pattern and checksum).",
            ["part"],
            registry=r,
        )
        self.classifier_skipped_requests = Counter(
            "extproc_classifier_budget_exceeded_total",
            "Requests of which the encoder left text unread (see extproc_classifier_skipped_chars_total).",
            ["part"],
            registry=r,
        )
        self.signal_failures = Counter(
            "extproc_signal_failures_total",
            "Signals that failed; the request routed without them.",
            ["signal", "reason"],
            registry=r,
        )
        self.pii = Counter(
            "extproc_pii_detections_total",
            "Requests with PII, by type and the action taken.",
            ["type", "action"],
            registry=r,
        )
        self.picks = Counter(
            "extproc_replica_picks_total", "Replicas picked by the router.", ["model", "replica"], registry=r
        )
        self.prefix_hit = Histogram(
            "extproc_prefix_hit_ratio",
            "Estimated fraction of the prompt's prefix cached on the picked replica.",
            ["model"],
            buckets=_FRACTION_BUCKETS,
            registry=r,
        )
        self.index_mode = Counter(
            "extproc_pick_index_mode_total",
            "Picks by what the router knew of the picked replica's KV cache: exact (its KV events), "
            "approximate (events configured but not complete: the router's own guess) or none (no KV events).",
            ["model", "mode"],
            registry=r,
        )
        self.kv_events = Counter(
            "extproc_kv_event_batches_total",
            "KV-event batches from the model servers, by outcome: batch (applied), gap_replayed, "
            "gap_resynced (missed batches the publisher could not replay: the replica's state was dropped), "
            "restart (the publisher started again from 0), malformed.",
            ["model", "outcome"],
            registry=r,
        )
        self.kv_event_lag = Histogram(
            "extproc_kv_event_lag_seconds",
            "From a KV-event batch's timestamp (the model server's clock) to its application here.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.session_models = Counter(
            "extproc_session_model_total",
            "Conversation turns by what became of the conversation's model: new, same, kept (the decision "
            "named another model; it stayed) or switched (reason: switch, the decision allows it; pii, a "
            "privacy reroute; unavailable, its model had no replica).",
            ["model", "outcome", "reason"],
            registry=r,
        )
        self.admission_wait = Histogram(
            "extproc_admission_wait_seconds",
            "Time requests waited in the admission queue (every replica of their model and fallbacks full), "
            "by priority, whether they were then placed or refused.",
            ["priority"],
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.admission_rejected = Counter(
            "extproc_admission_rejected_total",
            "Requests answered 429 because every replica was full: the priority's queue was full, it does not "
            "wait, or its max_wait passed.",
            ["priority"],
            registry=r,
        )
        self.no_replica = Counter(
            "extproc_no_ready_replica_total", "Picks that found no ready replica for a model.", ["model"], registry=r
        )
        self.ejections = Counter(
            "extproc_replica_ejections_total",
            "Replicas ejected from picking by outlier detection, by reason (connect_probe: still "
            "unreachable when its ejection ended, ejected again).",
            ["model", "reason"],
            registry=r,
        )
        self.ejections_overflow = Counter(
            "extproc_replica_ejections_overflow_total",
            "Ejections refused because max_ejection_percent of the pool was already out.",
            ["model"],
            registry=r,
        )
        self.upstream = Counter(
            "extproc_upstream_responses_total",
            "Upstream responses seen by the router, by status class.",
            ["model", "code"],
            registry=r,
        )
        # Fallback chains (extproc/fallback.py): every attempt Envoy made on a backend, from its
        # per-attempt access log; backend is "provider/model id" or "replicas".
        self.attempts = Counter(
            "extproc_backend_attempts_total",
            "Attempts Envoy made on each backend of chained requests, by result.",
            ["model", "backend", "result"],
            registry=r,
        )
        self.fallbacks = Counter(
            "extproc_fallbacks_total",
            "Chained requests that moved on from a backend to the next, by why the backend failed.",
            ["model", "reason"],
            registry=r,
        )
        self.chain_attempts = Histogram(
            "extproc_chain_attempts",
            "Backends Envoy tried for a chained request before it ended.",
            ["model"],
            buckets=(1, 2, 3, 4, 5, 6, 8, 10),
            registry=r,
        )
        self.backend_blocked = Counter(
            "extproc_backend_cooldowns_total",
            "Hosted backends left out of chains: cooldown (answered 429) or ejected (failed repeatedly).",
            ["backend", "reason"],
            registry=r,
        )
        self.tokens = Counter(
            "extproc_tokens_total", "Tokens reported by upstream usage.", ["model", "kind"], registry=r
        )
        self.cost = Counter("extproc_cost_usd_total", "Spend at the configured prices.", ["model"], registry=r)
        self.baseline_cost = Counter(
            "extproc_baseline_cost_usd_total",
            "What the same tokens would have cost on the baseline model; savings = this - cost.",
            ["model"],
            registry=r,
        )
        self.reloads = Counter(
            "extproc_config_reloads_total", "Routing config loads, by result.", ["result"], registry=r
        )
        self.last_reload = Gauge(
            "extproc_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load.",
            registry=r,
        )
        self.last_reload_ok = Gauge(
            "extproc_config_last_reload_successful",
            "1 if the policy file's current content is in effect, 0 if it was refused (the pod runs an older policy).",
            registry=r,
        )
        for result in ("success", "invalid", "missing", "rejected", "error"):
            self.reloads.labels(result)  # every result exists from the start, so increase() sees the first one
        self.envoy_updates = Counter(
            "extproc_envoy_config_updates_total",
            "Envoy configuration the sidecar published, by xDS resource type (lds, cds, rds) and Envoy's "
            "verdict (applied, rejected, or unconfirmed when Envoy's admin did not answer in time).",
            ["type", "result"],
            registry=r,
        )
        self.config = Info("extproc_config", "The routing config in effect.", registry=r)
        self.errors = Counter(
            "extproc_request_errors_total",
            "Requests the router answered with an error itself, by error code (bad input, PII blocks, no replica).",
            ["code"],
            registry=r,
        )
        self.local_replies = Counter(
            "extproc_envoy_local_replies_total",
            "Replies of Envoy's own, not a replica's or the router's (router_unavailable: the sidecar was "
            "unreachable or slower than Envoy's message timeout; upstream_unavailable, upstream_timeout; "
            "codec and size refusals), by the status and error code sent, from Envoy's access log. Those "
            "sent while the sidecar is down never reach it: Envoy's own stats count them.",
            ["status", "code"],
            registry=r,
        )
        self.stream_errors = Counter(
            "extproc_stream_errors_total", "ext_proc streams that ended in an error.", ["reason"], registry=r
        )
        self.cache_lookups = Counter(
            "extproc_cache_lookups_total",
            "Semantic cache lookups by model and result (hit: answered by the sidecar; miss: routed).",
            ["model", "result"],
            registry=r,
        )
        self.cache_skipped = Counter(
            "extproc_cache_skipped_total",
            "Requests of cache-enabled decisions that were not looked up, by reason (sampling, pii, "
            "pii_unchecked, tenant, choices, last_message, api, unreadable, encoder).",
            ["reason"],
            registry=r,
        )
        self.cache_stores = Counter(
            "extproc_cache_stores_total", "Answers stored in the semantic cache.", ["model"], registry=r
        )
        self.cache_not_stored = Counter(
            "extproc_cache_not_stored_total",
            "Mirrored responses of misses that were not stored, by reason (status, truncated, unfinished, "
            "error, too_large, tool_calls, choices, unreadable).",
            ["reason"],
            registry=r,
        )
        self.cache_evictions = Counter(
            "extproc_cache_evictions_total",
            "Entries that left the cache's index, by reason (size, expired, invalidated).",
            ["reason"],
            registry=r,
        )
        self.cache_errors = Counter(
            "extproc_cache_errors_total",
            "Cache backend operations that failed or timed out (the request was routed as a miss).",
            ["op"],
            registry=r,
        )
        self.cache_invalidations = Counter(
            "extproc_cache_invalidations_total", "Invalidation commands applied.", registry=r
        )
        self.cache_saved_cost = Counter(
            "extproc_cache_saved_cost_usd_total",
            "What cache hits would have cost upstream at the chosen model's prices (this request's "
            "prompt tokens, the stored answer's completion tokens).",
            ["model"],
            registry=r,
        )
        self.cache_lookup_seconds = Histogram(
            "extproc_cache_lookup_duration_seconds",
            "Time of a cache lookup (vector search, and the answer's read from Redis on a hit).",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        for reason in ("size", "expired", "invalidated"):
            self.cache_evictions.labels(reason)
        for op in ("lookup", "store", "follow"):
            self.cache_errors.labels(op)  # from the start, so a dashboard shows 0, not nothing
        self.cache_entries = ScrapeGauge(
            "extproc_cache_entries", "Entries in this sidecar's cache index (Redis: its mirror).", ()
        )
        # Computed from the router's state at scrape time; the runtime supplies the samples.
        self.replica_inflight = ScrapeGauge(
            "extproc_replica_inflight",
            "Requests in flight per replica, as counted by the router.",
            ("model", "replica"),
        )
        self.ready_replicas = ScrapeGauge("extproc_ready_replicas", "Ready replicas per model.", ("model",))
        self.ejected_replicas = ScrapeGauge(
            "extproc_ejected_replicas",
            "Ready replicas that outlier detection keeps out of picking, per model.",
            ("model",),
        )
        self.backends_blocked = ScrapeGauge(
            "extproc_backends_blocked",
            "Hosted backends chains leave out now (1), by reason: cooldown or ejected.",
            ("backend", "reason"),
        )
        self.event_loop_tasks = ScrapeGauge(
            "extproc_event_loop_tasks", "Tasks alive on the sidecar's event loop (leak check).", ()
        )
        self.admission_queued = ScrapeGauge(
            "extproc_admission_queued", "Requests waiting for a replica with room, by priority.", ("priority",)
        )
        self.kv_replicas = ScrapeGauge(
            "extproc_kv_replicas",
            "Replicas subscribed to for KV events, by what the router knows of their cache: exact "
            "(complete events) or approximate (subscribing, or resyncing after a gap).",
            ("model", "mode"),
        )

        # Label children looked up once: prometheus_client's labels() costs microseconds per call.
        self._stage_children: dict[str, object] = {}
        self._request_children: dict[tuple[str, str, str, str], object] = {}
        self._error_children: dict[str, object] = {}
        self._mode_children: dict[tuple[str, str], object] = {}
        self._attempt_children: dict[tuple[str, str, str], object] = {}
        self._chain_children: dict[str, object] = {}
        # Families labelled (model, replica), with the children created so far: a replica's
        # series are removed when it leaves its model's pool, so pod churn cannot grow them.
        self._per_replica: dict[Counter | Gauge | Histogram, dict[tuple[str, str], object]] = {self.picks: {}}

    def observe_stages(self, stages: dict[str, float]) -> None:
        children = self._stage_children
        for stage, seconds in stages.items():
            child = children.get(stage)
            if child is None:
                child = children[stage] = self.stage_seconds.labels(stage)
            child.observe(seconds)  # type: ignore[attr-defined]

    def count_request(self, model: str, decision: str, domain: str, status: str) -> None:
        key = (model, decision, domain, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(*key)
        child.inc()  # type: ignore[attr-defined]

    def count_error(self, code: str) -> None:
        child = self._error_children.get(code)
        if child is None:
            child = self._error_children[code] = self.errors.labels(code)
        child.inc()  # type: ignore[attr-defined]

    def count_index_mode(self, model: str, mode: str) -> None:
        child = self._mode_children.get((model, mode))
        if child is None:
            child = self._mode_children[(model, mode)] = self.index_mode.labels(model, mode)
        child.inc()  # type: ignore[attr-defined]

    def count_attempt(self, model: str, backend: str, result: str) -> None:
        key = (model, backend, result)
        child = self._attempt_children.get(key)
        if child is None:
            child = self._attempt_children[key] = self.attempts.labels(*key)
        child.inc()  # type: ignore[attr-defined]

    def observe_chain_attempts(self, model: str, tries: int) -> None:
        child = self._chain_children.get(model)
        if child is None:
            child = self._chain_children[model] = self.chain_attempts.labels(model)
        child.observe(tries)  # type: ignore[attr-defined]

    def count_session_model(self, model: str, outcome: str, reason: str | None) -> None:
        self.session_models.labels(model, outcome, reason or "").inc()

    def count_kv_event(self, model: str, outcome: str) -> None:
        self.kv_events.labels(model, outcome).inc()

    def count_local_reply(self, status: int, code: str) -> None:
        self.local_replies.labels(str(status), code).inc()

    def count_pick(self, model: str, replica: str) -> None:
        self.replica_child(self.picks, model, replica).inc()  # type: ignore[attr-defined]

    def replica_child(self, family: Counter | Gauge | Histogram, model: str, replica: str) -> object:
        """The (model, replica) child of a per-replica family, remembered for retain_replicas."""
        children = self._per_replica[family]
        child = children.get((model, replica))
        if child is None:
            child = children[(model, replica)] = family.labels(model, replica)
        return child

    def retain_replicas(self, members: Collection[tuple[str, str]]) -> None:
        """Remove the per-replica series of every (model, replica) not in members (the pools)."""
        keep = members if isinstance(members, (set, frozenset)) else set(members)
        for family, children in self._per_replica.items():
            for key in [key for key in children if key not in keep]:
                del children[key]
                family.remove(*key)

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def add_gauge(self, gauge: ScrapeGauge, samples: Callable[[], Iterable[tuple[tuple[str, ...], float]]]) -> None:
        """Export gauge with the samples computed at each scrape."""
        self.add_collector(GaugeCollector(gauge.name, gauge.documentation, list(gauge.labels), samples))


class GaugeCollector(Collector):
    """A gauge family computed at scrape time (in-flight counts, ready replicas)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: list[str],
        samples: Callable[[], Iterable[tuple[tuple[str, ...], float]]],
    ) -> None:
        self.name, self.documentation, self.labels, self.samples = name, documentation, labels, samples

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
        for label_values, value in self.samples():
            family.add_metric(list(label_values), value)
        yield family

    def describe(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=self.labels)
