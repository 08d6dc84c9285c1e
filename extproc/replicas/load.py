"""In-flight requests per replica, counted with leases so every ending returns the count to zero.

A lease is taken when a replica is picked. It is released when the stream that holds it ends:
the observability stream Envoy opens for the same request (it lives exactly as long as the
HTTP request), or, if no such stream claims it within a short grace period, the routing stream.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from dataclasses import dataclass


@dataclass(slots=True)
class Lease:
    id: int
    endpoint: str
    model: str
    claimed: bool = False
    expires: float = 0.0  # monotonic; only while unclaimed
    released: bool = False


class LoadTracker:
    """Process-wide in-flight counts; survives config reloads so counts stay true."""

    def __init__(self, grace_seconds: float = 2.0) -> None:
        self.grace_seconds = grace_seconds
        self.inflight: Counter[str] = Counter()
        self._leases: dict[int, Lease] = {}
        self._ids = itertools.count(1)

    def acquire(self, endpoint: str, model: str) -> Lease:
        lease = Lease(next(self._ids), endpoint, model, expires=time.monotonic() + self.grace_seconds)
        self._leases[lease.id] = lease
        self.inflight[endpoint] += 1
        return lease

    def claim(self, lease_id: int) -> Lease | None:
        """The observability stream of the same request takes over the lease."""
        lease = self._leases.get(lease_id)
        if lease is not None:
            lease.claimed = True
        return lease

    def release(self, lease: Lease) -> None:
        if lease.released:
            return
        lease.released = True
        self._leases.pop(lease.id, None)
        count = self.inflight[lease.endpoint] - 1
        if count > 0:
            self.inflight[lease.endpoint] = count
        else:
            del self.inflight[lease.endpoint]

    def release_unclaimed(self, lease: Lease) -> None:
        """Called when the routing stream ends: keep the lease only if an observer may still claim it."""
        if not lease.claimed:
            lease.expires = min(lease.expires, time.monotonic() + self.grace_seconds)

    def expire(self, now: float | None = None) -> int:
        """Release unclaimed leases past their grace period. Returns how many were released."""
        now = time.monotonic() if now is None else now
        stale = [lease for lease in self._leases.values() if not lease.claimed and lease.expires <= now]
        for lease in stale:
            self.release(lease)
        return len(stale)

    @property
    def open_leases(self) -> int:
        return len(self._leases)
