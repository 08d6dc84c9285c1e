"""Cooldowns and ejections of hosted backends, learnt from Envoy's per-attempt access log.

A backend (a provider with one of its model ids) that answered 429 is left out of chains until
its ``Retry-After`` (``retry-after-ms``, seconds or an HTTP date; capped at ``max_cooldown``),
else for ``fallback.cooldown``. One that fails ``consecutive_failures`` times in a row (5xx,
connect failures, resets, timeouts) is ejected for ``base_ejection_time`` x its ejection count,
up to ``max_ejection_time``; a success resets the count of failures. Times are wall-clock
seconds, so that router replicas sharing a store (extproc/store.py) agree on them: every event
is written there and every router reads them back in the background, so a provider that rate
limits one router is skipped by all of them within ``store.sync_interval``.

The router's own replicas are not backends here: their health is outlier detection's
(extproc/replicas/health.py), per replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import enum
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from extproc.policy.backends import FallbackSettings

log = logging.getLogger("extproc.cooldown")

COOLDOWN = "cooldown"  # answered 429
EJECTED = "ejected"  # failed repeatedly


class Outcome(enum.Enum):
    SUCCESS = "success"
    RATE_LIMITED = "rate_limited"
    FAILURE = "failure"  # 5xx, connect failure, reset, timeout


@dataclass(slots=True)
class _State:
    cooldown_until: float = 0.0
    ejected_until: float = 0.0
    ejections: int = 0
    failures: int = 0  # in a row, this router's own view


def retry_after(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait, from Retry-After (seconds or an HTTP date) or retry-after-ms."""
    ms = headers.get("retry-after-ms", "").strip()
    if ms:
        with contextlib.suppress(ValueError):
            value = float(ms) / 1000
            if math.isfinite(value) and value >= 0:
                return value
    text = headers.get("retry-after", "").strip()
    if not text:
        return None
    with contextlib.suppress(ValueError):
        value = float(text)
        return value if math.isfinite(value) and value >= 0 else None
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        when = email.utils.parsedate_to_datetime(text)
        return max(0.0, when.timestamp() - now)
    return None


class BackendHealth:
    """Which hosted backends chains should skip now, and why. Process-wide: it survives reloads."""

    def __init__(
        self,
        settings: FallbackSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        on_change: Callable[[str, str], None] | None = None,  # (backend, reason) entered
    ) -> None:
        self.settings = settings or FallbackSettings()
        self._clock = clock
        self._on_change = on_change
        self._states: dict[str, _State] = {}
        self.store = None  # a SharedStore, when the policy has one
        self._pending: set[asyncio.Task] = set()
        self.store_errors = 0

    def configure(self, settings: FallbackSettings) -> None:
        self.settings = settings

    # --- reading ---------------------------------------------------------------------------------

    def blocked(self, backend: str) -> tuple[str, float] | None:
        """(reason, until) if chains should leave backend out now."""
        state = self._states.get(backend)
        if state is None:
            return None
        now = self._clock()
        if state.cooldown_until > now:
            return COOLDOWN, state.cooldown_until
        if state.ejected_until > now:
            return EJECTED, state.ejected_until
        return None

    def current(self) -> dict[str, str]:
        """Backend -> reason, for those left out now (the cooldown-state gauge)."""
        out = {}
        for backend in list(self._states):
            why = self.blocked(backend)
            if why is not None:
                out[backend] = why[0]
        return out

    # --- outcomes (from the access log) ------------------------------------------------------------

    def observe(self, backend: str, outcome: Outcome, headers: Mapping[str, str] | None = None) -> str | None:
        """Account one attempt on backend. Returns the reason it was just left out, if it was."""
        settings = self.settings
        now = self._clock()
        state = self._states.get(backend)
        if outcome is Outcome.SUCCESS:
            if state is not None:
                state.failures = 0
            return None
        if state is None:
            state = self._states[backend] = _State()
        if outcome is Outcome.RATE_LIMITED:
            wait = retry_after(headers or {}, now)
            wait = settings.cooldown if wait is None else min(wait, settings.max_cooldown)
            until = now + wait
            if until <= state.cooldown_until:
                return None
            state.cooldown_until = until
            log.warning("backend %s rate limited the router: skipped for %.1fs", backend, wait)
            self._share("cooldown", backend, until, state.ejections)
            return self._changed(backend, COOLDOWN)
        state.failures += 1
        if state.failures < settings.consecutive_failures or state.ejected_until > now:
            return None
        state.failures = 0
        state.ejections += 1
        wait = min(settings.base_ejection_time * state.ejections, settings.max_ejection_time)
        state.ejected_until = now + wait
        log.warning(
            "backend %s failed %d times in a row: ejected for %gs", backend, settings.consecutive_failures, wait
        )
        self._share("eject", backend, state.ejected_until, state.ejections)
        return self._changed(backend, EJECTED)

    def _changed(self, backend: str, reason: str) -> str:
        if self._on_change is not None:
            self._on_change(backend, reason)
        return reason

    # --- sharing -----------------------------------------------------------------------------------

    def _share(self, kind: str, backend: str, until: float, ejections: int) -> None:
        store = self.store
        if store is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        until_ms = int(until * 1000)
        task = loop.create_task(self._write(store, store.key(kind, backend), f"{until_ms}:{ejections}", until_ms))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _write(self, store, key: str, value: str, until_ms: int) -> None:  # type: ignore[no-untyped-def]
        try:
            await store.set_until(key, value, until_ms)
        except Exception as exc:  # the store is down: this router keeps its own state meanwhile
            self._store_failed(exc)

    def _store_failed(self, exc: Exception) -> None:
        self.store_errors += 1
        if self.store_errors == 1 or self.store_errors % 1000 == 0:
            log.warning("shared store unavailable (%s); cooldowns stay local until it answers", type(exc).__name__)

    async def sync(self, backends: Iterable[str]) -> None:
        """Take the cooldowns and ejections other routers wrote for these backends."""
        store = self.store
        if store is None:
            return
        names = list(backends)
        keys = [store.key(kind, b) for b in names for kind in ("cooldown", "eject")]
        try:
            values = await store.get_many(keys)
        except Exception as exc:
            self._store_failed(exc)
            return
        now = self._clock()
        for backend in names:
            for kind in ("cooldown", "eject"):
                raw = values.get(store.key(kind, backend))
                if raw is None:
                    continue
                try:
                    until_text, _, count = raw.decode().partition(":")
                    until = int(until_text) / 1000
                    ejections = int(count or 0)
                except ValueError:
                    continue
                if until <= now:
                    continue
                state = self._states.setdefault(backend, _State())
                if kind == "cooldown" and until > state.cooldown_until:
                    state.cooldown_until = until
                    self._changed(backend, COOLDOWN)
                elif kind == "eject" and until > state.ejected_until:
                    state.ejected_until = until
                    state.ejections = max(state.ejections, ejections)
                    self._changed(backend, EJECTED)

    async def run_sync(self, backends: Callable[[], Iterable[str]], interval: float) -> None:
        """Read shared state every ``interval`` seconds, for the backends the policy has now."""
        while True:
            await self.sync(backends())
            await asyncio.sleep(interval)
