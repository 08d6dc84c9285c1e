"""Passive health of replicas: outlier detection as Envoy does it, fed by Envoy's access log.

A replica whose requests fail several times in a row is ejected: picks leave it out for
``base_ejection_time`` x its ejection count, capped at ``max_ejection_time``. Connect failures,
resets and timeouts are counted apart from 5xx answers (Envoy's
``split_external_local_origin_errors``), and an answer below 500 resets both counts. Never more
than ``max_ejection_percent`` of a pool is out at once, so a whole-pool outage degrades to errors
instead of emptying the pool. Each ``interval`` without an ejection takes one off the count.

Where Envoy lets a replica back when its time is up (at its next sweep), the router first
connects to it (``connect_probe``): a replica still down stays out for its next, longer,
ejection instead of failing more requests. Replicas are keyed by address, so one that serves
two models' pools is out of both.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from extproc.policy.config import OutlierDetection

log = logging.getLogger("extproc.replicas")

CONSECUTIVE_5XX = "consecutive_5xx"
CONSECUTIVE_LOCAL_ORIGIN_FAILURE = "consecutive_local_origin_failure"
CONNECT_PROBE = "connect_probe"  # ejected again: still unreachable when its time was up
REASONS = (CONSECUTIVE_5XX, CONSECUTIVE_LOCAL_ORIGIN_FAILURE, CONNECT_PROBE)


class Outcome(enum.Enum):
    SUCCESS = "success"  # the replica answered below 500
    ERROR_5XX = "5xx"  # the replica answered 5xx
    LOCAL_ORIGIN_FAILURE = "local_origin_failure"  # no answer: connect failure, reset, timeout


@dataclass(slots=True)
class _Replica:
    model: str  # of the last failure, for metrics
    consecutive_5xx: int = 0
    consecutive_local: int = 0
    ejections: int = 0  # Envoy's ejection time backoff: the multiplier of base_ejection_time
    ejected_at: float | None = None  # None: in service
    ejected_for: float = 0.0
    returned_at: float | None = None
    probing: bool = False


class OutlierDetector:
    """Process-wide, like the load tracker: ejections survive config reloads."""

    def __init__(
        self,
        settings: OutlierDetection | None = None,
        *,
        on_eject: Callable[[str, str], None] | None = None,  # (model, reason)
        on_overflow: Callable[[str], None] | None = None,  # (model): max_ejection_percent kept one in
        clock: Callable[[], float] = time.monotonic,
        probe_timeout: float = 1.0,
    ) -> None:
        self.settings = settings or OutlierDetection()
        self._on_eject = on_eject
        self._on_overflow = on_overflow
        self._clock = clock
        self.probe_timeout = probe_timeout
        self._replicas: dict[str, _Replica] = {}
        # Replaced, never mutated: the metrics thread reads it while the event loop changes it.
        self.ejected: frozenset[str] = frozenset()

    @property
    def tracked(self) -> bool:
        """Some replica has failures, an ejection or an ejection count on record."""
        return bool(self._replicas)

    def configure(self, settings: OutlierDetection) -> None:
        self.settings = settings
        if not settings.enabled:
            self._replicas.clear()
            self.ejected = frozenset()

    # --- outcomes (from the access log) ------------------------------------------------------

    def observe(self, endpoint: str, model: str, outcome: Outcome, pool: Sequence[str]) -> str | None:
        """Count one request's outcome on endpoint, a member of pool. Returns the reason if it
        ejected the replica."""
        settings = self.settings
        if not settings.enabled:
            return None
        replica = self._replicas.get(endpoint)
        if outcome is Outcome.SUCCESS:
            if replica is not None:
                replica.consecutive_5xx = replica.consecutive_local = 0
                if replica.ejections == 0 and replica.ejected_at is None:
                    del self._replicas[endpoint]  # nothing left to remember
            return None
        if replica is None:
            replica = self._replicas[endpoint] = _Replica(model)
        replica.model = model
        if replica.ejected_at is not None:
            return None  # requests that were in flight when it was ejected
        if outcome is Outcome.ERROR_5XX:
            replica.consecutive_local = 0  # it did answer
            replica.consecutive_5xx += 1
            if replica.consecutive_5xx >= settings.consecutive_5xx:
                return self._eject(endpoint, replica, CONSECUTIVE_5XX, pool)
        else:
            replica.consecutive_local += 1
            if replica.consecutive_local >= settings.consecutive_local_origin_failure:
                return self._eject(endpoint, replica, CONSECUTIVE_LOCAL_ORIGIN_FAILURE, pool)
        return None

    def _eject(self, endpoint: str, replica: _Replica, reason: str, pool: Sequence[str]) -> str | None:
        settings = self.settings
        replica.consecutive_5xx = replica.consecutive_local = 0  # a new bout is needed either way
        members = set(pool) | {endpoint}
        out = sum(1 for e in members if e in self.ejected)
        if 100 * (out + 1) / len(members) > settings.max_ejection_percent:
            if self._on_overflow is not None:
                self._on_overflow(replica.model)
            log.warning(
                "replica %s of %s fails (%s) but stays in: %d of %d replicas are out, the most "
                "max_ejection_percent (%d) allows",
                endpoint,
                replica.model,
                reason,
                out,
                len(members),
                settings.max_ejection_percent,
            )
            return None
        now = self._clock()
        if replica.returned_at is not None and settings.interval > 0:
            replica.ejections = max(0, replica.ejections - int((now - replica.returned_at) // settings.interval))
        self._start_ejection(endpoint, replica, now)
        self.ejected = self.ejected | {endpoint}
        if self._on_eject is not None:
            self._on_eject(replica.model, reason)
        log.warning(
            "replica %s of %s ejected for %gs (%s; ejection %d)",
            endpoint,
            replica.model,
            replica.ejected_for,
            reason,
            replica.ejections,
        )
        return reason

    def _start_ejection(self, endpoint: str, replica: _Replica, now: float) -> None:
        settings = self.settings
        base, cap = settings.base_ejection_time, settings.max_ejection_time
        if replica.ejections * base < cap + base:  # as Envoy: the multiplier stops growing past the cap
            replica.ejections += 1
        replica.ejected_at = now
        replica.ejected_for = min(base * replica.ejections, cap)
        replica.returned_at = None

    def _return(self, endpoint: str, replica: _Replica, now: float) -> None:
        replica.ejected_at = None
        replica.returned_at = now
        replica.consecutive_5xx = replica.consecutive_local = 0
        self.ejected = self.ejected - {endpoint}
        log.info("replica %s of %s back in service", endpoint, replica.model)

    # --- picking -----------------------------------------------------------------------------

    def is_ejected(self, endpoint: str) -> bool:
        if endpoint not in self.ejected:
            return False
        replica = self._replicas[endpoint]
        if self.settings.connect_probe:
            return True  # back only through a successful probe
        now = self._clock()
        assert replica.ejected_at is not None
        if now >= replica.ejected_at + replica.ejected_for:
            self._return(endpoint, replica, now)
            return False
        return True

    # --- housekeeping ------------------------------------------------------------------------

    def due(self) -> list[str]:
        """Ejected replicas whose time is up (and no probe is running for)."""
        now = self._clock()
        out = []
        for endpoint in self.ejected:
            replica = self._replicas[endpoint]
            assert replica.ejected_at is not None
            if not replica.probing and now >= replica.ejected_at + replica.ejected_for:
                out.append(endpoint)
        return out

    async def probe_due(self) -> None:
        """Let back the replicas whose time is up: at once, or once a TCP connect succeeds."""
        if not self.settings.connect_probe:
            for endpoint in self.due():
                self.is_ejected(endpoint)  # returns it
            return
        due = self.due()
        if not due:
            return
        for endpoint in due:
            self._replicas[endpoint].probing = True
        try:
            results = await asyncio.gather(*(connects(e, self.probe_timeout) for e in due))
        finally:
            for endpoint in due:
                replica = self._replicas.get(endpoint)
                if replica is not None:
                    replica.probing = False
        now = self._clock()
        for endpoint, ok in zip(due, results, strict=True):
            replica = self._replicas.get(endpoint)
            if replica is None or replica.ejected_at is None:
                continue  # left its pool, or detection was turned off, meanwhile
            if ok:
                self._return(endpoint, replica, now)
                continue
            self._start_ejection(endpoint, replica, now)
            if self._on_eject is not None:
                self._on_eject(replica.model, CONNECT_PROBE)
            log.warning(
                "replica %s of %s still unreachable; ejected for %gs more", endpoint, replica.model, replica.ejected_for
            )

    def retain(self, endpoints: Iterable[str]) -> None:
        """Forget replicas that left every pool."""
        keep = set(endpoints)
        for endpoint in [e for e in self._replicas if e not in keep]:
            del self._replicas[endpoint]
        if not self.ejected <= keep:
            self.ejected = self.ejected & keep


async def connects(endpoint: str, timeout: float) -> bool:
    """True if a TCP connection to host:port opens within timeout."""
    host, _, port = endpoint.rpartition(":")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout)
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
