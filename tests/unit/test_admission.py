"""The admission queue: priorities in order, tenants taking turns, deadlines, reserved slots."""

from __future__ import annotations

import asyncio

import pytest

from extproc.admission import AdmissionQueue, QueueFull
from extproc.policy.config import Admission, Priority

SETTINGS = Admission(
    priority_header="x-user-tier",
    tenant_header="x-tenant-id",
    priorities=(
        Priority("premium", frozenset({"premium", "gold"}), max_wait=5.0, max_queued=10),
        Priority("free", frozenset({"free"}), max_wait=5.0, max_queued=10),
        Priority("batch", frozenset({"batch"}), max_wait=0.0),
    ),
    default_priority="free",
    max_queued_per_tenant=3,
)


class Room:
    """A model with a number of free slots."""

    def __init__(self) -> None:
        self.free = 0

    def __call__(self, model: str, reserved: int, share: float) -> bool:
        return self.free > reserved


def queue(room: Room, settings: Admission = SETTINGS) -> AdmissionQueue:
    q = AdmissionQueue(settings)
    q.configure(settings, room)
    return q


def test_priority_comes_from_the_header_and_defaults() -> None:
    q = queue(Room())
    assert [q.priority_of(h) for h in ({"x-user-tier": "gold"}, {"x-user-tier": "free"}, {}, {"x-user-tier": "?"})] == [
        0,
        1,
        1,
        1,
    ]


def test_higher_priority_is_served_first_and_tenants_take_turns() -> None:
    async def run() -> list[str]:
        room = Room()
        q = queue(room)
        order: list[str] = []

        async def request(name: str, tier: str, tenant: str) -> None:
            await q.wait(["m"], {"x-user-tier": tier, "x-tenant-id": tenant}, lambda s: None)
            order.append(name)
            q.placed("m")

        tasks = [
            asyncio.create_task(request(name, tier, tenant))
            for name, tier, tenant in [
                ("free-a1", "free", "a"),
                ("free-a2", "free", "a"),
                ("free-a3", "free", "a"),
                ("free-b1", "free", "b"),
                ("premium-c1", "premium", "c"),
            ]
        ]
        await asyncio.sleep(0)
        for served in range(1, len(tasks) + 1):  # one slot frees at a time
            room.free = 1
            q.release()
            while len(order) < served:
                await asyncio.sleep(0.001)
            room.free = 0
        await asyncio.gather(*tasks)
        return order

    assert asyncio.run(run()) == ["premium-c1", "free-a1", "free-b1", "free-a2", "free-a3"]


def test_a_granted_slot_is_reserved_against_new_arrivals() -> None:
    async def run() -> None:
        room = Room()
        q = queue(room)
        waiting = asyncio.create_task(q.wait(["m"], {}, lambda s: None))
        await asyncio.sleep(0)
        room.free = 1
        q.release()
        # The slot is the waiter's until it is placed: a newcomer must queue.
        assert q.needs_queue(["m"], q.priority_of({}))
        assert await waiting == "m"
        q.placed("m")
        assert not q.needs_queue(["m"], q.priority_of({}))

    asyncio.run(run())


def test_past_the_deadline_or_without_waiting_a_request_gets_429_with_retry_after() -> None:
    async def run() -> None:
        settings = Admission(priorities=(Priority("default", frozenset(), max_wait=0.05, max_queued=1),))
        q = queue(Room(), settings)
        extended: list[float] = []
        with pytest.raises(QueueFull) as refused:
            await q.wait(["m"], {}, extended.append)
        assert (refused.value.status, refused.value.retry_after, extended) == (429, 1, [0.05])
        assert q.queued() == [("default", 0)]  # it left the queue

        batch = queue(Room())
        with pytest.raises(QueueFull):
            await batch.wait(["m"], {"x-user-tier": "batch"}, extended.append)  # max_wait 0: at once

    asyncio.run(run())


def test_a_full_queue_and_a_tenants_share_are_bounded() -> None:
    async def run() -> None:
        q = queue(Room())
        tasks = [
            asyncio.create_task(q.wait(["m"], {"x-tenant-id": "greedy"}, lambda s: None))
            for _ in range(SETTINGS.max_queued_per_tenant)
        ]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull, match="tenant"):
            await q.wait(["m"], {"x-tenant-id": "greedy"}, lambda s: None)
        other = asyncio.create_task(q.wait(["m"], {"x-tenant-id": "polite"}, lambda s: None))
        await asyncio.sleep(0)
        assert not other.done()  # another tenant still gets a place
        for task in [*tasks, other]:
            task.cancel()
        await asyncio.gather(*tasks, other, return_exceptions=True)
        assert q.queued()[1] == ("free", 0)  # cancelled waiters leave no trace

    asyncio.run(run())
