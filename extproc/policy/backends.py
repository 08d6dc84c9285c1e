"""Where a model can be served, in order: its own replicas and hosted OpenAI-compatible
providers (the policy's ``providers`` and each model's ``backends``), and how a request falls
back along them (``fallback``). Plain immutable values, built by load.py; the defaults live here
and the schema is checked against them (tests/unit/test_backends.py)."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

POOL = "replicas"  # a model's backends entry naming its own replicas (or its Envoy cluster)
AUTHORIZATION_MODES = ("replace", "forward", "strip")


@dataclass(frozen=True, slots=True)
class SecretRef:
    """Where a secret is read: a file (a mounted Kubernetes Secret) or an environment variable.
    Only the reference lives in the policy and in Envoy's configuration, never the value."""

    file: str | None = None
    env: str | None = None

    def describe(self) -> str:
        return f"file {self.file}" if self.file else f"environment variable {self.env}"


@dataclass(frozen=True, slots=True)
class Provider:
    """A hosted OpenAI-compatible endpoint, one Envoy cluster (named like the provider)."""

    name: str
    base_url: str
    api_key: SecretRef | None = None
    authorization: str = "replace"  # the client's Authorization: replace (with api_key) | forward | strip
    ca_file: str | None = None  # None: the system's trust store (EnvoyOptions.ca_file)
    address: str | None = None  # connect here (host:port) instead of resolving the URL's host
    timeout: float = 30.0  # seconds, per attempt, until the response starts (see README for Envoy's rule)
    connect_timeout: float = 5.0
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).hostname or ""

    @property
    def port(self) -> int:
        return urlsplit(self.base_url).port or 443

    @property
    def path_prefix(self) -> str:
        """The base URL's path, which replaces the request's leading /v1 (``/openai/v1``)."""
        return urlsplit(self.base_url).path.rstrip("/") or ""


@dataclass(frozen=True, slots=True)
class Backend:
    """One place a model is served: a provider with that provider's id for the model, or the
    model's own replicas (provider None)."""

    provider: str | None
    upstream_model: str

    @property
    def id(self) -> str:
        """A stable, low-cardinality name: the metric label, and x-router-backend's value for a
        provider (a pool's is "<model> replicas")."""
        return f"{self.provider}/{self.upstream_model}" if self.provider else POOL


@dataclass(frozen=True, slots=True)
class FallbackSettings:
    """How a request walks its backends (the decision's model's, then its fallback models'):
    Envoy retries the next one on 429, 5xx, a connect failure, a reset or a timeout, before any
    response byte reached the client. Durations are seconds."""

    max_attempts: int = 3
    deadline: float = 60.0  # no new attempt starts this long after the request was routed
    replica_timeout: float | None = None  # per-try timeout of chains that start on the router's replicas
    cooldown: float = 30.0  # a backend that answered 429 without Retry-After is skipped this long
    max_cooldown: float = 600.0  # the longest Retry-After honoured
    consecutive_failures: int = 3  # 5xx, timeouts, connect failures in a row eject a provider backend
    base_ejection_time: float = 30.0  # x the backend's ejection count ...
    max_ejection_time: float = 300.0  # ... up to this


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """A shared store (Redis) for state every router replica should see (cooldowns)."""

    url: str  # redis://host:port/db or rediss:// (TLS); no password in it
    password: SecretRef | None = None
    key_prefix: str = "extproc:"
    timeout: float = 0.25  # per command; the hot path never waits for the store
    sync_interval: float = 0.25  # how often shared state is read
