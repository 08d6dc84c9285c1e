"""The routing flow for one request: parse -> signals -> decision -> PII policy -> replica.

``Router.route`` is what the gRPC server and ``extproc route`` both call. It returns a
``Routed`` or raises a ``RouterError``; it never touches the wire format.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from extproc import errors, lanes, request, sessions
from extproc.admission import AdmissionQueue, QueueFull
from extproc.cache import CacheHit, Lookup, Refusal, SemanticCache, prepare
from extproc.cache import scope as cache_scope
from extproc.cooldown import COOLDOWN, BackendHealth
from extproc.fallback import Attempt, ChainTable, Plan, RecentPlans
from extproc.lanes import LARGE_BODY_BYTES
from extproc.metrics import Metrics
from extproc.policy import pii
from extproc.policy.backends import POOL
from extproc.policy.conditions import PII_MIN_SCORE
from extproc.policy.config import Decision, DecisionCache, Model, PiiPolicy, Policy
from extproc.policy.evaluate import NEEDS_CLASSIFIER, choose_model, decide
from extproc.policy.evaluate import explain as trace_decisions
from extproc.replicas.health import Outcome, OutlierDetector
from extproc.replicas.kvaware import KvAwareness, Tokenizers, prompt_tokens
from extproc.replicas.kvindex import Mode, PromptBlocks
from extproc.replicas.load import Lease, LoadTracker
from extproc.replicas.picking import Pick, Picker, PickRequest, build_picker
from extproc.replicas.pool import Discovery, Pools
from extproc.replicas.prefix import PrefixIndex, block_hashes
from extproc.signals import Signals
from extproc.signals.classifier import ClassifierSignal
from extproc.signals.tokens import TokenCounter

log = logging.getLogger("extproc.router")

DEFAULT_DECISION = "default"
_COUNT_INLINE_BYTES = 4096  # bodies up to this are token-counted on the loop (a thread hop costs more)
EXPLICIT = "explicit"
PASSTHROUGH = "passthrough"


@dataclass(slots=True)
class Call:
    """What the router needs to know about one HTTP request."""

    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    request_id: str = ""
    explain: bool = False  # the client asked for x-router-explain (honoured only if the policy allows)
    # Called with the longest the request may wait in the admission queue, before it waits (the
    # stream extends Envoy's message timeout by it).
    on_wait: Callable[[float], None] | None = None


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a request goes: its model (the chosen one or a fallback) and, where the router
    picks, the replica."""

    model: str
    upstream_model: str
    cluster: str  # the Envoy cluster to route to
    endpoints: tuple[str, ...] = ()  # picked replica first, then fallbacks; empty: Envoy balances
    envoy_lb: str = ""  # how Envoy reaches the endpoints: original_dst | override_host | hash
    affinity_key: str = ""
    lease: Lease | None = None
    pick_detail: dict[str, Any] | None = None  # replica scores, for explanations
    plan: Plan | None = None  # a chained request: the backends Envoy tries in order (extproc/fallback.py)


@dataclass(frozen=True, slots=True)
class Routed:
    """The router's answer for one request: built once, at the end of Router.route, from the
    state the request started with, and never changed. Every later step (the stream's mutations,
    the decision log, the lease) reads it instead of the router's current state."""

    model: str  # policy model name ("" for passthrough)
    upstream_model: str
    decision: str
    cluster: str  # the Envoy cluster to route to
    cluster_header: str  # the header naming it (the request's policy's headers.cluster)
    endpoints: tuple[str, ...] = ()  # picked replica first, then fallbacks; empty: Envoy balances
    envoy_lb: str = ""  # how Envoy reaches the endpoints: original_dst | override_host | hash
    affinity_key: str = ""
    body: bytes | None = None  # None: forward the original body
    lease: Lease | None = None
    signals: Signals | None = None
    pii_action: str = ""
    stages: Mapping[str, float] = field(default_factory=dict)
    pick_detail: dict[str, Any] | None = None  # replica scores, for explanations
    explanation: dict[str, Any] | None = None
    session: sessions.SessionModel | None = None  # the conversation's model: kept, switched, new
    fallback_deadline: float = 0.0  # the request's policy's fallback.deadline (chained requests)
    cache_hit: CacheHit | None = None  # answered from the semantic cache: nothing to place
    cache_token: str = ""  # a miss whose response may be stored (semantic.py)
    cache_detail: dict[str, Any] | None = None  # the lookup, for explanations
    plan: Plan | None = None  # a chained request: the backends Envoy tries in order (extproc/fallback.py)
    model_span: tuple[int, int] = (0, 0)  # of the model value in the body sent (chained requests)


def _conversation(signals: Signals) -> str:
    """The conversation's opening (system prompt and first user message): the same on every turn."""
    opening = signals.messages[: signals.last_user_index + 1][:2]
    return "\0".join(m.text for m in opening)


def _has_history(signals: Signals) -> bool:
    """An earlier answer in the conversation: a later turn, not a first one."""
    return any(m.role == "assistant" for m in signals.messages)


_FULL = "full"  # a pool whose every replica is at its capacity (a chain's skip reason)


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def _session_key(session: str) -> str:
    """The session table's key for a session id: a 128-bit digest, so an entry costs the same
    whatever the client sent (raw 60 KiB ids times max_sessions would be gigabytes)."""
    return "s\0" + hashlib.blake2b(session.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


@dataclass(slots=True)
class Choice:
    """The router's decision before a replica is picked."""

    state: RouterState
    parsed: request.LLMRequest
    signals: Signals
    stages: dict[str, float]
    started: float
    model: Model | None = None  # None: passthrough
    fallbacks: tuple[str, ...] = ()
    label: str = ""
    pii_action: str = ""
    redactions: pii.Redactions | None = None
    session_key: str | None = None  # the conversation, for the session-model table
    session: sessions.SessionModel | None = None
    cache_rule: DecisionCache | None = None  # the decision opted in to the semantic cache


class RouterState:
    """Everything derived from one policy. Built whole, then swapped in at once; requests in
    flight keep the state they started with."""

    def __init__(self, policy: Policy, pools: Pools, tokenizers: Tokenizers | None = None) -> None:
        self.policy = policy
        self.pools = pools
        self.tokenizers = tokenizers  # the served models' prompt tokenizers (models with kv_events)
        self.picker: Picker | None = None  # built by the router from policy.picking (Router.swap)
        # The policy's fallback chains (None: no request is ever tried on a second backend).
        self.chains = ChainTable(policy) if policy.chains else None


class Router:
    def __init__(
        self,
        state: RouterState,
        *,
        metrics: Metrics | None = None,
        classifier: ClassifierSignal | None = None,
        discovery: Discovery | None = None,
        tracker: LoadTracker | None = None,
        counter: TokenCounter | None = None,
        load_reports: Any = None,
        session_store: sessions.SessionStore | None = None,
    ) -> None:
        self.state = state
        self.metrics = metrics or Metrics()
        self.classifier = classifier
        self.discovery = discovery or Discovery()
        self.tracker = tracker or LoadTracker()
        self.counter = counter or TokenCounter()
        self.index = PrefixIndex(state.policy.picking.index_blocks)
        settings = state.policy.sessions
        self.sessions = session_store or sessions.LocalSessions(settings.max_sessions, settings.idle_seconds)
        self.load_reports = load_reports
        self.health = OutlierDetector(
            state.policy.picking.outlier_detection,
            on_eject=lambda model, reason: self.metrics.ejections.labels(model, reason).inc(),
            on_overflow=lambda model: self.metrics.ejections_overflow.labels(model).inc(),
        )
        self.kv = KvAwareness(
            on_event=lambda model, what: self.metrics.count_kv_event(model, what),
            on_lag=lambda model, seconds: self.metrics.kv_event_lag.labels(model).observe(seconds),
            tracker=self.tracker,
        )
        if state.tokenizers is None:
            state.tokenizers = self.kv.tokenizers(state.policy)
        self.admission = AdmissionQueue(state.policy.admission)
        self.admission.configure(state.policy.admission, self._has_room)
        self.tracker.on_release = lambda lease: self.admission.release()
        state.picker = self._picker(state.policy)
        self.cache: SemanticCache | None = None  # set by the runtime when some decision opts in
        self.recent_plans = RecentPlans()
        self.backends = BackendHealth(
            state.policy.fallback,
            on_change=lambda backend, reason: self.metrics.backend_blocked.labels(backend, reason).inc(),
        )

    # --- state ---------------------------------------------------------------------------------

    def build_state(self, policy: Policy) -> RouterState:
        """A complete state for policy (may block briefly on a first Kubernetes list)."""
        return RouterState(policy, Pools.build(policy, self.discovery), self.kv.tokenizers(policy))

    def swap(self, state: RouterState) -> None:
        self.state = state
        self.health.configure(state.policy.picking.outlier_detection)
        self.admission.configure(state.policy.admission, self._has_room)
        self.backends.configure(state.policy.fallback)
        state.picker = self._picker(state.policy)
        if isinstance(self.sessions, sessions.LocalSessions):
            self.sessions.configure(state.policy.sessions.max_sessions, state.policy.sessions.idle_seconds)
        self.index.capacity = state.policy.picking.index_blocks
        self.discovery.retain(
            m.replicas.kubernetes for m in state.policy.models.values() if m.replicas and m.replicas.kubernetes
        )
        self.follow_kv_events()

    def follow_kv_events(self) -> None:
        """Subscribe to the KV events of the current pools' replicas (after a reload or a pool change)."""
        state = self.state
        self.kv.follow(state.policy.models, state.pools.endpoints)

    def set_load_reports(self, reports: Any) -> None:
        """Scraped replica load (queue, KV-cache use) for the load scorer."""
        self.load_reports = reports
        self.state.picker = self._picker(self.state.policy)

    def _picker(self, policy: Policy) -> Picker:
        self.tracker.peers = self.kv.peers if policy.picking.peer_load else None
        return build_picker(policy.picking, self.tracker, self.index, self.load_reports, self.health)

    def observe_upstream(self, model: str, outcomes: list[tuple[str, Outcome]]) -> None:
        """How a finished request went on each replica it tried (from the access log), for
        outlier detection. Only replicas the router picks count: Envoy watches its own."""
        pool = self.state.pools.endpoints(model)
        for endpoint, outcome in outcomes:
            self.health.observe(endpoint, model, outcome, pool)

    # --- the flow ------------------------------------------------------------------------------

    async def choose(self, call: Call) -> Choice:
        """Parse, compute signals, decide, apply the PII policy: everything but the replica.
        ``extproc eval`` calls this alone; serving continues with ``route``."""
        state = self.state
        policy = state.policy
        stages: dict[str, float] = {}
        t0 = time.perf_counter()
        api = request.api_for_path(call.path)
        if api is None:
            raise errors.ModelNotFound(f"{call.path} is not an LLM API path", code="unknown_path")
        if call.method != "POST":
            raise errors.MethodNotAllowed(f"{call.path} only accepts POST, not {call.method}")
        encoding = call.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise errors.UnsupportedMediaType(
                f"content-encoding {encoding!r} is not supported; send the JSON body uncompressed"
            )
        if len(call.body) > policy.max_body_bytes:
            raise errors.PayloadTooLarge(
                f"request body is {len(call.body)} bytes; the limit is {policy.max_body_bytes}"
            )
        # Parsing is Python work proportional to the body (100,000 messages: ~0.1 s): in a
        # thread the interpreter still switches to the event loop every few milliseconds.
        parsed = await lanes.run(len(call.body), LARGE_BODY_BYTES, request.parse, api, call.body)
        signals = Signals(parsed.messages, call.headers, self.counter)
        if len(call.body) > LARGE_BODY_BYTES and policy.text_rules:
            # A large body's text rules (joined, lower-cased, searched: megabytes each) run in its
            # lane, not on the event loop every other request needs; decide() reads the results.
            await lanes.run(len(call.body), LARGE_BODY_BYTES, signals.prepare, policy.text_rules)
        stages["parse"] = time.perf_counter() - t0
        choice = Choice(state, parsed, signals, stages, t0)

        if parsed.model in policy.auto_models:
            if policy.uses_tokens:
                # Tokenizing holds the interpreter: a long prompt is counted in a thread (which the
                # tokenizer releases it in), not on the event loop every other request needs.
                await lanes.run(len(call.body), _COUNT_INLINE_BYTES, signals.count_tokens)
            decision, model_name, choice.fallbacks = await self._decide(policy, signals, call, stages)
            choice.label = decision.name if decision else DEFAULT_DECISION
            if policy.sessions.keep_model:
                model_name = await self._session_model(policy, decision, model_name, choice, call)
            choice.cache_rule = decision.cache if decision else None
        elif parsed.model in policy.models:
            decision, model_name, choice.label = None, parsed.model, EXPLICIT
        elif policy.unknown_models == "passthrough":
            choice.label = PASSTHROUGH
            return choice
        else:
            configured = ", ".join(sorted([*policy.auto_models, *policy.models]))
            raise errors.ModelNotFound(
                f"model {parsed.model!r} is not served here; use one of: {configured}", param="model"
            )
        choice.model = policy.models[model_name]
        pii_policy = policy.pii_policy(decision, choice.model)
        if pii_policy is not None:
            await self._classify(signals, policy, stages, topic=False)
            self._enforce_pii(policy, pii_policy, choice)
            kept = choice.session
            if kept is not None and choice.model.name != kept.model:  # privacy beats keeping the model
                choice.session = sessions.SessionModel(
                    sessions.SWITCHED, choice.model.name, kept.previous, kept.decided, "pii", kept.source
                )
        return choice

    async def _session_model(
        self, policy: Policy, decision: Decision | None, decided: str, choice: Choice, call: Call
    ) -> str:
        """The model this turn goes to: the conversation's own, unless the decision may move it."""
        signals = choice.signals
        session = call.headers.get(policy.headers.session)
        later = _has_history(signals)
        if not session and not later:
            return decided  # a first turn without a session: nothing to keep
        # The table knows conversations by their session header only: two requests with the same
        # opening (a templated system prompt and question) need not be one conversation. Without
        # a header, only the KV events can tell, from the whole history a replica holds.
        key = choice.session_key = _session_key(session) if session else None
        previous, source = (self.sessions.get(key), "table") if key is not None else (None, None)
        if previous is None and later:
            # (tokenizing a long history: off the event loop)
            size = len(call.body)
            previous = await lanes.run(
                size, _COUNT_INLINE_BYTES, self._model_from_kv_events, choice.state, choice.parsed
            )
            source = "kv_events"
        if previous is None or previous not in policy.models:
            choice.session = sessions.SessionModel(sessions.NEW, decided, decided=decided)
            return decided
        if previous == decided:
            choice.session = sessions.SessionModel(sessions.SAME, decided, previous, decided, source=source)
            return decided
        rule = decision.switch if decision is not None else None
        allowed = rule is not None and (rule.always or await self._holds(rule.when, signals, policy, choice.stages))
        if allowed:
            choice.session = sessions.SessionModel(sessions.SWITCHED, decided, previous, decided, "switch", source)
            return decided
        choice.session = sessions.SessionModel(sessions.KEPT, previous, previous, decided, "keep_model", source)
        # The decided model (then its fallbacks) if the conversation's own has no replica left.
        choice.fallbacks = tuple(m for m in (decided, *choice.fallbacks) if m != previous)
        return previous

    async def _holds(self, condition: Any, signals: Signals, policy: Policy, stages: dict[str, float]) -> bool:
        if condition is None:
            return False
        result = condition.evaluate(signals)
        if result is None:
            await self._classify(signals, policy, stages)
            result = condition.evaluate(signals)
        return bool(result)

    def _model_from_kv_events(self, state: RouterState, parsed: request.LLMRequest) -> str | None:
        """The model whose replicas really hold most of this conversation (from their KV events):
        how a sidecar that never saw the conversation learns where it is."""
        best, best_fraction = None, 0.5  # more than half the prompt: its history, not a shared system prompt
        tokenizers = state.tokenizers
        for name, model in state.policy.models.items():
            tokenizer = tokenizers.get(name) if tokenizers is not None else None
            if tokenizer is None or model.replicas is None:
                continue
            tokens = prompt_tokens(tokenizer, parsed)
            if not tokens:
                continue
            held = self.kv.held(PromptBlocks(tokens), state.pools.endpoints(name))
            fraction = max((f for f, mode in held.values() if mode is Mode.EXACT), default=0.0)
            if fraction > best_fraction:
                best, best_fraction = name, fraction
        return best

    async def route(self, call: Call) -> Routed:
        choice = await self.choose(call)
        state, parsed, signals, stages = choice.state, choice.parsed, choice.signals, choice.stages
        policy = state.policy
        if choice.model is None:
            assert policy.passthrough_cluster is not None
            stages["total"] = time.perf_counter() - choice.started
            return Routed(
                "",
                parsed.model,
                PASSTHROUGH,
                policy.passthrough_cluster,
                policy.headers.cluster,
                signals=signals,
                stages=stages,
            )
        explain_wanted = call.explain and policy.explain
        lookup = vector = None
        cache_detail = None
        if choice.cache_rule is not None and self.cache is not None:
            # Before admission: a hit needs no replica, so it never waits for one.
            t1 = time.perf_counter()
            lookup, vector, hit, cache_detail = await self._cache_lookup(choice, call)
            stages["cache"] = time.perf_counter() - t1
            if hit is not None:
                return self._cached(choice, hit, cache_detail, explain_wanted)
        prompts = await self._prompts(choice, call)
        granted = await self._admit(state, choice, call)
        t2 = time.perf_counter()
        try:
            placed = self._place(state, choice.model, choice.fallbacks, parsed, signals, explain_wanted, prompts)
        finally:
            if granted is not None:
                self.admission.placed(granted)
        cache_token = ""
        if lookup is not None and vector is not None and self.cache is not None:
            cache_token = self.cache.expect(lookup, vector, parsed.api.value)
        try:
            # After placement: a fallback model's id is what the body must name. (Copies of a
            # large body are made in its lane.)
            if choice.redactions:
                rewrite = partial(request.redact, parsed, choice.redactions, placed.upstream_model)
            else:
                rewrite = partial(parsed.with_model, placed.upstream_model)
            body = await lanes.run(len(call.body), LARGE_BODY_BYTES, rewrite)
        except BaseException:
            if placed.lease is not None:  # (cancelled: the stream ended, or the large body's deadline)
                self.tracker.release(placed.lease)
            raise
        model_span = request.model_span(parsed, body, placed.upstream_model) if placed.plan is not None else (0, 0)
        session = self._record_session(choice, placed.model) if choice.session is not None else None
        stages["pick"] = time.perf_counter() - t2
        # The router's own work: time waiting for a replica with room is the "queue" stage.
        stages["total"] = time.perf_counter() - choice.started - stages.get("queue", 0.0)
        explanation = None
        if explain_wanted:
            explanation = self.explain(policy, signals, choice.label, choice.pii_action, placed, session, cache_detail)
        return Routed(
            placed.model,
            placed.upstream_model,
            choice.label,
            placed.cluster,
            policy.headers.cluster,
            placed.endpoints,
            placed.envoy_lb,
            placed.affinity_key,
            None if body is parsed.raw else body,
            placed.lease,
            signals,
            choice.pii_action,
            stages,
            placed.pick_detail,
            explanation,
            session,
            cache_token=cache_token,
            cache_detail=cache_detail,
            plan=placed.plan,
            model_span=model_span,
            fallback_deadline=policy.fallback.deadline,
        )

    # --- admission control (extproc/admission.py) ------------------------------------------------

    async def _admit(self, state: RouterState, choice: Choice, call: Call) -> str | None:
        """Wait for room when every replica of the model and its fallbacks is full. Returns the
        model a queued request was granted a slot of (its reservation ends once placed)."""
        assert choice.model is not None
        models = (choice.model.name, *choice.fallbacks)
        policy = state.policy
        if not any(policy.models[m].capacity is not None for m in models):
            return None
        if not any(state.pools.endpoints(m) for m in models if policy.models[m].replicas is not None):
            return None  # no replica at all: placement answers 503
        if any(b.provider is not None for m in models for b in policy.models[m].backends):
            return None  # a hosted backend in the chain takes what full replicas cannot: no wait
        priority = self.admission.priority_of(call.headers)
        if not self.admission.needs_queue(models, priority):
            return None
        t = time.perf_counter()
        try:
            return await self.admission.wait(models, call.headers, call.on_wait or (lambda seconds: None))
        except QueueFull as refused:
            self.metrics.admission_rejected.labels(refused.priority).inc()
            raise
        finally:
            waited = time.perf_counter() - t
            choice.stages["queue"] = waited
            name = policy.admission.priorities[priority].name
            self.metrics.admission_wait.labels(name).observe(waited)

    @property
    def longest_wait(self) -> float:
        """The longest any request may wait in the admission queue (0 if none may queue)."""
        if not self.may_queue:
            return 0.0
        return max((p.max_wait for p in self.state.policy.admission.priorities), default=0.0)

    @property
    def may_queue(self) -> bool:
        """Some model has a capacity: a request may wait for room (the stream then answers
        concurrently, to extend Envoy's timer first)."""
        return any(m.capacity is not None for m in self.state.policy.models.values())

    def _has_room(self, name: str, reserved: int, share: float = 1.0) -> bool:
        """A replica of the model is below its capacity (or its share of it), counting the slots
        granted to waiters."""
        state = self.state
        model = state.policy.models.get(name)
        if model is None:
            return False
        capacity = model.capacity
        if capacity is None or model.replicas is None or model.replicas.envoy == "hash":
            return True
        free = 0
        for endpoint in state.pools.endpoints(name):
            if self.health.is_ejected(endpoint):
                continue
            free += self._free_slots(capacity, endpoint, share)
        return free > reserved

    def _free_slots(self, capacity: Any, endpoint: str, share: float = 1.0) -> int:
        if capacity.max_waiting is not None and self.load_reports is not None:
            report = self.load_reports(endpoint)
            if report is not None and report.waiting is not None and report.waiting >= capacity.max_waiting * share:
                return 0
        if capacity.max_inflight is None:
            return 1 << 30
        return max(0, math.floor(capacity.max_inflight * share) - self.tracker.inflight[endpoint])

    async def _cache_lookup(
        self, choice: Choice, call: Call
    ) -> tuple[Lookup | None, Any, CacheHit | None, dict[str, Any]]:
        """(lookup, vector, hit, detail): a request the cache may serve is looked up; one it may
        not (sampled, PII, no tenant...) gets neither a lookup nor a stored answer."""
        assert self.cache is not None and choice.model is not None and choice.cache_rule is not None
        policy = choice.state.policy
        lookup = prepare(choice.parsed, call.headers, choice.model, choice.cache_rule, policy.cache)
        vector = None
        if not isinstance(lookup, Refusal):
            vector = await self._question_embedding(lookup.query)
            # After the embedding: its encoder pass is cached with the question's PII spans, so
            # the check below reads them instead of running the encoder again.
            refusal = cache_scope.ENCODER if vector is None else await self._cache_pii_refusal(choice.signals, policy)
            lookup = refusal or lookup
        if isinstance(lookup, Refusal):
            self.metrics.cache_skipped.labels(str(lookup)).inc()
            return None, None, None, {"result": "skipped", "reason": str(lookup)}
        hit, best = await self.cache.lookup(lookup, vector)
        detail = {"result": "hit" if hit else "miss", "similarity": round(best, 4), "threshold": lookup.threshold}
        return lookup, vector, hit, detail

    async def _question_embedding(self, query: str) -> Any:
        """The question's sentence embedding, or None without one in the classifier's time."""
        if self.classifier is None:
            return None
        try:
            timeout = self.classifier.timeout_seconds
            deadline = asyncio.get_running_loop().time() + timeout  # its turn among the classifier's texts
            return await asyncio.wait_for(self.classifier.classifier.embed(query, deadline), timeout)
        except Exception as exc:  # no embedding in time: route as usual, store nothing
            log.warning("cache: no sentence embedding (%s); routing without the cache", type(exc).__name__)
            return None

    async def _cache_pii_refusal(self, signals: Signals, policy: Policy) -> Refusal | None:
        """Personal data is never cached: every type is looked for (the policy's own check may ask
        for fewer), and a check that could not run, or not over everything, refuses too."""
        if self.classifier is None:
            return cache_scope.PII_UNCHECKED
        if signals.pii is None or policy.pii_types is not None:
            topic, read = signals.topic, signals.classifier_read  # (annotate would reset the topic)
            try:
                await self.classifier.annotate(signals, pii=True, topic=False, pii_types=None)
            except Exception:  # a check that failed refuses below
                log.debug("cache: the PII check failed; not caching")
            finally:
                signals.topic, signals.classifier_read = topic, read
        if signals.pii is None or signals.pii_unchecked:
            return cache_scope.PII_UNCHECKED
        if any(hit.score >= PII_MIN_SCORE for hit in signals.pii):
            return cache_scope.PII
        return None

    def _cached(self, choice: Choice, hit: CacheHit, detail: dict[str, Any], explain: bool) -> Routed:
        """A hit: answered by the sidecar, no replica placed, no lease."""
        model = choice.model
        assert model is not None
        policy = choice.state.policy
        prompt_tokens = choice.signals.tokens
        if model.pricing is not None:
            saved = model.pricing.cost(prompt_tokens, hit.answer.completion_tokens)
            self.metrics.cache_saved_cost.labels(model.name).inc(saved)
        choice.stages["total"] = time.perf_counter() - choice.started
        explanation = None
        if explain:
            placed = Placement(model.name, model.upstream_model, model.cluster)
            explanation = self.explain(policy, choice.signals, choice.label, choice.pii_action, placed, None, detail)
        return Routed(
            model.name,
            model.upstream_model,
            choice.label,
            model.cluster,
            policy.headers.cluster,
            signals=choice.signals,
            pii_action=choice.pii_action,
            stages=choice.stages,
            explanation=explanation,
            cache_hit=hit,
            cache_detail=detail,
        )

    async def _decide(
        self, policy: Policy, signals: Signals, call: Call, stages: dict[str, float]
    ) -> tuple[Decision | None, str, tuple[str, ...]]:
        t = time.perf_counter()
        classify = None
        if policy.needs_pii and self.classifier is not None:
            # PII is needed whatever the decision; start the encoder now, beside the cheap rules.
            classify = asyncio.ensure_future(self._classify(signals, policy, stages, topic=policy.uses_topic))
        outcome = decide(policy, signals)
        if outcome is NEEDS_CLASSIFIER:
            stages["policy"] = time.perf_counter() - t
            await (classify or self._classify(signals, policy, stages))
            t = time.perf_counter()
            outcome = decide(policy, signals)
        elif classify is not None:
            await classify
        stages["policy"] = stages.get("policy", 0.0) + time.perf_counter() - t
        assert outcome is not NEEDS_CLASSIFIER
        decision = outcome if isinstance(outcome, Decision) else None
        choice = choose_model(policy, decision, lambda: self._split_key(policy, signals, call))
        return decision, choice.model, choice.fallbacks

    async def _classify(self, signals: Signals, policy: Policy, stages: dict[str, float], topic: bool = True) -> None:
        if not signals.classifier_pending:
            return
        if self.classifier is None:
            signals.classifier_failed("unavailable")
            self.metrics.signal_failures.labels("classifier", "unavailable").inc()
            return
        t = time.perf_counter()
        try:
            await self.classifier.annotate(signals, pii=policy.needs_pii, topic=topic, pii_types=policy.pii_types)
            self._count_skipped(signals)
        except TimeoutError:
            signals.classifier_failed("timeout")
            self.metrics.signal_failures.labels("classifier", "timeout").inc()
        except Exception as exc:  # a failing signal never fails the request
            signals.classifier_failed(type(exc).__name__)
            self.metrics.signal_failures.labels("classifier", "error").inc()
            log.warning("classifier failed (%s); routing on the remaining signals", type(exc).__name__)
        stages["classify"] = time.perf_counter() - t

    def _count_skipped(self, signals: Signals) -> None:
        read = signals.classifier_read or {}
        for part, key in (("topic", "topic_skipped_chars"), ("pii", "skipped_chars")):
            skipped = int(read.get(key, 0))
            if skipped > 0:
                self.metrics.classifier_skipped_chars.labels(part).inc(skipped)
                self.metrics.classifier_skipped_requests.labels(part).inc()

    @staticmethod
    def _split_key(policy: Policy, signals: Signals, call: Call) -> str:
        """Session, else user, else the conversation's opening: stable across its turns."""
        for name in (policy.headers.session, policy.headers.user):
            value = call.headers.get(name)
            if value:
                return value
        return _digest(_conversation(signals))

    def _enforce_pii(self, policy: Policy, rule: PiiPolicy, choice: Choice) -> None:
        """Apply the PII policy's verdict (extproc/policy/pii.py) to the choice."""
        signals = choice.signals
        found = pii.Detections(signals.pii, signals.pii_unchecked, choice.parsed.unreadable)
        verdict = pii.enforce(rule, found, choice.label, policy.classifier.pii_tokens)
        for pii_type, action in verdict.counts:
            self.metrics.pii.labels(pii_type, action).inc()
        if verdict.error is not None:
            raise verdict.error
        choice.pii_action, choice.redactions = verdict.action, verdict.redactions
        if verdict.reroute is not None:
            choice.model = policy.models[verdict.reroute]
            choice.fallbacks, choice.label = (), f"{choice.label}+pii-reroute"

    def _place(
        self,
        state: RouterState,
        model: Model,
        fallbacks: tuple[str, ...],
        parsed: request.LLMRequest,
        signals: Signals,
        explain: bool,
        prompts: dict[str, PromptBlocks | None] | None = None,
    ) -> Placement:
        """The model (or the first fallback) with a ready replica, and the replica."""
        policy = state.policy
        if state.chains is not None:
            return self._place_chain(state, model, fallbacks, parsed, signals, explain, prompts)
        tried = []
        full: Model | None = None
        for name in (model.name, *fallbacks):
            candidate = policy.models[name]
            tried.append(name)
            placed = self._place_pool(state, candidate, parsed, signals, explain, True, prompts)
            if placed == _FULL:  # every replica full: a fallback may have room, else the first full one
                full = full or candidate
            elif isinstance(placed, Placement):
                return placed
        if full is not None:  # (admission let it through: a slot freed and was taken meanwhile)
            return self._pick(state, full, state.pools.endpoints(full.name), parsed, signals, explain, prompts)
        raise errors.ServiceUnavailable(f"no ready replica for model {' or '.join(map(repr, tried))}; retry later")

    def _place_chain(
        self,
        state: RouterState,
        model: Model,
        fallbacks: tuple[str, ...],
        parsed: request.LLMRequest,
        signals: Signals,
        explain: bool,
        prompts: dict[str, PromptBlocks | None] | None = None,
    ) -> Placement:
        """The backends of the model, then of each fallback model, in order (a plan Envoy walks on
        failures), less those cooling down or ejected; the first is placed as ``_place`` does
        (a pool whose every replica is full gives way to the next backend, as a fallback model does).
        When none is left out, the plan is the chain's own, built with the policy."""
        assert state.chains is not None
        chain = state.chains.get(model.name, fallbacks)
        limit = state.policy.fallback.max_attempts
        attempts: list[Attempt] = []
        skipped: list[tuple[str, str]] = []
        first: Placement | None = None
        soonest: float | None = None
        full: Model | None = None
        blocked = self.backends.blocked
        for step in chain.steps:
            if len(attempts) >= limit:
                break
            attempt = step.attempt
            if attempt.hosted:
                why = blocked(attempt.backend)
                if why is not None:
                    skipped.append((attempt.backend, why[0]))
                    if why[0] == COOLDOWN:
                        soonest = why[1] if soonest is None else min(soonest, why[1])
                    continue
                attempts.append(attempt)
                if first is None:
                    first = Placement(attempt.model, attempt.upstream_model, attempt.cluster)
                continue
            candidate = step.model
            if first is not None and self._reachable(state, candidate):
                # A later attempt: Envoy balances it; only whether the pool has a ready replica counts.
                attempts.append(attempt)
                continue
            placed = self._place_pool(state, candidate, parsed, signals, explain, first is None, prompts)
            if placed == _FULL:
                skipped.append((f"{candidate.name} {POOL}", _FULL))
                full = full or candidate
                continue
            if placed is None:
                skipped.append((f"{candidate.name} {POOL}", "no_ready_replica"))
                continue
            assert isinstance(placed, Placement)
            if placed.envoy_lb == "original_dst" and first is not None:
                # Envoy's ORIGINAL_DST cluster takes one address per request: the first attempt's.
                skipped.append((f"{candidate.name} {POOL}", "original_dst_only_first"))
                continue
            attempts.append(attempt)
            if first is None:
                first = placed
        if first is None and full is not None:  # (admission let it through: a slot freed and was taken meanwhile)
            first = self._pick(state, full, state.pools.endpoints(full.name), parsed, signals, explain, prompts)
            attempts.append(next(s.attempt for s in chain.steps if s.model is full and not s.attempt.hosted))
        if first is None:
            if soonest is not None:
                raise errors.RateLimited(
                    f"every backend for model {model.name!r} asked the router to wait; retry after the Retry-After",
                    soonest - time.time(),
                )
            tried = " or ".join(repr(n) for n in (model.name, *fallbacks))
            raise errors.ServiceUnavailable(f"no ready replica or backend for model {tried}; retry later")
        if skipped or full is not None:
            shape = tuple(attempts)
            plan = Plan(shape, tuple(skipped), state.chains.per_try_timeout(shape))
        else:
            plan = chain.plan
        if not plan.chained:
            return first
        return Placement(
            first.model,
            first.upstream_model,
            first.cluster,
            first.endpoints,
            first.envoy_lb,
            first.affinity_key,
            first.lease,
            first.pick_detail,
            plan,
        )

    def _reachable(self, state: RouterState, model: Model) -> bool:
        """A chain's later attempt can go to this model's pool (as ``_place_pool`` without a
        pick would place it): Envoy balances its cluster, or it has a ready replica and is not
        an ORIGINAL_DST pool. False sends the step through ``_place_pool`` for its skip reason."""
        replicas = model.replicas
        if replicas is None or replicas.envoy == "hash":
            return True
        return replicas.envoy != "original_dst" and bool(state.pools.endpoints(model.name))

    def _place_pool(
        self,
        state: RouterState,
        model: Model,
        parsed: request.LLMRequest,
        signals: Signals,
        explain: bool,
        pick: bool,
        prompts: dict[str, PromptBlocks | None] | None = None,
    ) -> Placement | str | None:
        """A model's own replicas or cluster as one placement (``_place``) or chain attempt; None
        without a ready replica, _FULL when every one is at its capacity. With ``pick`` the
        replica is picked and leased; a chain's later attempts are not (they get there only on
        a failure, and Envoy balances them)."""
        policy = state.policy
        if model.replicas is None:  # Envoy balances this model's cluster itself
            return Placement(model.name, model.upstream_model, model.cluster)
        if model.replicas.envoy == "hash":
            # Envoy's ring hash (with a load bound) picks; the router only names the conversation.
            key = _digest(signals.headers.get(policy.headers.session) or _conversation(signals))
            return Placement(model.name, model.upstream_model, model.cluster, envoy_lb="hash", affinity_key=key)
        endpoints = state.pools.endpoints(model.name)
        if not endpoints:
            self.metrics.no_replica.labels(model.name).inc()
            return None
        if pick:
            if model.capacity is not None:
                endpoints = tuple(e for e in endpoints if self._free_slots(model.capacity, e) > 0)
                if not endpoints:
                    return _FULL
            return self._pick(state, model, endpoints, parsed, signals, explain, prompts)
        mode = model.replicas.envoy
        cluster = policy.original_dst_cluster if mode == "original_dst" else model.cluster
        return Placement(model.name, model.upstream_model, cluster, envoy_lb=mode)

    def _pick(
        self,
        state: RouterState,
        model: Model,
        endpoints: tuple[str, ...],
        parsed: request.LLMRequest,
        signals: Signals,
        explain: bool,
        prompts: dict[str, PromptBlocks | None] | None = None,
    ) -> Placement:
        assert model.replicas is not None and state.picker is not None
        policy = state.policy
        blocks = block_hashes(model.name, request.render(parsed.messages), policy.picking.block_chars)
        session = signals.headers.get(policy.headers.session)
        known = prompts or {}
        prompt = known[model.name] if model.name in known else self._prompt_blocks(state, model, parsed)
        held = self.kv.held(prompt, endpoints) if prompt is not None else None
        wanted = PickRequest(model.name, blocks, session, held=held)
        pick: Pick = state.picker.pick(wanted, endpoints, explain=explain)  # type: ignore[assignment]
        primary = pick.endpoints[0]
        mode = "none" if held is None else held[primary][1].value
        self.metrics.count_index_mode(model.name, mode)
        # The scorers already matched the prompt against every replica's index (before recording).
        matched = wanted.matched[primary] if wanted.matched else self.index.matched_blocks(primary, blocks)
        self.index.record(primary, blocks)
        lease = self.tracker.acquire(primary, model.name)
        self.metrics.count_pick(model.name, primary)
        if blocks:
            self.metrics.prefix_hit.labels(model.name).observe(matched / len(blocks))
        envoy = model.replicas.envoy
        cluster = policy.original_dst_cluster if envoy == "original_dst" else model.cluster
        detail: dict[str, Any] = {"scores": pick.scores, "prefix_blocks": matched, "blocks": len(blocks), "index": mode}
        if held is not None and prompt is not None:
            self.kv.picked(primary, prompt, held[primary][0])
            detail["kv_cache"] = {
                "prompt_tokens": len(prompt.tokens),
                "held": {e: {"fraction": round(f, 4), "mode": m.value} for e, (f, m) in held.items()},
            }
        if pick.excluded:
            detail["excluded"] = pick.excluded
        return Placement(
            model.name, model.upstream_model, cluster, pick.endpoints, envoy, lease=lease, pick_detail=detail
        )

    def _record_session(self, choice: Choice, model: str) -> sessions.SessionModel | None:
        """Remember where the conversation went; a kept model with no replica left moved it."""
        if choice.session_key is not None:
            self.sessions.put(choice.session_key, model)
        outcome = choice.session
        if outcome is not None and model != outcome.model:
            previous = outcome.previous if outcome.previous is not None else outcome.model
            outcome = sessions.SessionModel(
                sessions.SWITCHED, model, previous, outcome.decided, "unavailable", outcome.source
            )
        if outcome is not None:
            self.metrics.count_session_model(model, outcome.outcome, outcome.reason)
        return outcome

    async def _prompts(self, choice: Choice, call: Call) -> dict[str, PromptBlocks | None]:
        """The chosen model's prompt tokens, where it has KV events: off the event loop for a
        long body (tokenizing 2,000 tokens takes milliseconds; the tokenizer releases the
        interpreter), as token counting does."""
        model = choice.model
        tokenizers = choice.state.tokenizers
        if model is None or tokenizers is None or tokenizers.get(model.name) is None:
            return {}
        t = time.perf_counter()
        prompt = await lanes.run(
            len(call.body), _COUNT_INLINE_BYTES, self._prompt_blocks, choice.state, model, choice.parsed
        )
        choice.stages["tokenize"] = time.perf_counter() - t
        return {model.name: prompt}

    def _prompt_blocks(self, state: RouterState, model: Model, parsed: request.LLMRequest) -> PromptBlocks | None:
        """The served model's token ids of this prompt, for models with KV events."""
        tokenizers = state.tokenizers
        tokenizer = tokenizers.get(model.name) if tokenizers is not None else None
        if tokenizer is None:
            return None
        tokens = prompt_tokens(tokenizer, parsed)
        return PromptBlocks(tokens) if tokens is not None else None

    def record_usage(self, model_name: str, input_tokens: int, output_tokens: int) -> None:
        """Tokens, cost, and what the same tokens would have cost on the baseline model."""
        policy = self.state.policy
        model = policy.models.get(model_name)
        if model is None:
            return
        self.metrics.tokens.labels(model_name, "input").inc(input_tokens)
        self.metrics.tokens.labels(model_name, "output").inc(output_tokens)
        if model.pricing is not None:
            self.metrics.cost.labels(model_name).inc(model.pricing.cost(input_tokens, output_tokens))
        baseline = policy.models.get(policy.baseline_model or "")
        if baseline is not None and baseline.pricing is not None:
            self.metrics.baseline_cost.labels(model_name).inc(baseline.pricing.cost(input_tokens, output_tokens))

    # --- explanations --------------------------------------------------------------------------

    def explain(
        self,
        policy: Policy,
        signals: Signals,
        decision: str,
        pii_action: str,
        placed: Placement,
        session: sessions.SessionModel | None,
        cache_detail: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Why this request went where it did: signals, decisions tried, replica scores. Never
        the prompt text or header values."""
        topic = signals.topic
        replica = placed.pick_detail or {}
        out: dict[str, Any] = {
            "model": placed.model,
            "decision": decision,
            "signals": {
                "tokens": signals.tokens,
                "tokens_estimated": signals.tokens_estimated,
                "messages": len(signals.messages),
                "domain": topic.domain if topic else None,
                "domain_top": sorted(topic.domain_probs.items(), key=lambda kv: -kv[1])[:3] if topic else None,
                "complexity": round(topic.complexity, 4) if topic else None,
                "pii": signals.pii_types() if signals.pii is not None else None,
                "classifier": "skipped" if signals.classifier_pending else (signals.classifier_error or "ok"),
                "classifier_read": signals.classifier_read,
                "pii_unchecked": sorted(signals.pii_unchecked) or None,
            },
            "trace": trace_decisions(policy, signals) if decision not in (EXPLICIT, PASSTHROUGH) else [],
            "pii_action": pii_action or None,
            "replicas": {"picked": list(placed.endpoints), **replica},
            "session_model": session.explain() if session is not None else None,
        }
        if cache_detail is not None:
            out["cache"] = cache_detail
        if placed.plan is not None:
            out["fallback"] = placed.plan.explain()
        return out
