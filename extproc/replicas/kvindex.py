"""What each replica really holds in its KV cache, rebuilt from its own KV events.

The index is keyed by hashes of our own, computed from the token ids that every BlockStored
event carries: block k's key is ``hash((key of block k-1, tuple(its block_size tokens)))``, the
chain starting from a fixed root. Python's hash of a tuple of ints is the same in every process
(only str and bytes hashing is salted by PYTHONHASHSEED), so every router computes the same keys,
and a router hashes a prompt's token ids the same way to look them up. vLLM's own block hashes
are only mapped to our keys, to apply BlockRemoved and to find a stored chain's parent: nothing
depends on vLLM's hash algorithm or its seed (NONE_HASH is random per vLLM process unless
PYTHONHASHSEED is set). The peers do the same: NVIDIA Dynamo's router hashes the tokens of
stored blocks itself and keeps the engine's hashes only as external ids.

Blocks stored with a LoRA adapter or extra keys (images, cache salt, prompt embeddings) are
keyed from another root, so a plain prompt never matches them, as vLLM would not reuse them.

A replica is *exact* once the index has seen its history (replayed from sequence 0, or
AllBlocksCleared, or a restarted publisher) or once ``warm_seconds`` of events have passed since
subscribing (blocks cached before that and never touched since are unknown: the index can only
under-count them). Until then, or after a gap that could not be replayed (its state is dropped),
it is *approximate*: scorers fall back to the router's own guess for it.

Updates come from the subscriber thread and reads from the event loop; both take ``lock``.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from extproc.replicas.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, Event, ExternalHash

ROOT = 0x5EED_CAFE_F00D
_ADAPTER_ROOT = 0x0DD_BA11
DEFAULT_MEDIUM = "GPU"


class Mode(enum.StrEnum):
    EXACT = "exact"  # the replica's own events, complete
    APPROXIMATE = "approximate"  # no events, or not complete yet: the router's own guess


def chain(tokens: Sequence[int], block_size: int, root: int = ROOT) -> list[int]:
    """Our keys of the complete blocks of tokens (a trailing partial block is never cached)."""
    out = []
    h = root
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = hash((h, tuple(tokens[start : start + block_size])))
        out.append(h)
    return out


@dataclass(slots=True)
class _Replica:
    complete_at: float  # monotonic time from which it counts as exact (inf: not until told)
    block_size: int | None = None
    blocks: dict[tuple[str, ExternalHash], int] = field(default_factory=dict)  # (medium, vLLM hash) -> our key
    held: Counter[int] = field(default_factory=Counter)  # our key -> copies (media, adapters)
    events: int = 0
    orphans: int = 0  # stored blocks whose parent the index never saw (keyless)


class KvIndex:
    """Per-replica block sets from KV events. Process-wide: survives policy reloads."""

    def __init__(
        self,
        warm_seconds: float = 30.0,
        max_blocks: int = 2_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.warm_seconds = warm_seconds
        self.max_blocks = max_blocks
        self.lock = threading.Lock()
        self._clock = clock
        self._replicas: dict[str, _Replica] = {}
        # Told of every stored run of a live batch (endpoint, parent key or None, keys): the other
        # routers' requests, as extproc/replicas/peerload.py infers them.
        self.on_stored: Callable[[str, int | None, list[int]], None] | None = None

    # --- the subscriber's side ----------------------------------------------------------------

    def subscribe(self, endpoint: str) -> None:
        """A subscription to endpoint's events starts: nothing known yet."""
        with self.lock:
            self._replicas[endpoint] = _Replica(self._clock() + self.warm_seconds)

    def reset(self, endpoint: str, *, complete: bool) -> None:
        """Drop what is known of endpoint. complete: what follows is its whole history (a
        publisher restarted at sequence 0, or a replay from 0); else it is approximate again
        for warm_seconds."""
        with self.lock:
            self._reset(endpoint, complete)

    def _reset(self, endpoint: str, complete: bool) -> None:
        now = self._clock()
        self._replicas[endpoint] = _Replica(now if complete else now + self.warm_seconds)

    def apply(self, endpoint: str, events: Iterable[Event], live: bool = False) -> None:
        """Apply a batch; live: it was published just now (not replayed history), so its stored
        runs are requests starting (on_stored)."""
        with self.lock:
            replica = self._replicas.get(endpoint)
            if replica is None:
                return
            for event in events:
                replica.events += 1
                if isinstance(event, BlockStored):
                    run = self._stored(replica, event)
                    # (A copy to another tier, e.g. CPU offload, is not a request.)
                    gpu = (event.medium or DEFAULT_MEDIUM) == DEFAULT_MEDIUM
                    if live and gpu and run is not None and self.on_stored is not None:
                        self.on_stored(endpoint, *run)
                elif isinstance(event, BlockRemoved):
                    self._removed(replica, event)
                elif isinstance(event, AllBlocksCleared):
                    self._reset(endpoint, complete=True)
                    replica = self._replicas[endpoint]
            if len(replica.blocks) > self.max_blocks:  # lost removals: start again rather than grow
                self._reset(endpoint, complete=False)

    def _stored(self, replica: _Replica, event: BlockStored) -> tuple[int | None, list[int]] | None:
        """Index a stored run; returns its parent key (None: a chain's root) and keys."""
        medium = event.medium or DEFAULT_MEDIUM
        size = event.block_size
        replica.block_size = size
        adapter = event.lora_name or event.lora_id
        if event.parent_block_hash is None:
            h = hash((_ADAPTER_ROOT, adapter)) if adapter else ROOT
        else:
            parent = replica.blocks.get((medium, event.parent_block_hash))
            if parent is None:
                parent = replica.blocks.get((DEFAULT_MEDIUM, event.parent_block_hash))
            if parent is None:
                replica.orphans += len(event.block_hashes)
                return None
            h = parent
        first = None if event.parent_block_hash is None else h
        keys = []
        extra = event.extra_keys
        tokens = event.token_ids
        for i, external in enumerate(event.block_hashes):
            block = tokens[i * size : (i + 1) * size]
            # A block with extra keys (an image, a cache salt) differs from its plain tokens, and so
            # does every block after it.
            h = hash((h, block)) if extra is None or extra[i] is None else hash((h, block, _ADAPTER_ROOT))
            key = (medium, external)
            previous = replica.blocks.get(key)
            if previous is not None:  # stored twice without a removal: count it once
                self._drop(replica, previous)
            replica.blocks[key] = h
            replica.held[h] += 1
            keys.append(h)
        return first, keys

    def _removed(self, replica: _Replica, event: BlockRemoved) -> None:
        medium = event.medium or DEFAULT_MEDIUM
        for external in event.block_hashes:
            h = replica.blocks.pop((medium, external), None)
            if h is not None:
                self._drop(replica, h)

    @staticmethod
    def _drop(replica: _Replica, h: int) -> None:
        count = replica.held[h] - 1
        if count > 0:
            replica.held[h] = count
        else:
            del replica.held[h]

    def forget(self, keep: Iterable[str]) -> None:
        """Drop replicas no subscription follows any more."""
        keep = set(keep)
        with self.lock:
            for endpoint in [e for e in self._replicas if e not in keep]:
                del self._replicas[endpoint]

    # --- the router's side --------------------------------------------------------------------

    def mode(self, endpoint: str) -> Mode:
        replica = self._replicas.get(endpoint)
        if replica is None or self._clock() < replica.complete_at:
            return Mode.APPROXIMATE
        return Mode.EXACT

    def block_size(self, endpoint: str) -> int | None:
        replica = self._replicas.get(endpoint)
        return replica.block_size if replica is not None else None

    def matched(self, endpoint: str, keys: Sequence[int]) -> int:
        """Leading blocks of keys the replica holds (as vLLM looks them up: up to the first miss)."""
        replica = self._replicas.get(endpoint)
        if replica is None:
            return 0
        held = replica.held
        n = 0
        for h in keys:
            if h not in held:
                break
            n += 1
        return n

    def size(self, endpoint: str) -> int:
        replica = self._replicas.get(endpoint)
        return len(replica.held) if replica is not None else 0

    def replicas(self) -> list[str]:
        return list(self._replicas)


@dataclass(slots=True)
class PromptBlocks:
    """A prompt's token ids and, per block size asked for, its chain of keys (computed once)."""

    tokens: Sequence[int]
    _chains: dict[int, list[int]] = field(default_factory=dict)

    def keys(self, block_size: int) -> list[int]:
        keys = self._chains.get(block_size)
        if keys is None:
            keys = self._chains[block_size] = chain(self.tokens, block_size)
        return keys


def held_fractions(index: KvIndex, prompt: PromptBlocks, endpoints: Sequence[str]) -> dict[str, tuple[float, Mode]]:
    """Per replica, the fraction of the prompt's tokens it really holds, and whether that is
    exact (events complete) or a lower bound (approximate: callers combine it with their own
    guess)."""
    out: dict[str, tuple[float, Mode]] = {}
    n = len(prompt.tokens)
    with index.lock:
        for endpoint in endpoints:
            size = index.block_size(endpoint)
            mode = index.mode(endpoint)
            if size is None or n == 0:
                out[endpoint] = (0.0, mode)
                continue
            matched = index.matched(endpoint, prompt.keys(size))
            out[endpoint] = (matched * size / n, mode)
    return out
