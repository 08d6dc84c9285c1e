"""The routing policy as immutable objects, built once per (re)load from validated YAML."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from extproc import headers
from extproc.heads import Head
from extproc.policy.backends import Backend, FallbackSettings, Provider, StoreSettings
from extproc.policy.conditions import PII_MIN_SCORE, Condition


def default_of(cls: type, name: str) -> Any:
    """The default of a settings field: the one definition the loader, the schema's `default`s
    (tests/unit/test_defaults.py) and the docs are checked against."""
    for f in fields(cls):
        if f.name == name:
            if f.default is not MISSING:
                return f.default
            if f.default_factory is not MISSING:
                return f.default_factory()
            raise LookupError(f"{cls.__name__}.{name} has no default")
    raise LookupError(f"{cls.__name__} has no field {name!r}")


@dataclass(frozen=True, slots=True)
class Pricing:
    input_per_million: float
    output_per_million: float

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD for a request's tokens."""
        return (input_tokens * self.input_per_million + output_tokens * self.output_per_million) / 1e6


@dataclass(frozen=True, slots=True)
class KubernetesReplicas:
    namespace: str | None = None  # None: the pod's own namespace (of the kubeconfig's context outside a cluster)
    service: str | None = None
    selector: str | None = None
    port: int | str | None = None


@dataclass(frozen=True, slots=True)
class KvEvents:
    """Where each replica publishes vLLM's KV-cache events, and how to get a prompt's tokens.
    ``endpoint`` and ``replay_endpoint`` are templates over the replica's address ({host},
    {port}); ``endpoints`` names them per replica address instead (static pools)."""

    tokenizer: str  # the served model's tokenizer.json
    chat_template: str | None = None  # .jinja or tokenizer_config.json; None: the one beside tokenizer
    endpoint: str = "tcp://{host}:5557"
    replay_endpoint: str | None = None  # e.g. "tcp://{host}:5558"
    endpoints: tuple[tuple[str, str], ...] = ()  # (replica address, PUB endpoint)
    replay_endpoints: tuple[tuple[str, str], ...] = ()
    topic: str = ""
    warm_seconds: float = 30.0  # after (re)subscribing without a full replay: approximate this long

    def publisher(self, address: str) -> tuple[str, str | None]:
        """The PUB and replay endpoints of the replica at address ("ip:port", "[ipv6]:port")."""
        host, _, port = address.rpartition(":")
        explicit, replays = dict(self.endpoints), dict(self.replay_endpoints)
        endpoint = explicit.get(address) or self.endpoint.format(host=host, port=port)
        replay = replays.get(address) or (
            self.replay_endpoint.format(host=host, port=port) if self.replay_endpoint else None
        )
        return endpoint, replay


@dataclass(frozen=True, slots=True)
class Replicas:
    static: tuple[str, ...] = ()
    kubernetes: KubernetesReplicas | None = None
    envoy: str = "original_dst"  # original_dst | override_host | hash
    metrics: bool = False
    kv_events: KvEvents | None = None


@dataclass(frozen=True, slots=True)
class PiiPolicy:
    action: str  # allow | block | redact | reroute
    types: frozenset[str] | None = None  # None: every type
    min_score: float = PII_MIN_SCORE
    model: str | None = None  # reroute target
    on_error: str = "enforce"  # the check could not run: enforce (reroute, or 503) | allow

    def applies_to(self, pii_type: str) -> bool:
        return self.types is None or pii_type in self.types


@dataclass(frozen=True, slots=True)
class Capacity:
    """When a replica is full (extproc/admission.py): this many in flight from this router, or
    this many queued by the replica itself (scraped vllm:num_requests_waiting)."""

    max_inflight: int | None = None
    max_waiting: float | None = None


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    cluster: str
    upstream_model: str
    pricing: Pricing | None = None
    replicas: Replicas | None = None
    pii: PiiPolicy | None = None
    capacity: Capacity | None = None  # None: never full (no admission control)
    # Where the model is served, in order (policy/backends.py); () : its own cluster, as before.
    backends: tuple[Backend, ...] = ()

    @property
    def chained(self) -> bool:
        """Served by more than its own cluster: hosted providers, or several backends."""
        return bool(self.backends) and (len(self.backends) > 1 or self.backends[0].provider is not None)


@dataclass(frozen=True, slots=True)
class Split:
    model: str
    weight: float


# The default similarity threshold, picked on bench/cache_paraphrases.py's set (README "Semantic cache").
DEFAULT_CACHE_THRESHOLD = 0.92


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """The semantic cache's backend and defaults (policy `cache`); decisions opt in (`DecisionCache`)."""

    backend: str = "memory"  # memory | redis
    threshold: float = DEFAULT_CACHE_THRESHOLD  # cosine similarity of the last user messages
    ttl_seconds: float = 3600.0
    max_entries: int = 10000  # per sidecar (memory) or in Redis (its stream is trimmed to about this)
    max_entry_bytes: int = 256 * 1024  # a response larger than this is not stored
    max_bytes: int = 64 * 1024 * 1024  # the memory backend's stored answers, in all (oldest-used out)
    tenant_header: str | None = None  # when set, part of the scope; requests without it are not cached
    redis_url: str | None = None
    key_prefix: str = "extproc:cache:"
    redis_timeout_seconds: float = 0.05  # per Redis command on the request path


@dataclass(frozen=True, slots=True)
class DecisionCache:
    """A decision's opt-in to the cache. Unset fields take CacheSettings'."""

    ttl_seconds: float | None = None
    threshold: float | None = None
    sampled: bool = False  # cache requests sampled at temperature > 0 (or unset, which servers read as 1)


@dataclass(frozen=True, slots=True)
class Switch:
    """When a decision may move a conversation off the model it started on."""

    always: bool = False
    when: Condition | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    name: str
    when: Condition | None
    model: str | None
    split: tuple[Split, ...] = ()
    fallbacks: tuple[str, ...] = ()
    priority: int = 0
    pii: PiiPolicy | None = None
    switch: Switch | None = None  # None: a conversation on another model stays there
    cache: DecisionCache | None = None

    @property
    def needs_classifier(self) -> bool:
        return self.when is not None and self.when.needs_classifier


@dataclass(frozen=True, slots=True)
class Priority:
    name: str
    values: frozenset[str] = frozenset()  # priority-header values that select it (besides its name)
    max_wait: float = 5.0  # seconds in the queue before 429; 0: never waits
    max_queued: int = 256
    share: float = 1.0  # of each replica's capacity this priority may fill; the rest is kept for higher ones


@dataclass(frozen=True, slots=True)
class Admission:
    priority_header: str | None = headers.PRIORITY
    tenant_header: str | None = headers.TENANT_ID
    priorities: tuple[Priority, ...] = (Priority("default"),)  # served in this order
    default_priority: str = "default"  # for requests whose header names no priority
    max_queued_per_tenant: int = 64
    retry_after: float | None = None  # seconds in Retry-After; None: the priority's max_wait (at least 1)

    @property
    def default_index(self) -> int:
        return next((i for i, p in enumerate(self.priorities) if p.name == self.default_priority), 0)


@dataclass(frozen=True, slots=True)
class SessionSettings:
    keep_model: bool = True
    max_sessions: int = 100_000
    idle_seconds: float = 3600.0


@dataclass(frozen=True, slots=True)
class HeaderNames:
    cluster: str = headers.CLUSTER
    session: str = headers.SESSION_ID
    user: str = headers.USER_ID


@dataclass(frozen=True, slots=True)
class ClassifierSettings:
    enabled: bool | str = "auto"
    threads: int = 2  # onnxruntime intra-op threads per text
    workers: int = 1  # texts classified at once
    # texts that may wait per worker: a bound on memory; the deadline bounds the queue before it
    # (batching.py drops at once what the work ahead would make late)
    max_batch: int = 64
    max_wait_ms: float = 0.0  # texts run one at a time (batching.py): waiting would only delay
    cache_size: int = 4096
    timeout_ms: float = 300.0
    # tagger budget per request (signals/classifier.py): one encoder window, the classifier's own
    # default (extproc.classifier.text.DEFAULT_PII_TOKENS; a test keeps the two equal)
    pii_tokens: int = 510
    # tokens domain and complexity read of the latest user message, head and tail (classifier.py):
    # one window by default (extproc.classifier.text.WINDOW; a test keeps the two equal)
    topic_tokens: int = 510


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Passive health, in Envoy's terms (config.cluster.v3.OutlierDetection, with
    split_external_local_origin_errors): a replica that fails this many requests in a row is
    ejected for base_ejection_time x its ejection count (capped), never more than
    max_ejection_percent of a pool at once. Durations are seconds."""

    enabled: bool = True
    consecutive_5xx: int = 5  # 5xx answers from the replica in a row
    consecutive_local_origin_failure: int = 3  # connect failures, resets, timeouts in a row
    interval: float = 10.0  # each interval without an ejection takes one off the ejection count
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 50  # of a pool; at 50, one of two replicas may be ejected
    connect_probe: bool = True  # after its ejection time, a replica returns once a TCP connect succeeds


@dataclass(frozen=True, slots=True)
class PickingSettings:
    """Replica picking (extproc/replicas/picking.py): each setting belongs to the registered
    plugin that reads it (PluginType.settings) or to the prefix index (block_chars, index_blocks)."""

    # Scorer weights by type name (or alias) as the policy gives them; a scorer not named here
    # has its registered default weight (picking.weights() resolves them).
    weights: Mapping[str, float] = field(default_factory=dict)
    picker: str = "max_score"
    block_chars: int = 256
    index_blocks: int = 20000
    load_bound: float = 0.0  # a new conversation goes to a replica at or below the mean (bench/RESULTS-affinity.md)
    sticky_load_bound: float | None = 1.0  # bound for requests one replica holds much more of (None: load_bound)
    sticky_move_blocks: int | None = 12  # sticky bound only where moving re-prefills >= this many blocks
    peer_load: bool = True  # count the other routers' requests, inferred from KV events, into the load
    load_floor: int = 2
    fallbacks: int = 2
    outlier_detection: OutlierDetection = field(default_factory=OutlierDetection)


@dataclass(frozen=True, slots=True)
class Policy:
    models: Mapping[str, Model]
    decisions: tuple[Decision, ...]  # in evaluation order
    default_model: str
    auto_models: frozenset[str] = frozenset({"auto"})
    unknown_models: str = "reject"
    passthrough_cluster: str | None = None
    original_dst_cluster: str = "original_dst"
    max_body_bytes: int = 4 * 1024 * 1024
    explain: bool = False
    headers: HeaderNames = field(default_factory=HeaderNames)
    baseline_model: str | None = None
    classifier: ClassifierSettings = field(default_factory=ClassifierSettings)
    picking: PickingSettings = field(default_factory=PickingSettings)
    sessions: SessionSettings = field(default_factory=SessionSettings)
    admission: Admission = field(default_factory=Admission)
    pii: PiiPolicy | None = None
    cache: CacheSettings = field(default_factory=CacheSettings)
    uses_cache: bool = False  # some decision opted in to the semantic cache
    digest: str = ""  # sha256 of the source text, for the config-hash info metric
    needs_pii: bool = False  # some decision tests PII or some PII policy is set
    pii_types: frozenset[str] | None = None  # every type a PII policy or condition asks for (None: all)
    uses_tokens: bool = False  # some decision has a `tokens` condition
    uses_topic: bool = False  # some decision tests domain or complexity
    # The keyword and regex conditions (pure functions of the prompt text): a large body's are
    # evaluated in its lane, off the event loop (Signals.prepare).
    text_rules: tuple[Condition, ...] = ()
    uses_classifier: bool = False  # the encoder must be loaded
    heads: Mapping[str, Head] = field(default_factory=dict)  # fitted complexity heads by name
    head_files: tuple[str, ...] = ()  # files those heads were read from: watched with the policy
    providers: Mapping[str, Provider] = field(default_factory=dict)  # hosted backends by name
    fallback: FallbackSettings = field(default_factory=FallbackSettings)
    store: StoreSettings | None = None  # shared state across router replicas (None: each keeps its own)

    @property
    def chains(self) -> bool:
        """Some request may be tried on more than one backend, so Envoy needs the chain routes
        and filters: hosted providers, a model with several backends, or a decision's fallback
        model Envoy can retry on (an ORIGINAL_DST pool can only be a request's first attempt)."""

        def retriable(name: str) -> bool:
            model = self.models[name]
            return model.chained or model.replicas is None or model.replicas.envoy != "original_dst"

        return (
            bool(self.providers)
            or any(m.chained for m in self.models.values())
            or any(retriable(f) for d in self.decisions for f in d.fallbacks)
        )

    def pii_policy(self, decision: Decision | None, model: Model) -> PiiPolicy | None:
        """The most specific PII policy: the decision's, else the model's, else the default."""
        return (decision.pii if decision else None) or model.pii or self.pii
