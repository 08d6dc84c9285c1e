"""Which model each conversation is on, so that its next turn stays there.

A conversation's later turns are routed like any request, and a decision may well name another
model than its first turn got (the last message is code now, the history grew past a token
threshold). Moving it costs its whole KV cache (the other model's replicas prefill the history
again) and the consistency of its answers; so a conversation keeps its model unless the decision
that would move it says it may (``switch``), or a privacy rule reroutes it.

The table knows a conversation by its session header (two requests with the same opening need
not be one conversation); it is per sidecar, bounded and idle-limited, behind a two-method
protocol so a shared store (Redis) can take its place. Without a header, or on a sidecar that has
not seen the conversation (another router replica served its earlier turns), its model comes
from the KV events where the models have them: the model whose replicas really hold most of the
conversation's history.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

NEW = "new"  # first seen
SAME = "same"  # the decision named the model it is on
KEPT = "kept"  # the decision named another model; the conversation stayed
SWITCHED = "switched"  # it moved: the decision allows it (reason: switch), or pii, or unavailable


class SessionStore(Protocol):
    def get(self, key: str) -> str | None: ...

    def put(self, key: str, model: str) -> None: ...


class LocalSessions:
    """An LRU of conversation -> model with an idle limit. Event-loop only (no locking)."""

    def __init__(self, max_sessions: int, idle_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_sessions = max_sessions
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._table: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def configure(self, max_sessions: int, idle_seconds: float) -> None:
        """New limits from a reloaded policy; the table keeps what it knows (a smaller one
        forgets the least recently seen at the next put)."""
        self.max_sessions, self.idle_seconds = max_sessions, idle_seconds

    def get(self, key: str) -> str | None:
        entry = self._table.get(key)
        if entry is None:
            return None
        if self._clock() - entry[1] > self.idle_seconds:
            del self._table[key]
            return None
        return entry[0]

    def put(self, key: str, model: str) -> None:
        self._table[key] = (model, self._clock())
        self._table.move_to_end(key)
        while len(self._table) > self.max_sessions:
            self._table.popitem(last=False)

    def __len__(self) -> int:
        return len(self._table)


@dataclass(frozen=True, slots=True)
class SessionModel:
    """What became of a conversation's model on this turn (for the explanation and metrics)."""

    outcome: str  # NEW | SAME | KEPT | SWITCHED
    model: str  # the model the turn goes to
    previous: str | None = None  # the model it was on
    decided: str | None = None  # what the decision named
    reason: str | None = None  # why it switched (switch, pii, unavailable) or stayed (keep_model)
    source: str | None = None  # where its previous model came from: table | kv_events

    def explain(self) -> dict[str, str | None]:
        return {
            "outcome": self.outcome,
            "model": self.model,
            "previous": self.previous,
            "decided": self.decided,
            "reason": self.reason,
            "source": self.source,
        }
