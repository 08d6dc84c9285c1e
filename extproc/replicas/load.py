"""In-flight requests per replica, counted with leases so every ending returns the count to zero.

A lease is taken when the router picks a replica and carried in the request's dynamic metadata.
Envoy's gRPC access log reports every finished request (completed, failed, reset or cancelled)
with that metadata, and the entry ends the lease. The end of the request's ext_proc stream, which
Envoy holds open until the request ends, ends it too: a request reset before Envoy applied the
router's answer has no metadata, so no entry names its lease. Leases older than the longest a
request may run are ended as well, so nothing lost can inflate a count for ever.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class Lease:
    id: int
    endpoint: str
    model: str
    taken: float  # the tracker's clock (time.monotonic())
    released: bool = False


class Peers(Protocol):
    """Requests other routers have in flight on a replica (extproc/replicas/peerload.py)."""

    @property
    def active(self) -> bool: ...  # any load known at all (else every replica's is 0)

    def load(self, endpoint: str) -> float: ...


class LoadTracker:
    """Process-wide in-flight counts; survives config reloads so counts stay true."""

    def __init__(self, max_age_seconds: float = 660.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_seconds = max_age_seconds
        self.inflight: Counter[str] = Counter()
        self._leases: dict[int, Lease] = {}
        self._ids = itertools.count(1)
        self._clock = clock
        self.on_release: Callable[[Lease], None] | None = None  # a slot freed (admission control)
        self.peers: Peers | None = None  # the other routers' requests, where the KV events show them
        self.mean_seconds = 10.0  # a lease's mean duration (moving average; a first guess until measured)
        self.measured = 0  # leases that ended with their request (not expired)

    def loads(self, endpoints: Sequence[str]) -> Mapping[str, float]:
        """In-flight requests per replica: this router's, plus the other routers' as inferred."""
        peers = self.peers
        if peers is None or not peers.active:
            return self.inflight
        inflight = self.inflight
        return {e: inflight[e] + peers.load(e) for e in endpoints}

    def acquire(self, endpoint: str, model: str) -> Lease:
        lease = Lease(next(self._ids), endpoint, model, self._clock())
        self._leases[lease.id] = lease
        self.inflight[endpoint] += 1
        return lease

    def release(self, lease: Lease) -> None:
        self._end(lease, measured=True)

    def _end(self, lease: Lease, measured: bool) -> None:
        if lease.released:
            return
        lease.released = True
        self._leases.pop(lease.id, None)
        if measured:  # (an expired lease was lost, not served: its age says nothing)
            self.measured += 1
            # Weight 1/64: about the last hundred leases, so a burst moves it little.
            self.mean_seconds += (max(self._clock() - lease.taken, 0.05) - self.mean_seconds) / 64
        count = self.inflight[lease.endpoint] - 1
        if count > 0:
            self.inflight[lease.endpoint] = count
        else:
            del self.inflight[lease.endpoint]
        if self.on_release is not None:
            self.on_release(lease)

    def release_id(self, lease_id: int) -> bool:
        """End the lease with this id (from an access log entry); False if unknown or already ended."""
        lease = self._leases.get(lease_id)
        if lease is None:
            return False
        self.release(lease)
        return True

    def expire(self, now: float | None = None) -> int:
        """End leases older than the longest a request may run. Returns how many."""
        cutoff = (self._clock() if now is None else now) - self.max_age_seconds
        stale = [lease for lease in self._leases.values() if lease.taken <= cutoff]
        for lease in stale:
            self._end(lease, measured=False)
        return len(stale)

    @property
    def open_leases(self) -> int:
        return len(self._leases)
