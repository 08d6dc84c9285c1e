"""Where cached answers live: an in-process index of vectors per scope, and two backends.

``Index`` holds unit vectors grouped by scope (one contiguous float32 matrix per scope), so a
lookup is one matrix-vector product over the entries of its own scope, with expiry checked in the
same pass and the least recently used entry evicted past the bound.

``MemoryStore`` keeps the answers beside the index (bounded, per sidecar). ``RedisStore`` keeps
them in Redis under a TTL, and every sidecar keeps the vectors of what Redis holds in its own
Index, fed by a Redis stream that each store appends to: a lookup is local, and only a hit reads
Redis (one GET). Redis 7 (Debian's) has no vector index of its own (that is the RediSearch
module); the search in the sidecar is measured in bench/cache_lookup.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from extproc.cache.answers import Answer
from extproc.cache.guards import lookalike

log = logging.getLogger("extproc.cache")

DIM = 384


@dataclass(slots=True)
class _Group:
    """The entries of one scope: rows of `vectors` [0, n) and their ids and expiry times."""

    vectors: np.ndarray
    expires: np.ndarray
    ids: list[str]

    @property
    def n(self) -> int:
        return len(self.ids)


@dataclass(slots=True)
class _Meta:
    scope: bytes
    model: str
    words: tuple[int, ...]  # the question's content-word digests (guards.py)


_CANDIDATES = 8  # entries above the threshold checked for look-alike wording, most similar first


class Index:
    """Unit vectors by scope, bounded (least recently used out), each with an expiry time."""

    def __init__(self, max_entries: int, on_evict: Callable[[str, str], None] | None = None) -> None:
        self.max_entries = max_entries
        self._groups: dict[bytes, _Group] = {}
        self._entries: OrderedDict[str, _Meta] = OrderedDict()  # least recently used first
        self._row: dict[str, int] = {}
        self._on_evict = on_evict  # (entry id, reason: size | expired | invalidated)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry_id: str) -> bool:
        return entry_id in self._entries

    def add(
        self, entry_id: str, scope: bytes, model: str, vector: np.ndarray, expires: float, words: tuple[int, ...] = ()
    ) -> None:
        if entry_id in self._entries:
            return
        group = self._groups.get(scope)
        if group is None:
            group = self._groups[scope] = _Group(np.empty((4, DIM), np.float32), np.empty(4), [])
        n = group.n
        if n == len(group.vectors):
            grown = max(4, n * 2)
            group.vectors = np.resize(group.vectors, (grown, DIM))
            group.expires = np.resize(group.expires, grown)
        group.vectors[n] = vector
        group.expires[n] = expires
        group.ids.append(entry_id)
        self._row[entry_id] = n
        self._entries[entry_id] = _Meta(scope, model, words)
        while len(self._entries) > self.max_entries:
            oldest = next(iter(self._entries))
            self.remove(oldest, "size")

    def search(
        self, scope: bytes, vector: np.ndarray, now: float, threshold: float = 1.0, words: tuple[int, ...] = ()
    ) -> tuple[str | None, float]:
        """The most similar live entry of the scope at or above the threshold whose question is
        not a look-alike of this one (guards.py), and its cosine similarity; below the threshold,
        (None, the best similarity seen; -1: no entry)."""
        group = self._groups.get(scope)
        if group is None or not group.n:
            return None, -1.0
        n = group.n
        dead = group.expires[:n] <= now
        if dead.any():
            for i in np.flatnonzero(dead)[::-1]:  # from the end: removal moves the last row in
                self.remove(group.ids[int(i)], "expired")
            return self.search(scope, vector, now, threshold, words)
        sims = group.vectors[:n] @ vector
        best = int(np.argmax(sims))
        if sims[best] < threshold:
            return None, float(sims[best])
        above = np.flatnonzero(sims >= threshold)
        if len(above) > _CANDIDATES:
            above = above[np.argpartition(-sims[above], _CANDIDATES)[:_CANDIDATES]]
        for i in sorted(above.tolist(), key=lambda i: -sims[i]):
            entry_id = group.ids[i]
            if not lookalike(self._entries[entry_id].words, words):
                return entry_id, float(sims[i])
        return None, float(sims[best])

    def touch(self, entry_id: str) -> None:
        if entry_id in self._entries:
            self._entries.move_to_end(entry_id)

    def remove(self, entry_id: str, reason: str = "invalidated") -> bool:
        meta = self._entries.pop(entry_id, None)
        if meta is None:
            return False
        group = self._groups[meta.scope]
        row = self._row.pop(entry_id)
        last = group.n - 1
        if row != last:  # the last row fills the gap
            moved = group.ids[last]
            group.vectors[row] = group.vectors[last]
            group.expires[row] = group.expires[last]
            group.ids[row] = moved
            self._row[moved] = row
        group.ids.pop()
        if not group.ids:
            del self._groups[meta.scope]
        if self._on_evict is not None:
            self._on_evict(entry_id, reason)
        return True

    def oldest(self) -> str | None:
        return next(iter(self._entries), None)

    def ids(self, model: str | None = None) -> list[str]:
        return [i for i, m in self._entries.items() if model is None or m.model == model]

    def model_of(self, entry_id: str) -> str | None:
        meta = self._entries.get(entry_id)
        return meta.model if meta else None


class Store(Protocol):
    """A cache backend. Every method may be slow or fail (Redis); the caller bounds and counts."""

    index: Index

    async def get(
        self, scope: bytes, vector: np.ndarray, threshold: float, words: tuple[int, ...]
    ) -> tuple[str | None, Answer | None, float]: ...

    async def put(
        self,
        entry_id: str,
        scope: bytes,
        model: str,
        vector: np.ndarray,
        words: tuple[int, ...],
        answer: Answer,
        ttl: float,
    ) -> None: ...

    async def invalidate(self, model: str | None) -> int: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class MemoryStore:
    """Answers in this process, beside the index; bounded in entries and in the answers' bytes."""

    def __init__(
        self, max_entries: int, on_evict: Callable[[str, str], None] | None = None, max_bytes: int = 1 << 62
    ) -> None:
        self._answers: dict[str, tuple[Answer, int]] = {}
        self.max_bytes = max_bytes
        self.bytes = 0

        def evicted(entry_id: str, reason: str) -> None:
            gone = self._answers.pop(entry_id, None)
            if gone is not None:
                self.bytes -= gone[1]
            if on_evict is not None:
                on_evict(entry_id, reason)

        self.index = Index(max_entries, evicted)

    async def get(
        self, scope: bytes, vector: np.ndarray, threshold: float, words: tuple[int, ...]
    ) -> tuple[str | None, Answer | None, float]:
        entry_id, similarity = self.index.search(scope, vector, time.time(), threshold, words)
        kept = self._answers.get(entry_id) if entry_id else None
        return entry_id, kept[0] if kept else None, similarity

    async def put(
        self,
        entry_id: str,
        scope: bytes,
        model: str,
        vector: np.ndarray,
        words: tuple[int, ...],
        answer: Answer,
        ttl: float,
    ) -> None:
        size = len(answer.content or "") + len(str(answer.tool_calls or "")) + DIM * 4 + 256
        self._answers[entry_id] = (answer, size)
        self.bytes += size
        self.index.add(entry_id, scope, model, vector, time.time() + ttl, words)
        while self.bytes > self.max_bytes and (oldest := self.index.oldest()) is not None:
            self.index.remove(oldest, "size")

    async def invalidate(self, model: str | None) -> int:
        ids = self.index.ids(model)
        for entry_id in ids:
            self.index.remove(entry_id)
        return len(ids)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisStore:
    """Answers in Redis (shared by every sidecar using it); vectors mirrored into a local Index.

    Keys under ``prefix``: ``a:<model>:<id>`` holds an answer, expiring with its TTL; ``log`` is a
    stream of ``add`` (id, scope, model, vector, expiry) and ``clear`` (model or all) events,
    trimmed to about twice the entry bound. A sidecar replays the stream when it starts and then
    follows it, so it finds what any sidecar stored. An answer Redis no longer has (expired,
    evicted by Redis' own memory policy, invalidated) is a miss, and leaves the local index too.
    """

    def __init__(
        self,
        client: Any,
        prefix: str,
        max_entries: int,
        on_evict: Callable[[str, str], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        follower: Any = None,
    ) -> None:
        self.redis = client
        # The stream is read with a blocking call, which needs a longer socket timeout than the
        # request path's commands: its own client.
        self._reader = follower if follower is not None else client
        self.prefix = prefix
        self.index = Index(max_entries, on_evict)
        self._log = prefix + "log"
        self._last = "0-0"
        self._follower: asyncio.Task[None] | None = None
        self._closed = False
        self._on_error = on_error or (lambda op: None)

    def _answer_key(self, model: str, entry_id: str) -> str:
        return f"{self.prefix}a:{model}:{entry_id}"

    async def start(self) -> None:
        self._follower = asyncio.create_task(self._follow(), name="cache-redis-follow")

    async def close(self) -> None:
        """Stop following and close the connections, waiting 2 s at most: a connection that a
        cancelled blocking read left behind must not hold the sidecar's shutdown up."""
        self._closed = True
        pending: list[asyncio.Future[Any]] = []
        if self._follower is not None:
            self._follower.cancel()
            pending.append(self._follower)
        for client in {id(c): c for c in (self.redis, self._reader)}.values():
            pending.append(asyncio.ensure_future(client.aclose()))
        await asyncio.wait(pending, timeout=2.0)

    async def get(
        self, scope: bytes, vector: np.ndarray, threshold: float, words: tuple[int, ...]
    ) -> tuple[str | None, Answer | None, float]:
        entry_id, similarity = self.index.search(scope, vector, time.time(), threshold, words)
        if entry_id is None:
            return None, None, similarity
        model = self.index.model_of(entry_id) or ""
        data = await self.redis.get(self._answer_key(model, entry_id))
        if data is None:
            self.index.remove(entry_id, "expired")
            return entry_id, None, similarity
        return entry_id, Answer.loads(data), similarity

    async def put(
        self,
        entry_id: str,
        scope: bytes,
        model: str,
        vector: np.ndarray,
        words: tuple[int, ...],
        answer: Answer,
        ttl: float,
    ) -> None:
        expires = time.time() + ttl
        fields = {
            "op": "add",
            "id": entry_id,
            "scope": scope,
            "model": model,
            "vec": np.asarray(vector, np.float32).tobytes(),
            "words": np.asarray(words, np.uint64).tobytes(),
            "exp": repr(expires),
        }
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self._answer_key(model, entry_id), answer.dumps(), px=max(1, int(ttl * 1000)))
            pipe.xadd(self._log, fields, maxlen=2 * self.index.max_entries, approximate=True)
            await pipe.execute()
        self.index.add(entry_id, scope, model, vector, expires, words)

    async def invalidate(self, model: str | None) -> int:
        pattern = f"{self.prefix}a:{model}:*" if model is not None else f"{self.prefix}a:*"
        removed = 0
        async for key in self.redis.scan_iter(match=pattern, count=1000):
            removed += await self.redis.delete(key)
        await self.redis.xadd(self._log, {"op": "clear", "model": model or ""})
        for entry_id in self.index.ids(model):
            self.index.remove(entry_id)
        return removed

    async def _follow(self) -> None:
        """Replay the stream, then follow it (a blocking read; one connection of the pool)."""
        while not self._closed:
            try:
                replies = await self._reader.xread({self._log: self._last}, count=1000, block=1000)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: keep what we know, try again shortly
                if self._closed:  # (redis-py may turn the cancellation into a connection error)
                    return
                self._on_error("follow")
                log.warning("cache: reading the Redis stream failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(1.0)
                continue
            for _stream, events in replies or ():
                for event_id, fields in events:
                    self._last = event_id.decode() if isinstance(event_id, bytes) else event_id
                    self._apply(fields)

    def _apply(self, fields: dict[bytes, bytes]) -> None:
        op = fields.get(b"op")
        if op == b"add":
            expires = float(fields[b"exp"])
            if expires <= time.time():
                return
            vector = np.frombuffer(fields[b"vec"], np.float32)
            if vector.shape != (DIM,):
                return
            words = tuple(int(w) for w in np.frombuffer(fields.get(b"words", b""), np.uint64))
            entry_id, model = fields[b"id"].decode(), fields[b"model"].decode()
            self.index.add(entry_id, fields[b"scope"], model, vector, expires, words)
        elif op == b"clear":
            model = fields.get(b"model", b"").decode() or None
            for entry_id in self.index.ids(model):
                self.index.remove(entry_id)
