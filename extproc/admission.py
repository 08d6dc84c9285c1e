"""Admission control: when every replica is full, wait in a fair queue or get a prompt 429.

A replica is full when it has ``max_inflight`` requests in flight from this router, or reports
``max_waiting`` queued requests of its own (``vllm:num_requests_waiting``, scraped). When every
replica of the chosen model and of its fallbacks is full, the request waits here instead of being
sent to a replica that would queue it anyway (and time out, or hold a connection for minutes):

* in its priority's queue (``priority_header``, e.g. the user tier; priorities are served in
  order, each bounded by ``max_queued``), for at most its priority's ``max_wait``; a priority with
  ``max_wait: 0`` never waits;
* fairly between tenants (``tenant_header``): within a priority, tenants take turns, one request
  each, and no tenant holds more than ``max_queued_per_tenant`` places;
* a slot that frees (a lease ends) goes to the first waiter in that order whose models it fits,
  and is reserved for it until it is placed, so a new arrival cannot take it first;
* a priority may fill only its ``share`` of each replica's capacity, so a lower one never takes
  the last slots and a higher one rarely waits.

Past its deadline, or with its queue full, a request gets 429 with ``Retry-After``; 503 remains
for a model with no replica at all. Envoy's ext_proc ``message_timeout`` would cut a waiting
request, so the stream answers the body message with ``override_message_timeout`` first (Envoy
honours one per message, up to the filter's ``max_message_timeout``).

State is per sidecar and in memory; the interface the router uses (``admit``, ``release``) is
small enough for a shared implementation later.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from extproc import errors
from extproc.policy.config import Admission, Priority


@dataclass(slots=True, eq=False)
class _Waiter:
    models: tuple[str, ...]
    priority: int  # index into the priorities, 0 first
    tenant: str
    future: asyncio.Future[str]  # resolved with the model whose slot it was granted
    enqueued: float


@dataclass(slots=True)
class _Tier:
    tenants: OrderedDict[str, deque[_Waiter]] = field(default_factory=OrderedDict)
    size: int = 0


class QueueFull(errors.RouterError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, retry_after: float, priority: str) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))
        self.priority = priority


# (model, slots reserved for granted waiters, share of capacity) -> does a replica have room now?
HasRoom = Callable[[str, int, float], bool]


class AdmissionQueue:
    """Per sidecar, across policy reloads (the settings are replaced, the waiters kept)."""

    def __init__(self, settings: Admission | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings or Admission()
        self._clock = clock
        self._tiers: list[_Tier] = [_Tier() for _ in self.settings.priorities]
        self._reserved: dict[str, int] = {}
        self._has_room: HasRoom = lambda model, reserved, share: True
        self.granted = 0
        self.rejected: dict[str, int] = {}
        self.waits: list[float] = []

    def configure(self, settings: Admission, has_room: HasRoom) -> None:
        if len(settings.priorities) != len(self._tiers):
            for tier in self._tiers:  # the priorities changed: waiters start over in the lowest
                for queue in tier.tenants.values():
                    for waiter in queue:
                        waiter.priority = min(waiter.priority, len(settings.priorities) - 1)
            old = self._tiers
            self._tiers = [_Tier() for _ in settings.priorities]
            for tier in old:
                for tenant, queue in tier.tenants.items():
                    for waiter in queue:
                        self._push(waiter, tenant)
        self.settings = settings
        self._has_room = has_room

    def priority_of(self, headers: Mapping[str, str]) -> int:
        settings = self.settings
        value = headers.get(settings.priority_header, "") if settings.priority_header else ""
        for i, priority in enumerate(settings.priorities):
            if value and value in priority.values:
                return i
        return settings.default_index

    def queued(self) -> list[tuple[str, int]]:
        """(priority name, waiters) for the gauge."""
        return [(p.name, tier.size) for p, tier in zip(self.settings.priorities, self._tiers, strict=True)]

    # --- the request's side ---------------------------------------------------------------------

    def needs_queue(self, models: Sequence[str], priority: int) -> bool:
        """True if the request must wait: no model of its has room, or waiters of an equal or
        higher priority are ahead of it for one of them (a freed slot is theirs)."""
        share = self.settings.priorities[priority].share
        for model in models:
            if self._has_room(model, self._reserved.get(model, 0), share) and not self._ahead(model, priority):
                return False
        return True

    async def wait(self, models: Sequence[str], headers: Mapping[str, str], on_wait: Callable[[float], None]) -> str:
        """Queue until a slot of one of models frees; returns that model. Raises QueueFull past
        the priority's deadline or when its queue is full. ``on_wait(seconds)`` is called before
        waiting with the longest it may take (the stream extends Envoy's timer by it)."""
        index = self.priority_of(headers)
        priority = self.settings.priorities[index]
        tenant = headers.get(self.settings.tenant_header, "") if self.settings.tenant_header else ""
        tier = self._tiers[index]
        if priority.max_wait <= 0 or tier.size >= priority.max_queued:
            raise self._reject(priority, "queue full" if priority.max_wait > 0 else "no waiting for this priority")
        if len(tier.tenants.get(tenant, ())) >= self.settings.max_queued_per_tenant:
            raise self._reject(priority, "this tenant's share of the queue is full")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(tuple(models), index, tenant, loop.create_future(), self._clock())
        self._push(waiter, tenant)
        on_wait(priority.max_wait)
        try:
            model = await asyncio.wait_for(asyncio.shield(waiter.future), priority.max_wait)
        except TimeoutError:
            if waiter.future.done() and not waiter.future.cancelled():  # granted at the last moment
                model = waiter.future.result()
            else:
                self._remove(waiter)
                raise self._reject(priority, f"waited {priority.max_wait:g}s") from None
        except BaseException:
            self._remove(waiter)
            if waiter.future.done() and not waiter.future.cancelled():
                self.placed(waiter.future.result())  # give the reserved slot back
            raise
        self.waits.append(self._clock() - waiter.enqueued)
        del self.waits[:-1000]
        return model

    def placed(self, model: str) -> None:
        """A granted waiter has been placed (or gave up): its reservation ends."""
        count = self._reserved.get(model, 0) - 1
        if count > 0:
            self._reserved[model] = count
        else:
            self._reserved.pop(model, None)

    def _reject(self, priority: Priority, why: str) -> QueueFull:
        self.rejected[priority.name] = self.rejected.get(priority.name, 0) + 1
        retry = self.settings.retry_after if self.settings.retry_after is not None else max(1.0, priority.max_wait)
        return QueueFull(f"every replica is busy ({why}); retry after {math.ceil(retry)}s", retry, priority.name)

    # --- a slot frees -------------------------------------------------------------------------

    def release(self, models: Iterable[str] = ()) -> None:
        """A lease ended (on a replica of one of models, or anywhere): grant the freed room to the
        first waiters, by priority, tenants taking turns, that it fits."""
        progress = True
        while progress:
            progress = False
            for priority, tier in zip(self.settings.priorities, self._tiers, strict=True):
                for tenant in list(tier.tenants):
                    queue = tier.tenants[tenant]
                    waiter = queue[0]
                    model = next(
                        (m for m in waiter.models if self._has_room(m, self._reserved.get(m, 0), priority.share)), None
                    )
                    if model is None:
                        continue
                    queue.popleft()
                    tier.size -= 1
                    if queue:
                        tier.tenants.move_to_end(tenant)  # the next of this tenant waits its turn
                    else:
                        del tier.tenants[tenant]
                    if not waiter.future.done():
                        self._reserved[model] = self._reserved.get(model, 0) + 1
                        waiter.future.set_result(model)
                        self.granted += 1
                    progress = True
                    break
                if progress:
                    break

    # --- internals ----------------------------------------------------------------------------

    def _push(self, waiter: _Waiter, tenant: str) -> None:
        tier = self._tiers[waiter.priority]
        tier.tenants.setdefault(tenant, deque()).append(waiter)
        tier.size += 1

    def _remove(self, waiter: _Waiter) -> None:
        tier = self._tiers[waiter.priority]
        queue = tier.tenants.get(waiter.tenant)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            tier.size -= 1
            if not queue:
                del tier.tenants[waiter.tenant]

    def _ahead(self, model: str, priority: int) -> bool:
        for tier in self._tiers[: priority + 1]:
            for queue in tier.tenants.values():
                if any(model in w.models for w in queue):
                    return True
        return False
