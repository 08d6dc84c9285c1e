"""The other routers' requests on each replica, inferred from the replicas' KV events.

Every router replica (one sidecar per Envoy pod) counts only the requests it sent itself, a
fraction of each model server's load, so a load bound over those counts keeps one router's
share even, not the replica's. But every router sees every replica's KV events, and a request
that a model server schedules stores the blocks of its prompt it did not hold: a BlockStored
run that does not continue a chain stored in the last ``continuation_seconds`` (chunked prefill,
decode blocks) is a request starting there. If this router sent it, it expected it (``expect``,
at its pick: the prompt's keys beyond what the replica held, or for a prompt held whole the
prompt's last block, the parent of its first decode block); if not, another router did, and it
counts into that replica's load from then on, decayed with the mean time a request stays in
flight (this router's own leases measure it). With Poisson arrivals the decayed sum averages
the other routers' in-flight count there (Little's law).

What it cannot see: requests waiting in a model server's queue (they store nothing until they
are scheduled), requests whose prompt was cached whole until their first decode block is full,
and a conversation's next turn sent within ``continuation_seconds`` of its previous answer's
last block (it continues that chain). The estimate is a load signal for the picker, not a count.

``stored`` is called by the KV index (the subscriber thread, for live batches only: replayed
history is not load); ``expect`` and ``load`` by the picking side. One lock keeps them apart.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from extproc.replicas.load import LoadTracker


class PeerLoad:
    def __init__(
        self,
        tracker: LoadTracker,
        *,
        continuation_seconds: float = 2.0,
        expect_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tracker = tracker  # its mean lease time is the decay constant
        self.continuation_seconds = continuation_seconds
        self.expect_seconds = expect_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._tails: dict[str, dict[int, float]] = {}  # endpoint -> tail key of a recent run -> stored at
        self._tail_order: deque[tuple[float, str, int]] = deque()
        # Our own requests: endpoint -> the key their first run starts with (or, for a prompt held
        # whole, follows) -> until when it is expected.
        self._firsts: dict[str, dict[int, float]] = {}
        self._parents: dict[str, dict[int, float]] = {}
        self._expected_order: deque[tuple[float, dict[str, dict[int, float]], str, int]] = deque()
        self._load: dict[str, tuple[float, float]] = {}  # endpoint -> (decayed count, as of)
        self.started = 0  # runs that started a request (ours and the others')
        self.foreign = 0  # of them, not ours

    # --- our own picks ------------------------------------------------------------------------

    def expect(self, endpoint: str, keys: Sequence[int], held: int) -> None:
        """This router sent a prompt with these block keys to endpoint, which held the first
        ``held`` of them: its first stored run starts at about ``keys[held]`` (a block or two
        earlier if the replica evicted some meanwhile), or, held whole, its first decode block
        follows ``keys[-1]``."""
        if not keys:
            return
        until = self._clock() + self.expect_seconds
        with self._lock:
            self._prune_expected(until - self.expect_seconds)
            if held >= len(keys):
                expected, which = [keys[-1]], self._parents
            else:
                expected, which = keys[max(0, held - 2) : held + 2], self._firsts
            mine = which.setdefault(endpoint, {})
            for key in expected:
                mine[key] = until
                self._expected_order.append((until, which, endpoint, key))

    # --- the replicas' events -----------------------------------------------------------------

    def stored(self, endpoint: str, parent: int | None, keys: Sequence[int]) -> None:
        """A live BlockStored run on endpoint: parent key (None: the chain's root), its keys."""
        if not keys:
            return
        now = self._clock()
        with self._lock:
            self._prune_tails(now - self.continuation_seconds)
            tails = self._tails.setdefault(endpoint, {})
            if keys[-1] in tails:  # the same run again (a replay overlapping the live stream)
                return
            continued = parent is not None and tails.pop(parent, None) is not None
            tails[keys[-1]] = now
            self._tail_order.append((now, endpoint, keys[-1]))
            if continued:
                return
            self.started += 1
            self._prune_expected(now)
            firsts, parents = self._firsts.get(endpoint), self._parents.get(endpoint)
            if firsts and firsts.pop(keys[0], None) is not None:
                return
            if parents and parent is not None and parents.pop(parent, None) is not None:
                return
            self.foreign += 1
            count, _ = self._decayed(endpoint, now)
            self._load[endpoint] = (count + 1.0, now)

    # --- the picker's side --------------------------------------------------------------------

    def load(self, endpoint: str) -> float:
        """Requests the other routers have in flight on endpoint, as inferred."""
        if endpoint not in self._load:
            return 0.0
        with self._lock:
            return self._decayed(endpoint, self._clock())[0]

    def _decayed(self, endpoint: str, now: float) -> tuple[float, float]:
        count, since = self._load.get(endpoint, (0.0, now))
        if count == 0.0:
            return 0.0, now
        value = count * math.exp(-(now - since) / self.tracker.mean_seconds)
        return (value if value > 1e-3 else 0.0), now

    def _prune_tails(self, before: float) -> None:
        order = self._tail_order
        while order and order[0][0] < before:
            at, endpoint, key = order.popleft()
            tails = self._tails.get(endpoint)
            if tails is not None and tails.get(key) == at:
                del tails[key]

    def _prune_expected(self, now: float) -> None:
        order = self._expected_order
        while order and order[0][0] < now:
            until, which, endpoint, key = order.popleft()
            mine = which.get(endpoint)
            if mine is not None and mine.get(key) == until:
                del mine[key]

    def forget(self, keep: set[str]) -> None:
        """Drop replicas that left the pools."""
        with self._lock:
            for table in (self._tails, self._firsts, self._parents, self._load):
                for endpoint in [e for e in table if e not in keep]:
                    del table[endpoint]
