"""The cache as the router and the server use it: look up, remember a miss, store its answer.

A miss is remembered under a random token that the routing answer puts in Envoy's dynamic
metadata; the route Envoy then takes mirrors the response, with that token, to the sidecar on a
second ext_proc stream (server.py). The token is the only link: it names no prompt, and a token
nobody claims expires.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from extproc.cache.answers import Answer, Capture
from extproc.cache.scope import Lookup
from extproc.cache.store import MemoryStore, RedisStore, Store
from extproc.metrics import Metrics
from extproc.policy.backends import StoreSettings
from extproc.policy.config import CacheSettings

log = logging.getLogger("extproc.cache")

_PENDING_LIMIT = 10000  # misses awaiting their response; the oldest are forgotten past this
_PENDING_SECONDS = 660.0  # the longest a response may take (as the replica lease)


@dataclass(frozen=True, slots=True)
class CacheHit:
    answer: Answer
    similarity: float
    threshold: float
    stream: bool  # render as SSE
    include_usage: bool  # with a final usage event


@dataclass(frozen=True, slots=True)
class _Pending:
    lookup: Lookup
    vector: np.ndarray
    api: str
    since: float


class SemanticCache:
    def __init__(
        self,
        settings: CacheSettings,
        metrics: Metrics,
        store: Store | None = None,
        *,
        shared: StoreSettings | None = None,
    ) -> None:
        """``shared`` is the policy's ``store``: a Redis cache without a ``redis_url`` of its
        own connects there, with that store's password (and TLS, for a ``rediss://`` URL)."""
        self.settings = settings
        self.metrics = metrics
        self.shared = shared if settings.backend == "redis" and not settings.redis_url else None
        self.store = store if store is not None else self._build(settings)
        self._pending: OrderedDict[str, _Pending] = OrderedDict()

    def _build(self, settings: CacheSettings) -> Store:
        def evicted(entry_id: str, reason: str) -> None:
            self.metrics.cache_evictions.labels(reason).inc()

        if settings.backend == "redis":
            import redis.asyncio as redis  # only a policy with a Redis cache loads the package

            from extproc.store import read_secret

            url, password = settings.redis_url, None
            if self.shared is not None:
                url = self.shared.url
                if self.shared.password is not None:
                    password = read_secret(self.shared.password)
            if not url:
                raise ValueError("a Redis cache needs cache.redis_url or the policy's store")
            client = redis.from_url(
                url,
                password=password,
                socket_timeout=settings.redis_timeout_seconds,
                socket_connect_timeout=max(settings.redis_timeout_seconds, 1.0),
                health_check_interval=30,
            )
            # The follower's blocking read must not be cut by the request-path timeout.
            follower = redis.from_url(url, password=password, socket_timeout=5.0, socket_connect_timeout=1.0)
            return RedisStore(
                client, settings.key_prefix, settings.max_entries, evicted, self._error, follower=follower
            )
        return MemoryStore(settings.max_entries, evicted, settings.max_bytes)

    def _error(self, op: str) -> None:
        self.metrics.cache_errors.labels(op).inc()

    def compatible(self, settings: CacheSettings, shared: StoreSettings | None = None) -> bool:
        """Whether a reloaded policy's settings can keep this cache (and its entries)."""
        keep = ("backend", "max_entries", "max_bytes", "redis_url", "key_prefix", "redis_timeout_seconds")
        uses_shared = shared if settings.backend == "redis" and not settings.redis_url else None
        return uses_shared == self.shared and all(getattr(settings, k) == getattr(self.settings, k) for k in keep)

    def reconfigure(self, settings: CacheSettings) -> None:
        """Settings that apply per request (threshold, TTL, entry bound, tenant header)."""
        self.settings = settings

    async def start(self) -> None:
        await self.store.start()

    async def close(self) -> None:
        await self.store.close()

    @property
    def entries(self) -> int:
        return len(self.store.index)

    async def lookup(self, lookup: Lookup, vector: np.ndarray) -> tuple[CacheHit | None, float]:
        """A stored answer within the threshold, and the best similarity seen (-1: none)."""
        t = time.perf_counter()
        try:
            entry_id, answer, similarity = await asyncio.wait_for(
                self.store.get(lookup.scope, vector, lookup.threshold, lookup.words),
                self.settings.redis_timeout_seconds * 2,
            )
        except Exception as exc:  # a slow or failed backend makes a miss, never an error
            self._error("lookup")
            log.warning("cache lookup failed (%s); routing as a miss", type(exc).__name__)
            return None, -1.0
        finally:
            self.metrics.cache_lookup_seconds.observe(time.perf_counter() - t)
        usable = answer is not None and not (lookup.stream and answer.tool_calls)
        if entry_id is None or not usable:
            self.metrics.cache_lookups.labels(lookup.model, "miss").inc()
            return None, similarity
        assert answer is not None and entry_id is not None
        self.store.index.touch(entry_id)
        self.metrics.cache_lookups.labels(lookup.model, "hit").inc()
        return CacheHit(answer, similarity, lookup.threshold, lookup.stream, lookup.include_usage), similarity

    def expect(self, lookup: Lookup, vector: np.ndarray, api: str) -> str:
        """Remember a miss whose response may be stored; the token goes to Envoy's metadata."""
        now = time.monotonic()
        while self._pending:
            oldest_token, oldest = next(iter(self._pending.items()))
            if len(self._pending) < _PENDING_LIMIT and now - oldest.since < _PENDING_SECONDS:
                break
            del self._pending[oldest_token]
        token = secrets.token_hex(12)
        self._pending[token] = _Pending(lookup, vector, api, now)
        return token

    def claim(self, token: str) -> tuple[_Pending, Capture] | None:
        """The miss a mirrored response belongs to (once), and a capture for its body."""
        pending = self._pending.pop(token, None)
        if pending is None:
            return None
        return pending, Capture(pending.api, self.settings.max_entry_bytes)

    async def store_answer(self, pending: _Pending, capture: Capture) -> bool:
        outcome = capture.finish()
        if isinstance(outcome, str):
            self.metrics.cache_not_stored.labels(outcome).inc()
            return False
        lookup = pending.lookup
        entry_id = secrets.token_hex(12)
        try:
            await asyncio.wait_for(
                self.store.put(
                    entry_id, lookup.scope, lookup.model, pending.vector, lookup.words, outcome, lookup.ttl_seconds
                ),
                max(1.0, self.settings.redis_timeout_seconds * 4),
            )
        except Exception as exc:
            self._error("store")
            log.warning("cache store failed (%s); the answer is not kept", type(exc).__name__)
            return False
        self.metrics.cache_stores.labels(lookup.model).inc()
        return True

    async def invalidate(self, model: str | None = None) -> int:
        count = await self.store.invalidate(model)
        self.metrics.cache_invalidations.inc()
        return count
