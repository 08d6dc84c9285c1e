"""The other routers' requests on each replica, inferred from the replicas' KV events.

Every router replica (one sidecar per Envoy pod) counts only the requests it sent itself, a
fraction of each model server's load, so a load bound over those counts keeps one router's
share even, not the replica's. But every router sees every replica's KV events, and a request
that a model server schedules stores the blocks of its prompt it did not hold: a BlockStored
run that does not continue a chain stored in the last ``continuation_seconds`` (chunked prefill,
decode blocks; a single block, as a decode step stores, may continue one up to
``decode_seconds`` old: a replica busy with long prefills takes seconds between a request's
decode blocks) is a request starting there. If this router sent it, it expected it (``expect``,
at its pick: the prompt's keys beyond what the replica held, or for a prompt held whole the
prompt's last block, the parent of its first decode block); if not, another router did, and it
counts into that replica's load from then on, decayed with the mean time a request stays in
flight once scheduled (this router's own requests measure it: lease time less the wait for
their first run). With Poisson arrivals the decayed sum averages
the other routers' in-flight count there (Little's law).

vLLM also stores every block a request's answer fills as it decodes (one every ``block_size``
tokens, a one-block run continuing the request's chain), so a request's end shows as its chain
no longer growing. Counting live chains instead of decayed starts was tried and balanced worse
(bench/RESULTS-affinity.md, "Live chains"): the decay weights a request that just started above
one about to end, which predicts the load a new request will share better than a count does.

What it cannot see: requests waiting in a model server's queue (they store nothing until they
are scheduled), requests whose prompt was cached whole until their first decode block is full,
and a conversation's next turn sent within ``continuation_seconds`` of its previous answer's
last block (it continues that chain; a one-block prompt run, within ``decode_seconds``). The
estimate is a load signal for the picker, not a count.

``stored`` is called by the KV index (the subscriber thread, for live batches only: replayed
history is not load); ``expect`` and ``load`` by the picking side. One lock keeps them apart.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from extproc.replicas.load import LoadTracker

MEASURED_FIRST = 16  # own requests timed before the others' are counted


class PeerLoad:
    def __init__(
        self,
        tracker: LoadTracker,
        *,
        continuation_seconds: float = 2.0,
        decode_seconds: float = 10.0,
        expect_seconds: float = 60.0,
        queued_seconds: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tracker = tracker  # its mean lease time is the decay constant
        self.continuation_seconds = continuation_seconds
        self.decode_seconds = decode_seconds  # how far apart a request's decode blocks may come
        self.expect_seconds = expect_seconds
        self.queued_seconds = queued_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._tails: dict[str, dict[int, float]] = {}  # endpoint -> tail key of a recent run -> stored at
        self.continued = 0  # runs that continued a chain (prefill chunks, decode blocks)
        self._tail_order: deque[tuple[float, str, int]] = deque()
        # Our own requests not yet seen: endpoint -> request -> when we picked it; and the key
        # their first run starts with (firsts) or, for a prompt held whole, follows (parents).
        self._waiting: dict[str, dict[int, float]] = {}
        # (Several requests may expect one key, e.g. a shared system prompt's: first come first.)
        self._firsts: dict[str, dict[int, deque[int]]] = {}
        self._parents: dict[str, dict[int, deque[int]]] = {}
        self._expected_order: deque[tuple[float, str, int, dict[str, dict[int, deque[int]]], Sequence[int]]] = deque()
        self._ids = itertools.count()
        self._load: dict[str, tuple[float, float]] = {}  # endpoint -> (decayed count, as of)
        self.wait_seconds = 0.0  # our requests' mean time from the pick to their first stored run
        self.started = 0  # runs that started a request (ours and the others')
        self.foreign = 0  # of them, not ours
        self.own = 0  # of them, ours

    # --- our own picks ------------------------------------------------------------------------

    def expect(self, endpoint: str, keys: Sequence[int], held: int) -> None:
        """This router sent a prompt with these block keys to endpoint, which held the first
        ``held`` of them: its first stored run starts at about ``keys[held]`` (a block or two
        earlier if the replica evicted some meanwhile), or, held whole, its first decode block
        follows ``keys[-1]``."""
        if not keys:
            return
        now = self._clock()
        with self._lock:
            self._prune_expected(now)
            if held >= len(keys):
                expected, which = keys[-1:], self._parents
            else:
                expected, which = keys[max(0, held - 2) : held + 2], self._firsts
            request = next(self._ids)
            self._waiting.setdefault(endpoint, {})[request] = now
            mine = which.setdefault(endpoint, {})
            for key in expected:
                mine.setdefault(key, deque()).append(request)
            self._expected_order.append((now + self.expect_seconds, endpoint, request, which, expected))

    # --- the replicas' events -----------------------------------------------------------------

    def stored(self, endpoint: str, parent: int | None, keys: Sequence[int]) -> None:
        """A live BlockStored run on endpoint: parent key (None: the chain's root), its keys."""
        if not keys:
            return
        now = self._clock()
        with self._lock:
            self._prune_tails(now - self.decode_seconds)
            tails = self._tails.setdefault(endpoint, {})
            if keys[-1] in tails:  # the same run again (a replay overlapping the live stream)
                return
            grew = tails.pop(parent, None) if parent is not None else None
            if grew is not None and len(keys) > 1 and grew < now - self.continuation_seconds:
                grew = None  # a prompt's run long after the chain last grew: a new request (a next turn)
            tails[keys[-1]] = now
            self._tail_order.append((now, endpoint, keys[-1]))
            if grew is not None:
                self.continued += 1
                return
            self.started += 1
            self._prune_expected(now)
            waiting = self._waiting.get(endpoint)
            if waiting:
                picked = _claim(self._firsts.get(endpoint), keys[0], waiting)
                if picked is None and parent is not None:
                    picked = _claim(self._parents.get(endpoint), parent, waiting)
                if picked is not None:  # ours: how long it waited to be scheduled
                    self.own += 1
                    self.wait_seconds += (now - picked - self.wait_seconds) / 64
                    return
            self.foreign += 1
            count, _ = self._decayed(endpoint, now)
            self._load[endpoint] = (count + 1.0, now)

    # --- the picker's side --------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether the picker should count it: some load is known, and the router has timed
        enough of its own requests to know how long one stays (before that the decay would be a
        guess, and a new sidecar would see the others' finished requests as still running)."""
        if self.tracker.measured < MEASURED_FIRST:
            return False
        return bool(self._load) or any(self._waiting.values())

    def load(self, endpoint: str) -> float:
        """Requests the other routers have in flight on endpoint, as inferred: the scheduled ones
        its events showed, and as many waiting in its queue per request of ours waiting there
        as they send per request we send (a queue is served in order, whoever sent it)."""
        waiting = self._waiting.get(endpoint)
        if endpoint not in self._load and not waiting:
            return 0.0
        now = self._clock()
        with self._lock:
            count = self._decayed(endpoint, now)[0]
            # (Only once other routers show: with one router a stray run counted as another's
            # would otherwise add a trace to every count, and reorder ties.)
            if waiting and self.foreign >= 0.05 * self.own > 0:
                # Ours picked within the mean lease time and not yet scheduled (an older one has
                # most likely ended unseen: a prompt held whole with a short answer).
                # Younger than queued_seconds: on their way (the events' lag, one engine step).
                oldest, newest = now - self.tracker.mean_seconds, now - self.queued_seconds
                queued = 0
                for picked in reversed(waiting.values()):
                    if picked < oldest:
                        break
                    queued += picked <= newest
                count += queued * self.foreign / self.own
            return count

    def _decayed(self, endpoint: str, now: float) -> tuple[float, float]:
        count, since = self._load.get(endpoint, (0.0, now))
        if count == 0.0:
            return 0.0, now
        value = count * math.exp(-(now - since) / self.service_seconds)
        return (value if value > 1e-3 else 0.0), now

    @property
    def service_seconds(self) -> float:
        """How long a request stays in flight once it is scheduled (its first stored run): our
        leases' mean time less the mean wait of our own requests for their first run, since the
        others' are only seen from then on."""
        return max(0.05, self.tracker.mean_seconds - self.wait_seconds)

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
            _, endpoint, request, which, keys = order.popleft()
            waiting = self._waiting.get(endpoint)
            if waiting is not None:
                waiting.pop(request, None)
            mine = which.get(endpoint)
            if mine is not None:
                for key in keys:
                    requests = mine.get(key)
                    if requests is not None and request in requests:
                        requests.remove(request)
                        if not requests:
                            del mine[key]

    def forget(self, keep: set[str]) -> None:
        """Drop replicas that left the pools."""
        with self._lock:
            for table in (self._tails, self._waiting, self._firsts, self._parents, self._load):
                for endpoint in [e for e in table if e not in keep]:
                    del table[endpoint]


def _claim(expected: dict[int, deque[int]] | None, key: int, waiting: dict[int, float]) -> float | None:
    """The first of our requests still waiting that expects key (removed): when it was picked."""
    if not expected:
        return None
    requests = expected.get(key)
    while requests:
        picked = waiting.pop(requests.popleft(), None)
        if picked is not None:
            if not requests:
                del expected[key]
            return picked
    expected.pop(key, None)
    return None
