"""Does KV-cache-affine replica picking beat the usual balancers? A discrete-event simulation.

    python bench/affinity_sim.py            # full: 4, 8, 16 replicas, then sweeps at 8 (~30 min)
    python bench/affinity_sim.py --quick    # CI: fewer requests, no sweeps (well under a minute)

Deterministic for a given --seed: the trace, the random baseline and every tie-break derive from it.
(Our picker hashes blocks with Python's `hash`, which changes per process, but only the equality
of hashes matters, so the figures do not change.)

Workload: replayed multi-turn chat (sizes in characters; about 4 characters a token)
    system prompts  4 shared ones of 1,000-2,000 chars; each conversation uses one at random.
    users           300 per replica, Zipf-popular (exponent 0.9). A user chats in one
                    conversation after another; each conversation has its own session id.
    turns           2-20 per conversation (uniform). Every turn sends the whole history: the
                    system prompt, all earlier user messages and answers, and a new user message.
    user message    100-600 chars; answer 300-1,200 chars (its output tokens = chars / 4).
    arrivals        Poisson, 3.5 requests/s per replica; each is the next turn of a user chosen by
                    popularity. The user continues their least recently continued conversation if
                    its last turn is at least 15 s old (time to get and read the answer), and
                    otherwise starts another one, so a heavy user runs several conversations at
                    once; a conversation left alone for 300 s is over. The trace is fixed in
                    advance and is the same for every policy.
    length          2,700 s of arrivals (quick: 120 s); requests in the first 900 s (quick: 40 s)
                    warm the caches and are not counted. Hit rates settle after ~900 s; without
                    the 300 s idle limit they keep falling for over an hour, as long-idle
                    conversations of rare users pile up.
    Rate and users scale with the number of replicas: every size sees the same load per replica.

Replica: loosely vLLM serving Llama-3.1-8B (bf16) on one A100-80GB
    KV cache        an LRU of 256-char (64-token) blocks, 6,000 per replica (~384k tokens, ~50 GB
                    at 128 KiB a token). As in vLLM's automatic prefix caching, blocks are keyed by
                    chained hashes and a prompt reuses the longest run of its leading blocks found.
                    A request's blocks are looked up and touched when it is admitted (tail first,
                    so a chain's tail is evicted before its head); its answer's blocks are added
                    when it completes (the next turn's prompt starts with them). Blocks of running
                    requests are not pinned.
    admission       at most 64 requests run at once; later arrivals wait in FIFO order.
    engine "steps"  (default) continuous batching with chunked prefill: each step decodes one
                    token for every decoding request and spends the rest of a 2,048-token budget
                    on waiting prefills, first come first served. A step takes
                        8 ms (weights read once) + 6.5e-8 s x context tokens of the decoding
                        requests (their KV read: 128 KiB a token at ~2 TB/s)
                        + 0.1 ms x prefill tokens (compute-bound: ~10k tokens/s, 2 FLOPs a
                        parameter a token at ~50% of the bf16 peak).
                    So load costs latency: more requests in flight make every step, prefills
                    included, slower.
    engine "simple" (--engine simple) one FIFO prefill lane at 0.1 ms per uncached token and a
                    fixed 15 ms per output token, independent of load.
    TTFT proxy      arrival -> end of the step (or lane slot) that completes the prompt's prefill:
                    queue wait plus uncached prefill (plus, in "steps", the decodes sharing those
                    steps).
    TPOT            per request, (last token - first token) / (output tokens - 1): where a busy
                    replica shows, since every step of a bigger batch takes longer. Not a target;
                    reported because imbalance costs decode speed more than TTFT here.
    load            in flight per replica = from the pick to the last token (what the router's
                    leases count). Sampled every 0.25 s after warm-up; max/mean = the busiest
                    replica / the mean over replicas, averaged over samples (p95 beside it).

Policies
    round-robin; random; least-loaded (fewest in flight, ties rotate); ring (consistent hashing of
    the session id, 100 virtual nodes per replica, no load bound); and ours: the package's Picker
    with BoundedLoad, PrefixAffinity, LeastLoad and SessionAffinity, built from PickingSettings as
    the router builds it, with a real PrefixIndex (recorded at pick) and LoadTracker (a lease taken
    at pick, released at the last token). By default every conversation sends its session id
    (--session-share: the fraction that does; the ring sends the others to a random replica).
"""

from __future__ import annotations

import argparse
import bisect
import functools
import hashlib
import heapq
import itertools
import json
import math
import random
import statistics
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extproc.policy.config import PickingSettings
from extproc.replicas.kvindex import Mode
from extproc.replicas.load import Lease, LoadTracker
from extproc.replicas.peerload import PeerLoad
from extproc.replicas.picking import Picker, PickRequest, build_picker, canonical, weights
from extproc.replicas.prefix import PrefixIndex, block_hashes
from extproc.request import Message, render

MODEL = "llama-3.1-8b-instruct"
CHARS_PER_TOKEN = 4
KV_BLOCK_CHARS = 256  # the replicas' block (Replica.kv_block_chars)
DECODE_BLOCK_TOKENS = 16  # vLLM's default block size: a KV event per this many answer tokens
SAMPLE_EVERY = 0.25  # seconds between load samples


@dataclass(frozen=True, slots=True)
class Workload:
    seed: int = 1
    duration: float = 2700.0  # simulated seconds of arrivals
    warmup: float = 900.0  # seconds: requests arriving earlier warm the caches and are not counted
    rate_per_replica: float = 3.5  # requests/s
    users_per_replica: int = 300
    zipf: float = 0.9
    turn_gap: float = 15.0  # s: a conversation's next turn comes at least this long after its last
    idle_limit: float = 300.0  # s: a conversation left this long is over; the user starts another
    system_prompts: int = 4
    system_chars: tuple[int, int] = (1000, 2000)
    turns: tuple[int, int] = (2, 20)
    user_chars: tuple[int, int] = (100, 600)
    answer_chars: tuple[int, int] = (300, 1200)
    session_share: float = 1.0  # of conversations whose requests carry their session id


@dataclass(frozen=True, slots=True)
class Replica:
    engine: str = "steps"  # "steps" | "simple"
    kv_blocks: int = 6000
    kv_block_chars: int = 256
    max_running: int = 64
    prefill_s_per_token: float = 0.1e-3
    # "steps" engine
    step_s: float = 8e-3
    kv_read_s_per_token: float = 6.5e-8
    step_tokens: int = 2048
    # "simple" engine
    decode_s_per_token: float = 15e-3


# --- the trace ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Turn:
    arrival: float
    conversation: str
    session: str | None  # the session id the request carries (x-session-id), if any
    messages: tuple[Message, ...]  # system, then user/assistant alternating, ending with user
    answer: Message


@functools.lru_cache(maxsize=4)
def trace(w: Workload, n_replicas: int) -> tuple[Turn, ...]:
    """The requests in arrival order: the same for every policy at a given seed and size."""
    rng = random.Random(f"{w.seed}/trace/{n_replicas}")
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(3000)]
    corpus = " ".join(rng.choices(vocab, k=500_000))

    def text(size: tuple[int, int]) -> str:
        n = rng.randint(*size)
        start = rng.randrange(len(corpus) - n)
        return corpus[start : start + n]

    systems = [Message("system", text(w.system_chars)) for _ in range(w.system_prompts)]
    n_users = w.users_per_replica * n_replicas
    cum_weights = list(itertools.accumulate(1.0 / (k + 1) ** w.zipf for k in range(n_users)))
    users = range(n_users)
    rate = w.rate_per_replica * n_replicas
    # Per user, open conversations, least recently continued first:
    # [conversation id, history, turns left, last sent, sends its session id]
    open_conversations: dict[int, deque[list]] = {}
    started = [0] * n_users
    out = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= w.duration:
            break
        user = rng.choices(users, cum_weights=cum_weights)[0]
        queue = open_conversations.setdefault(user, deque())
        while queue and queue[0][3] <= t - w.idle_limit:
            queue.popleft()
        if queue and queue[0][3] <= t - w.turn_gap:
            conv = queue.popleft()
        else:  # every open conversation is still waiting for its answer: start another
            started[user] += 1
            conv = [f"u{user}-c{started[user]}", [rng.choice(systems)], rng.randint(*w.turns), t, True]
            if w.session_share < 1.0:  # (only then, so the default trace does not depend on it)
                conv[4] = rng.random() < w.session_share
        conversation, history = conv[0], conv[1]
        history.append(Message("user", text(w.user_chars)))
        answer = Message("assistant", text(w.answer_chars))
        out.append(Turn(t, conversation, conversation if conv[4] else None, tuple(history), answer))
        history.append(answer)
        conv[2] -= 1
        conv[3] = t
        if conv[2] > 0:
            queue.append(conv)
    return tuple(out)


@dataclass(slots=True, eq=False)
class Request:
    id: int
    turn: Turn
    text: str  # the rendered prompt
    out_tokens: int
    replica: int = -1
    router: int = 0
    blocks: int = 0  # complete KV blocks in the prompt
    matched: int = 0  # of them, reused from the replica's cache
    prefill_left: int = 0  # tokens
    tail: int | None = None  # the last complete block of its prompt (its decode blocks' chain starts there)
    prefill_total: int = 0  # tokens
    kv: list[int] = field(default_factory=list)  # its prompt's blocks while their KV events are still due
    emitted: int = 0  # of them, published
    ttft: float = math.nan
    finished: float = math.nan
    done: bool = False


# --- policies -------------------------------------------------------------------------------------


class Policy:
    name = ""

    def pick(self, request: Request, inflight: Sequence[int]) -> int:
        raise NotImplementedError

    def done(self, request: Request) -> None:
        pass

    def open_leases(self) -> int:
        return 0

    def stored(self, replica: int, parent: int | None, keys: list[int]) -> None:
        """A replica stored a run of blocks (a KV event): parent key or None, the run's keys."""

    wants_events = False  # whether stored() is worth calling (the simulation skips it otherwise)

    now = 0.0  # the simulation's clock, set before every event


class RoundRobin(Policy):
    name = "round-robin"

    def __init__(self, n: int) -> None:
        self._next = itertools.cycle(range(n))

    def pick(self, request: Request, inflight: Sequence[int]) -> int:
        return next(self._next)


class Uniform(Policy):
    name = "random"

    def __init__(self, n: int, seed: int) -> None:
        self.n, self._rng = n, random.Random(f"{seed}/random")

    def pick(self, request: Request, inflight: Sequence[int]) -> int:
        return self._rng.randrange(self.n)


class LeastLoaded(Policy):
    name = "least-loaded"

    def __init__(self, n: int) -> None:
        self.n, self._turn = n, 0

    def pick(self, request: Request, inflight: Sequence[int]) -> int:
        self._turn += 1
        return min(range(self.n), key=lambda i: (inflight[i], (i - self._turn) % self.n))


class Ring(Policy):
    """Consistent hashing of the session id with no load bound, as a plain ring-hash balancer does.
    A request without a session id gets a random replica, as Envoy's ring hash does with no hash."""

    name = "ring (session)"

    def __init__(self, n: int, seed: int, vnodes: int = 100) -> None:
        points = sorted((_h64(f"replica-{r}#{v}"), r) for r in range(n) for v in range(vnodes))
        self._keys = [k for k, _ in points]
        self._owners = [r for _, r in points]
        self._rng = random.Random(f"{seed}/ring")

    def pick(self, request: Request, inflight: Sequence[int]) -> int:
        key = _h64(request.turn.session) if request.turn.session else self._rng.getrandbits(64)
        return self._owners[bisect.bisect(self._keys, key) % len(self._keys)]


def _h64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "big")


@dataclass(slots=True)
class _RouterInstance:
    tracker: LoadTracker
    index: PrefixIndex
    picker: Picker
    peers: PeerLoad


class Ours(Policy):
    """The package's Picker, built from PickingSettings as the router builds it. With routers > 1,
    each request reaches one of several independent router instances (one beside each Envoy), each
    with its own prefix index and in-flight counts.

    With ``events``, every router also knows what each replica's KV cache really holds, as its KV
    events tell it (PickRequest.held, scored by KvCacheAffinity, followed by the sticky and leader
    filters): the simulation hands the picker the replicas' own block sets, ``event_lag`` seconds
    old (0: as of the pick; the router applies events within milliseconds, see RESULTS)."""

    name = "ours"

    def __init__(
        self, n: int, settings: PickingSettings, routers: int = 1, seed: int = 1, events: bool = False
    ) -> None:
        self.settings = settings
        self.endpoints = tuple(f"10.0.0.{i + 1}:8000" for i in range(n))
        self.slot = {e: i for i, e in enumerate(self.endpoints)}
        self.routers = [self._router(settings) for _ in range(routers)]
        self._rng = random.Random(f"{seed}/routers")
        self.leases: dict[int, Lease] = {}
        self.events = events
        self.peer_load = events and settings.peer_load
        self.wants_events = self.peer_load
        for router in self.routers:
            router.tracker.peers = router.peers if self.peer_load else None
        self.caches: Sequence[OrderedDict[int, None]] = ()  # the replicas' KV caches (set by the simulation)
        if events:
            self.name = "ours + events"
        if routers > 1:
            self.name += f", {routers} routers"

    def _router(self, p: PickingSettings) -> _RouterInstance:
        clock = self._clock
        tracker, index = LoadTracker(clock=clock), PrefixIndex(p.index_blocks)
        return _RouterInstance(tracker, index, build_picker(p, tracker, index), PeerLoad(tracker, clock=clock))

    def _clock(self) -> float:
        return self.now

    def pick(self, request: Request, inflight: Sequence[int]) -> int:
        request.router = self._rng.randrange(len(self.routers)) if len(self.routers) > 1 else 0
        router = self.routers[request.router]
        # As Router._pick: hash the rendered conversation, pick, record the blocks, take a lease.
        blocks = block_hashes(MODEL, request.text, self.settings.block_chars)
        held = None
        if self.events and blocks:
            # The replica's own blocks are keyed like ours (same chain hash, block size and text):
            # an exact answer to "how much of this prompt does it hold", as its events tell.
            kv_blocks = block_hashes(MODEL, request.text, KV_BLOCK_CHARS)
            n = len(kv_blocks) or 1
            matched = [_matched(cache, kv_blocks) for cache in self.caches]
            held = {e: (matched[i] / n, Mode.EXACT) for i, e in enumerate(self.endpoints)}
        pick = router.picker.pick(PickRequest(MODEL, blocks, request.turn.session, held=held), self.endpoints)
        primary = pick.endpoints[0]  # type: ignore[union-attr]
        if self.peer_load and held is not None:
            router.peers.expect(primary, kv_blocks, matched[self.slot[primary]])
        router.index.record(primary, blocks)
        self.leases[request.id] = router.tracker.acquire(primary, MODEL)
        return self.slot[primary]

    def done(self, request: Request) -> None:
        self.routers[request.router].tracker.release(self.leases.pop(request.id))

    def open_leases(self) -> int:
        return sum(r.tracker.open_leases + sum(r.tracker.inflight.values()) for r in self.routers)

    def stored(self, replica: int, parent: int | None, keys: list[int]) -> None:
        if self.peer_load:  # every router subscribes to every replica's events
            endpoint = self.endpoints[replica]
            for router in self.routers:
                router.peers.stored(endpoint, parent, keys)


# --- the replicas ---------------------------------------------------------------------------------


@dataclass(slots=True)
class ReplicaState:
    kv: OrderedDict[int, None] = field(default_factory=OrderedDict)
    waiting: deque[Request] = field(default_factory=deque)  # for admission
    running: int = 0
    prefilling: deque[Request] = field(default_factory=deque)  # admitted, prompt not yet computed
    busy: bool = False  # a step (or, in "simple", a prefill) is in progress
    # "steps" engine
    decoding: list[tuple[int, int, Request]] = field(default_factory=list)  # heap of (last step, id, request)
    context: int = 0  # context tokens of the decoding requests
    step: int = 0
    plan: list[tuple[Request, int]] = field(default_factory=list)  # prefill tokens in the current step
    decode_blocks: list[tuple[int, int, int | None, int]] = field(default_factory=list)  # (step, _, parent, key)


def _touch(kv: OrderedDict[int, None], blocks: list[int], capacity: int) -> None:
    # Tail first, so the head of a chain is the most recent and the tail is evicted first.
    for h in reversed(blocks):
        if h in kv:
            kv.move_to_end(h)
        else:
            kv[h] = None
    while len(kv) > capacity:
        kv.popitem(last=False)


def _matched(kv: OrderedDict[int, None], blocks: list[int]) -> int:
    n = 0
    for h in blocks:
        if h not in kv:
            break
        n += 1
    return n


@dataclass(slots=True)
class Result:
    policy: str
    replicas: int
    counted: int  # requests after warm-up
    completed: int  # all requests, warm-up included
    total: int
    hit_rate: float
    ttft_p50: float
    ttft_p99: float
    tpot_p99: float  # time per output token after the first, per request
    max_mean: float
    max_mean_p95: float
    inflight_left: int  # the simulation's own count after the last event
    leases_left: int  # our LoadTracker(s): open leases + in-flight counts after the last event
    seconds: float  # wall time of the run
    misses: dict[str, int] | None = None  # prompt blocks by where they were lost (profile)


ARRIVE, STEP, PREFILLED, FINISHED, SAMPLE = range(5)


class Simulation:
    def __init__(self, policy: Policy, n: int, workload: Workload, replica: Replica) -> None:
        if replica.engine not in ("steps", "simple"):
            raise ValueError(f"engine must be 'steps' or 'simple', not {replica.engine!r}")
        self.policy, self.n, self.w, self.r = policy, n, workload, replica
        self.reps = [ReplicaState() for _ in range(n)]
        if isinstance(policy, Ours):
            policy.caches = [rep.kv for rep in self.reps]
        self.inflight = [0] * n
        self.events: list[tuple[float, int, int, object]] = []
        self._seq = itertools.count()
        # Where the prompt blocks that missed were lost (profile=True): see MISSES.
        self.misses: dict[str, int] | None = None
        self._last: dict[str, int] = {}  # conversation -> replica of its previous turn
        self._stored: set[int] = set()  # every block any replica ever stored

    def push(self, t: float, kind: int, obj: object) -> None:
        heapq.heappush(self.events, (t, next(self._seq), kind, obj))

    def run(self) -> Result:
        started = time.perf_counter()
        turns = trace(self.w, self.n)
        requests = [
            Request(i, t, render(t.messages), max(1, round(len(t.answer.text) / CHARS_PER_TOKEN)))
            for i, t in enumerate(turns)
        ]
        for req in requests:
            self.push(req.turn.arrival, ARRIVE, req)
        first_counted = bisect.bisect_left([req.turn.arrival for req in requests], self.w.warmup)
        self.push(self.w.warmup, SAMPLE, None)
        last_arrival = requests[-1].turn.arrival
        ratios: list[float] = []
        steps = self.r.engine == "steps"
        while self.events:
            now, _, kind, obj = heapq.heappop(self.events)
            self.policy.now = now
            if kind == ARRIVE:
                req: Request = obj  # type: ignore[assignment]
                i = req.replica = self.policy.pick(req, self.inflight)
                self.inflight[i] += 1
                self.reps[i].waiting.append(req)
                self._start_step(i, now) if steps else self._start_prefill(i, now)
            elif kind == STEP:
                self._end_step(obj, now)  # type: ignore[arg-type]
            elif kind == PREFILLED:
                req = obj  # type: ignore[assignment]
                self.reps[req.replica].busy = False
                self.push(now + req.out_tokens * self.r.decode_s_per_token, FINISHED, req)
                self._start_prefill(req.replica, now)
            elif kind == FINISHED:
                req = obj  # type: ignore[assignment]
                self._finish(req, now)
                self._start_prefill(req.replica, now)
            else:  # SAMPLE
                mean = sum(self.inflight) / self.n
                if mean > 0:
                    ratios.append(max(self.inflight) / mean)
                if now + SAMPLE_EVERY <= last_arrival:
                    self.push(now + SAMPLE_EVERY, SAMPLE, None)

        counted = requests[first_counted:]
        ttfts = sorted(req.ttft for req in counted)
        return Result(
            policy=self.policy.name,
            replicas=self.n,
            counted=len(counted),
            completed=sum(req.done for req in requests),
            total=len(requests),
            hit_rate=sum(req.matched for req in counted) / max(1, sum(req.blocks for req in counted)),
            ttft_p50=_quantile(ttfts, 0.50),
            ttft_p99=_quantile(ttfts, 0.99),
            tpot_p99=_quantile(
                sorted(
                    (req.finished - req.turn.arrival - req.ttft) / (req.out_tokens - 1)
                    for req in counted
                    if req.out_tokens > 1
                ),
                0.99,
            ),
            max_mean=statistics.fmean(ratios) if ratios else 1.0,
            max_mean_p95=_quantile(sorted(ratios), 0.95) if ratios else 1.0,
            inflight_left=sum(self.inflight),
            leases_left=self.policy.open_leases(),
            seconds=time.perf_counter() - started,
        )

    # --- shared ---

    def _admit(self, i: int) -> None:
        """Move waiting requests into the running set, reusing what the KV cache holds."""
        rep, r = self.reps[i], self.r
        while rep.waiting and rep.running < r.max_running:
            req = rep.waiting.popleft()
            rep.running += 1
            blocks = block_hashes(MODEL, req.text, r.kv_block_chars)
            req.blocks = len(blocks)
            req.matched = m = _matched(rep.kv, blocks)
            if self.misses is not None:
                self._profile(req, i, blocks, m)
            if r.engine == "steps":  # the prompt's runs go out as its chunks are scheduled
                if self.policy.wants_events and m < len(blocks):
                    req.kv, req.emitted = blocks, m
            elif m < len(blocks):  # vLLM publishes the blocks it stores as it schedules the prefill
                self.policy.stored(i, blocks[m - 1] if m else None, blocks[m:])
            elif blocks:  # held whole: its first stored block is the answer's first one
                answered = block_hashes(MODEL, req.text + render((req.turn.answer,)), r.kv_block_chars)
                if len(answered) > m:
                    self.policy.stored(i, blocks[-1], answered[m : m + 1])
            req.tail = blocks[-1] if blocks else None
            _touch(rep.kv, blocks, r.kv_blocks)
            uncached_chars = len(req.text) - req.matched * r.kv_block_chars
            req.prefill_left = req.prefill_total = max(1, math.ceil(uncached_chars / CHARS_PER_TOKEN))
            rep.prefilling.append(req)

    def _profile(self, req: Request, i: int, blocks: list[int], matched: int) -> None:
        conversation = req.turn.conversation
        previous = self._last.get(conversation)
        self._last[conversation] = i
        if req.turn.arrival >= self.w.warmup:
            seen = _matched_set(self._stored, blocks)  # beyond it: never computed anywhere
            misses = self.misses
            assert misses is not None
            misses["blocks"] += len(blocks)
            misses["hit"] += matched
            misses["new text"] += len(blocks) - max(seen, matched)
            lost = max(0, seen - matched)
            if lost:
                if previous is None:
                    kind = "first turn"
                elif previous == i:
                    kind = "stayed, evicted"
                elif _matched(self.reps[previous].kv, blocks) > matched:
                    kind = "moved from a replica holding more"
                else:
                    kind = "moved, previous replica had evicted it too"
                misses[kind] += lost
        self._stored.update(blocks)

    def _finish(self, req: Request, now: float) -> None:
        i = req.replica
        rep = self.reps[i]
        rep.running -= 1
        req.finished = now
        # vLLM keeps the generated tokens' KV as well: the next turn's prompt starts with them.
        answered = block_hashes(MODEL, req.text + render((req.turn.answer,)), self.r.kv_block_chars)
        _touch(rep.kv, answered, self.r.kv_blocks)
        if self.misses is not None:
            self._stored.update(answered)
        self.inflight[i] -= 1
        req.done = True
        self.policy.done(req)

    # --- "simple": one FIFO prefill lane, fixed decode time ---

    def _start_prefill(self, i: int, now: float) -> None:
        rep = self.reps[i]
        self._admit(i)
        if rep.busy or not rep.prefilling:
            return
        req = rep.prefilling.popleft()
        end = now + req.prefill_left * self.r.prefill_s_per_token
        req.ttft = end - req.turn.arrival
        rep.busy = True
        self.push(end, PREFILLED, req)

    # --- "steps": continuous batching with chunked prefill ---

    def _start_step(self, i: int, now: float) -> None:
        rep, r = self.reps[i], self.r
        if rep.busy:
            return
        self._admit(i)
        budget = max(0, r.step_tokens - len(rep.decoding))
        plan, tokens = rep.plan, 0
        plan.clear()
        for req in rep.prefilling:
            if budget == 0:
                break
            chunk = min(req.prefill_left, budget)
            plan.append((req, chunk))
            budget -= chunk
            tokens += chunk
            if req.kv:  # vLLM stores (and publishes) the blocks a chunk completes when it schedules it
                self._chunk_stored(i, req, chunk)
        if not plan and not rep.decoding:
            return  # idle until the next arrival
        rep.busy = True
        duration = r.step_s + r.kv_read_s_per_token * rep.context + r.prefill_s_per_token * tokens
        self.push(now + duration, STEP, i)

    def _end_step(self, i: int, now: float) -> None:
        rep = self.reps[i]
        rep.busy = False
        rep.step += 1
        while rep.decoding and rep.decoding[0][0] <= rep.step:
            _, _, req = heapq.heappop(rep.decoding)
            rep.context -= _context(req)
            self._finish(req, now)
        for req, chunk in rep.plan:
            req.prefill_left -= chunk
            if req.prefill_left == 0:
                rep.prefilling.popleft()  # chunks go first come first served, so it is the head
                req.ttft = now - req.turn.arrival  # this step also sampled its first token
                if req.out_tokens == 1:
                    self._finish(req, now)
                else:
                    heapq.heappush(rep.decoding, (rep.step + req.out_tokens - 1, req.id, req))
                    rep.context += _context(req)
                    if self.policy.wants_events:
                        self._decode_blocks(rep, req)
        while rep.decode_blocks and rep.decode_blocks[0][0] <= rep.step:
            _, _, parent, key = heapq.heappop(rep.decode_blocks)
            self.policy.stored(i, parent, [key])
        self._start_step(i, now)

    def _chunk_stored(self, i: int, req: Request, chunk: int) -> None:
        blocks, start = req.kv, req.emitted
        if chunk >= req.prefill_left:
            end = len(blocks)
        else:
            done = req.prefill_total - req.prefill_left + chunk  # uncached tokens computed after this chunk
            end = min(len(blocks), req.matched + done * CHARS_PER_TOKEN // self.r.kv_block_chars)
        if end > start:
            self.policy.stored(i, blocks[start - 1] if start else None, blocks[start:end])
            req.emitted = end
        if end == len(blocks):
            req.kv = []

    def _decode_blocks(self, rep: ReplicaState, req: Request) -> None:
        """The KV events of the blocks the request's answer fills as it decodes: vLLM stores one
        every DECODE_BLOCK_TOKENS tokens (its block size), each continuing the request's chain.
        This step sampled its first token; token k comes k - 1 steps later. (Only the events are
        modelled: the replica's cache takes the answer's blocks at completion, as before.)"""
        tokens = len(req.text) // CHARS_PER_TOKEN
        first = DECODE_BLOCK_TOKENS - tokens % DECODE_BLOCK_TOKENS  # answer tokens that fill the first
        parent = req.tail
        for j, filled in enumerate(range(first, req.out_tokens + 1, DECODE_BLOCK_TOKENS)):
            key = hash((req.id, "decode", j))
            heapq.heappush(rep.decode_blocks, (rep.step + filled - 1, key, parent, key))
            parent = key


def _context(req: Request) -> int:
    """Mean context of a decoding request: its prompt and half its answer."""
    return len(req.text) // CHARS_PER_TOKEN + req.out_tokens // 2


MISSES = ("new text", "first turn", "stayed, evicted", "moved from a replica holding more",
          "moved, previous replica had evicted it too")  # fmt: skip


def simulate(policy: Policy, n: int, workload: Workload, replica: Replica, profile: bool = False) -> Result:
    simulation = Simulation(policy, n, workload, replica)
    if profile:
        simulation.misses = dict.fromkeys(("blocks", "hit", *MISSES), 0)
    result = simulation.run()
    result.misses = simulation.misses
    return result


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def policies(n: int, workload: Workload, settings: PickingSettings) -> list[Policy]:
    return [
        RoundRobin(n),
        Uniform(n, workload.seed),
        LeastLoaded(n),
        Ring(n, workload.seed),
        Ours(n, settings, seed=workload.seed),
    ]


# --- what any placement could reach: bounds on the hit rate ---------------------------------------


def bounds(workload: Workload, n: int, replica: Replica) -> dict[str, float]:
    """Hit rates no placement over these replicas' caches can beat (or, LRU, can beat with LRU
    caches), on the same trace and counted window as the simulation:

    infinite   every block ever stored stays cached: only blocks never computed before miss
               (each turn's new user message; a conversation's first turn's own text).
    pooled LRU one LRU cache of all replicas' blocks together (n x kv_blocks) with each block
               stored once: a perfect placement that never duplicates a history, LRU eviction.
    Belady     the same pooled capacity with Belady's MIN (evict the block needed furthest in
               the future; never store one that will not be needed before every cached one):
               an upper bound for any placement and any eviction policy, since the union of the
               replicas' caches is itself a cache of at most that many blocks.

    Answers are stored at the request's arrival, not its completion (a few seconds earlier: it
    can only help the bound). Requests are in arrival order; timing does not enter."""
    turns = trace(workload, n)
    bc = replica.kv_block_chars
    prompts, answers = [], []
    for t in turns:
        text = render(t.messages)
        prompts.append(block_hashes(MODEL, text, bc))
        answers.append(block_hashes(MODEL, text + render((t.answer,)), bc))
    first_counted = bisect.bisect_left([t.arrival for t in turns], workload.warmup)
    # Next use of a block after request k (a later prompt that contains it), walking backwards.
    inf = len(turns) + 1
    next_after: dict[int, int] = {}
    prompt_next: list[list[int]] = [[] for _ in turns]
    answer_next: list[list[int]] = [[] for _ in turns]
    for k in range(len(turns) - 1, -1, -1):
        answer_next[k] = [next_after.get(h, inf) for h in answers[k]]
        prompt_next[k] = [next_after.get(h, inf) for h in prompts[k]]
        for h in prompts[k]:
            next_after[h] = k
    capacity = n * replica.kv_blocks
    seen: set[int] = set()
    lru: OrderedDict[int, None] = OrderedDict()
    belady: dict[int, int] = {}
    heap: list[tuple[int, int]] = []  # (-next use, key), lazy
    hits = {"infinite": 0, "pooled LRU": 0, "Belady": 0}
    total = 0

    def belady_store(h: int, nxt: int) -> None:
        if h in belady:
            belady[h] = nxt
            heapq.heappush(heap, (-nxt, h))
            return
        if nxt >= inf:
            return
        while len(belady) >= capacity:
            far, key = heap[0]
            if belady.get(key) != -far:
                heapq.heappop(heap)  # stale
                continue
            if -far <= nxt:
                return  # every cached block is needed sooner: do not store this one
            heapq.heappop(heap)
            del belady[key]
        belady[h] = nxt
        heapq.heappush(heap, (-nxt, h))

    for k in range(len(turns)):
        blocks = prompts[k]
        counted = k >= first_counted
        if counted:
            total += len(blocks)
            hits["infinite"] += _matched_set(seen, blocks)
            hits["pooled LRU"] += _matched(lru, blocks)
            hits["Belady"] += _matched_set(belady, blocks)
        for h, nxt in zip(blocks, prompt_next[k], strict=True):
            belady_store(h, nxt)
        for h, nxt in zip(answers[k], answer_next[k], strict=True):
            belady_store(h, nxt)
        seen.update(answers[k])
        _touch(lru, blocks, capacity)
        _touch(lru, answers[k], capacity)
    return {name: v / max(1, total) for name, v in hits.items()}


def _matched_set(keys: set[int] | dict[int, int], blocks: list[int]) -> int:
    n = 0
    for h in blocks:
        if h not in keys:
            break
        n += 1
    return n


# --- output ---------------------------------------------------------------------------------------

HEADER = f"{'policy':<34} {'hit rate':>8} {'TTFT p50':>9} {'TTFT p99':>9} {'max/mean':>8} {'(p95)':>6} {'TPOT p99':>9}"


def row(r: Result, label: str | None = None) -> str:
    return (
        f"{label or r.policy:<34} {r.hit_rate:>8.1%} {_ms(r.ttft_p50):>9} {_ms(r.ttft_p99):>9} "
        f"{r.max_mean:>8.2f} {r.max_mean_p95:>6.2f} {r.tpot_p99 * 1e3:>6.1f} ms"
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def targets(results: Sequence[Result]) -> list[str]:
    by = {r.policy: r for r in results}
    ours, rr = by["ours"], by["round-robin"]
    best = min((r for r in results if r.policy != "ours"), key=lambda r: r.ttft_p99)

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    return [
        f"  hit rate >= 2x round-robin's: {ours.hit_rate:.1%} vs 2 x {rr.hit_rate:.1%} = {2 * rr.hit_rate:.1%}: "
        f"{verdict(ours.hit_rate >= 2 * rr.hit_rate)}",
        f"  p99 TTFT below every baseline's: {_ms(ours.ttft_p99)} vs the best baseline, {best.policy}, "
        f"{_ms(best.ttft_p99)}: {verdict(ours.ttft_p99 < best.ttft_p99)}",
        f"  max/mean in flight <= 1.3: {ours.max_mean:.2f}: {verdict(ours.max_mean <= 1.3)}",
    ]


def table(title: str, rows: Sequence[tuple[str | None, Result]]) -> None:
    print(f"\n## {title}\n")
    print(HEADER)
    for label, result in rows:
        print(row(result, label))


def sweep_picker(workload: Workload, replica: Replica, base: PickingSettings, n: int = 8) -> None:
    """Our picker's parameters, one change at a time from the defaults (and a few pairs)."""
    variants: list[tuple[str, PickingSettings, Workload, int]] = [("defaults", base, workload, 1)]
    for eps in (0.1, 0.2, 0.5, 1.0):
        variants.append((f"load_bound {eps}", replace(base, load_bound=eps), workload, 1))
    for b in (64, 128, 512):
        variants.append((f"block_chars {b}", replace(base, block_chars=b), workload, 1))
    variants.append((f"index_blocks {replica.kv_blocks}", replace(base, index_blocks=replica.kv_blocks), workload, 1))
    for w in (0.0, 1.0, 2.0):
        variants.append((f"session weight {w:g}", _weighted(base, session=w), workload, 1))
    variants += [
        ("no session ids", base, replace(workload, session_share=0.0), 1),
        ("prefix weight 6", _weighted(base, prefix=6.0), workload, 1),
        ("load weight 0", _weighted(base, load=0.0), workload, 1),
        ("load weight 4", _weighted(base, load=4.0), workload, 1),
        ("session 0, bound 0.2", replace(_weighted(base, session=0.0), load_bound=0.2), workload, 1),
        ("session 0, bound 0.5", replace(_weighted(base, session=0.0), load_bound=0.5), workload, 1),
        ("3 routers", base, workload, 3),
        ("3 routers, session 1", _weighted(base, session=1.0), workload, 3),
        ("3 routers, session 0", _weighted(base, session=0.0), workload, 3),
    ]
    # The cost-aware stickiness the defaults now use, against what came before it, and the leader
    # scorer (opt-in: it helps one router and hurts several).
    previous = replace(base, load_bound=0.25, sticky_load_bound=None, sticky_move_blocks=None)
    variants += [
        ("sticky_move_blocks 8", replace(base, sticky_move_blocks=8), workload, 1),
        ("sticky_move_blocks 16", replace(base, sticky_move_blocks=16), workload, 1),
        ("sticky_load_bound 0.5", replace(base, sticky_load_bound=0.5), workload, 1),
        ("leader 5", _weighted(base, prefix_leader=5.0), workload, 1),
        (
            f"leader 5, index {replica.kv_blocks}",
            replace(_weighted(base, prefix_leader=5.0), index_blocks=replica.kv_blocks),
            workload,
            1,
        ),
        ("previous defaults", previous, workload, 1),
        ("3 routers, leader 5", _weighted(base, prefix_leader=5.0), workload, 3),
        ("3 routers, previous", previous, workload, 3),
    ]
    print(f"\n## our picker at {n} replicas, one change at a time from the defaults\n")
    print(HEADER)
    for reference in (RoundRobin(n), Ring(n, workload.seed)):  # the same runs' baselines, for scale
        print(row(simulate(reference, n, workload, replica), f"({reference.name})"), flush=True)
    for label, settings, w, routers in variants:
        policy = Ours(n, settings, routers=routers, seed=w.seed)
        print(row(simulate(policy, n, w, replica), label), flush=True)


def sweep_rate(workload: Workload, replica: Replica, settings: PickingSettings, n: int = 8) -> None:
    for rate in (2.5, 5.0):
        w = replace(workload, rate_per_replica=rate)
        table(
            f"{n} replicas at {rate:g} requests/s per replica",
            [(None, simulate(p, n, w, replica)) for p in policies(n, w, settings)],
        )


def sweep_routers(
    workload: Workload, replica: Replica, settings: PickingSettings, n: int = 8, rates: Sequence[float] = ()
) -> list[Result]:
    """Several independent routers, with and without the replicas' KV events, beside the router's
    own index and the session ring, in the same runs (issue 19)."""
    out = []
    for rate in rates or (workload.rate_per_replica, 2 * workload.rate_per_replica):
        w = replace(workload, rate_per_replica=rate)
        rows: list[tuple[str | None, Result]] = []
        for policy in (
            RoundRobin(n),
            Ring(n, w.seed),
            Ours(n, settings, seed=w.seed),
            Ours(n, settings, routers=3, seed=w.seed),
            Ours(n, settings, seed=w.seed, events=True),
            Ours(n, settings, routers=3, seed=w.seed, events=True),
        ):
            result = simulate(policy, n, w, replica, profile=not isinstance(policy, RoundRobin))
            rows.append((None, result))
            out.append(result)
        no_peers = Ours(n, replace(settings, peer_load=False), routers=3, seed=w.seed, events=True)
        rows.append((f"{no_peers.name}, peer_load off", simulate(no_peers, n, w, replica)))
        for label, variant in (("sticky_move_blocks 8", replace(settings, sticky_move_blocks=8)),):
            for routers in (1, 3):
                policy = Ours(n, variant, routers=routers, seed=w.seed, events=True)
                result = simulate(policy, n, w, replica)
                rows.append((f"{policy.name}, {label}", result))
        table(f"{n} replicas at {rate:g} requests/s per replica: routers, with and without KV events", rows)
        ceiling = bounds(w, n, replica)
        print(
            f"\nbounds on the hit rate at {rate:g}/s (same trace; see bounds()): "
            + ", ".join(f"{name} {value:.1%}" for name, value in ceiling.items())
        )
        profile_misses([r for label, r in rows if label is None and r.misses is not None])
        by = {r.policy: r for label, r in rows if label is None}
        ring, one, three = by["ring (session)"], by["ours + events"], by["ours + events, 3 routers"]
        print(f"\ntargets with events at {rate:g}/s (one router; three):")
        for label, r in (("one router", one), ("three routers", three)):
            print(
                f"  {label}: hit rate {r.hit_rate:.1%} >= 85%: {_verdict(r.hit_rate >= 0.85)}; p99 {_ms(r.ttft_p99)} "
                f"below the ring's {_ms(ring.ttft_p99)}: {_verdict(r.ttft_p99 < ring.ttft_p99)}; max/mean "
                f"{r.max_mean:.2f} <= 1.3: {_verdict(r.max_mean <= 1.3)}"
            )
        print(
            f"  three routers keep one router's figures: hit rate {three.hit_rate:.1%} vs {one.hit_rate:.1%}, "
            f"p99 {_ms(three.ttft_p99)} vs {_ms(one.ttft_p99)}; without events {by['ours, 3 routers'].hit_rate:.1%} "
            f"vs {by['ours'].hit_rate:.1%}"
        )
    return out


def profile_misses(results: Sequence[Result]) -> None:
    """Where each policy's missed prompt blocks were lost (Simulation._profile)."""
    print(
        f"\nmissed prompt blocks, as a share of all (counted requests):\n{'':<46}"
        + "".join(f"{r.policy[:22]:>24}" for r in results)
    )
    for kind in MISSES:
        print(
            f"  {kind:<44}"
            + "".join(
                f"{(r.misses or {}).get(kind, 0) / max(1, (r.misses or {}).get('blocks', 1)):>24.1%}" for r in results
            )
        )


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _weighted(settings: PickingSettings, **changed: float) -> PickingSettings:
    """The settings with these scorers' weights (by scorer type name) changed."""
    return replace(settings, weights={**settings.weights, **changed})


def _settings(pairs: Sequence[str]) -> PickingSettings:
    """PickingSettings from FIELD=VALUE pairs; weights.SCORER=VALUE sets a scorer's weight."""
    fields: dict[str, object] = {}
    scorer_weights: dict[str, float] = {}
    for kv in pairs:
        field_name, _, value = kv.partition("=")
        if field_name.startswith("weights."):
            try:
                scorer_weights[canonical(field_name.removeprefix("weights."))] = json.loads(value)
            except KeyError as exc:
                raise SystemExit(f"--picking: {exc.args[0]}") from None
            continue
        if field_name not in PickingSettings.__dataclass_fields__ or field_name == "weights":
            raise SystemExit(
                f"--picking: no setting {field_name!r}; one of weights.<scorer>, "
                + ", ".join(f for f in PickingSettings.__dataclass_fields__ if f != "weights")
            )
        fields[field_name] = json.loads(value)
    return PickingSettings(weights=scorer_weights, **fields)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="120 s runs (40 s warm-up) and no sweeps, for CI")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--duration", type=float, help="simulated seconds of arrivals (default 2,700; quick 120)")
    parser.add_argument("--warmup", type=float, help="seconds not counted (default 900; quick 40)")
    parser.add_argument("--replicas", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--rate", type=float, default=Workload().rate_per_replica, help="requests/s per replica")
    parser.add_argument(
        "--turn-gap", type=float, default=Workload().turn_gap, help="seconds between a conversation's turns, at least"
    )
    parser.add_argument(
        "--session-share", type=float, default=1.0, help="fraction of conversations that send a session id"
    )
    parser.add_argument("--engine", choices=("steps", "simple"), default=Replica().engine)
    parser.add_argument("--kv-blocks", type=int, default=Replica().kv_blocks, help="KV cache per replica, in blocks")
    parser.add_argument("--no-sweeps", action="store_true", help="only the main tables")
    parser.add_argument(
        "--routers",
        type=float,
        nargs="*",
        metavar="RATE",
        help="only the several-routers / KV-events tables at 8 replicas, at these rates (default: --rate and 2x)",
    )
    parser.add_argument(
        "--picking",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="PickingSettings for ours, e.g. load_bound=0 sticky_load_bound=1 sticky_move_blocks=12 weights.prefix_leader=5",
    )
    args = parser.parse_args(argv)

    workload = Workload(
        seed=args.seed,
        duration=args.duration or (120.0 if args.quick else Workload().duration),
        warmup=args.warmup if args.warmup is not None else (40.0 if args.quick else Workload().warmup),
        rate_per_replica=args.rate,
        turn_gap=args.turn_gap,
        session_share=args.session_share,
    )
    replica = Replica(engine=args.engine, kv_blocks=args.kv_blocks)
    settings = _settings(args.picking)
    print(
        f"# affinity simulation: seed {workload.seed}, {workload.duration:g} s of arrivals a run "
        f"(the first {workload.warmup:g} s not counted), {workload.rate_per_replica:g} requests/s and "
        f"{workload.users_per_replica} users per replica; engine {replica.engine}, KV cache "
        f"{replica.kv_blocks} x {replica.kv_block_chars}-char blocks per replica"
    )
    print(
        "# ours: weights "
        + ", ".join(f"{name} {weight:g}" for name, weight in weights(settings).items())
        + f"; load_bound {settings.load_bound}, "
        f"sticky_load_bound {settings.sticky_load_bound}, sticky_move_blocks {settings.sticky_move_blocks}; "
        f"block_chars {settings.block_chars}; index_blocks {settings.index_blocks}"
        + "".join(f"; {kv}" for kv in args.picking)
    )
    if args.routers is not None:
        # Shorter runs (same warm-up, 900 s counted), as the sweeps.
        shorter = workload if args.quick else replace(workload, duration=workload.warmup + 900.0)
        return sweep_routers(shorter, replica, settings, rates=args.routers)
    results: list[Result] = []
    for n in args.replicas:
        batch = []
        print(f"\n## {n} replicas\n")
        print(HEADER)
        for policy in policies(n, workload, settings):
            result = simulate(policy, n, workload, replica)
            print(row(result), flush=True)
            batch.append(result)
        if n == 8:
            print("\ntargets at 8 replicas:")
            print("\n".join(targets(batch)))
        results += batch
    if not args.quick and not args.no_sweeps:
        # Shorter runs (same warm-up, 900 s counted): the sweeps are about differences, and many.
        shorter = replace(workload, duration=workload.warmup + 900.0)
        sweep_picker(shorter, replica, settings)
        sweep_rate(shorter, replica, settings)
    return results


if __name__ == "__main__":
    main()
