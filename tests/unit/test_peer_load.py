"""The other routers' requests, inferred from the replicas' stored runs (extproc/replicas/peerload.py)."""

from __future__ import annotations

import math

import pytest

from extproc.policy.config import PickingSettings
from extproc.replicas.kvevents import BlockStored
from extproc.replicas.kvindex import KvIndex, Mode
from extproc.replicas.load import LoadTracker
from extproc.replicas.peerload import PeerLoad
from extproc.replicas.picking import PickRequest, build_picker
from extproc.replicas.prefix import PrefixIndex


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def peers(clock: Clock, mean: float = 4.0) -> PeerLoad:
    tracker = LoadTracker(clock=clock)
    tracker.mean_seconds = mean
    return PeerLoad(tracker, clock=clock)


def test_a_run_that_continues_no_chain_is_another_routers_request(clock) -> None:
    p = peers(clock)
    p.stored("a", None, [1, 2, 3])
    p.stored("a", 900, [4])  # its parent (900) is no recent run's tail: another request
    assert p.load("a") == pytest.approx(2.0)
    assert p.load("b") == 0.0
    assert (p.started, p.foreign) == (2, 2)


def test_the_count_decays_with_the_mean_request_time(clock) -> None:
    p = peers(clock, mean=4.0)
    p.stored("a", None, [1, 2])
    clock.now += 4.0
    assert p.load("a") == pytest.approx(math.exp(-1.0))
    clock.now += 60.0
    assert p.load("a") == 0.0


def test_chunked_prefill_and_decode_blocks_continue_their_request(clock) -> None:
    p = peers(clock)
    p.stored("a", None, [1, 2, 3])
    clock.now += 0.5
    p.stored("a", 3, [4, 5])  # the next chunk: parent is the run's tail
    clock.now += 0.5
    p.stored("a", 5, [6])  # a decode block
    assert p.started == 1
    # A conversation's next turn, long after its last block: a new request, though it continues the chain.
    clock.now += 20.0
    p.stored("a", 6, [7, 8])
    assert p.started == 2


def test_this_routers_own_requests_are_not_counted(clock) -> None:
    p = peers(clock)
    p.expect("a", [1, 2, 3, 4, 5], held=2)  # it held blocks 1-2: its run starts at 3
    p.stored("a", 2, [3, 4, 5])
    assert p.load("a") == 0.0
    # A prompt held whole stores nothing until its first decode block, which follows its last block.
    p.expect("b", [1, 2, 3], held=3)
    p.stored("b", 3, [77])
    assert p.load("b") == 0.0
    # An expectation is for one run: the same start again is someone else's.
    p.stored("a", 2, [3, 9])
    assert p.load("a") == pytest.approx(1.0)
    assert (p.started, p.foreign) == (3, 1)


def test_an_expectation_runs_out(clock) -> None:
    p = peers(clock)
    p.expect("a", [1, 2, 3], held=0)
    clock.now += p.expect_seconds + 1
    p.stored("a", None, [1, 2, 3])
    assert p.foreign == 1


def test_only_live_gpu_batches_of_the_index_are_load() -> None:
    index = KvIndex(warm_seconds=0)
    p = PeerLoad(LoadTracker())
    index.on_stored = p.stored
    index.subscribe("a")
    tokens = tuple(range(32))
    index.apply("a", [BlockStored((b"h1", b"h2"), None, tokens, 16)])  # replayed history
    assert p.started == 0
    index.apply("a", [BlockStored((b"h3",), None, tuple(range(100, 116)), 16, medium="CPU")], live=True)
    assert p.started == 0  # a copy to the offload tier
    index.apply("a", [BlockStored((b"h4",), b"h2", tuple(range(200, 216)), 16)], live=True)
    assert (p.started, p.foreign) == (1, 1)
    assert p.load("a") > 0.9


def test_expired_leases_do_not_move_the_mean_request_time(clock) -> None:
    tracker = LoadTracker(max_age_seconds=600, clock=clock)
    tracker.mean_seconds = 2.0
    lease = tracker.acquire("a", "m")
    clock.now += 700
    assert tracker.expire() == 1
    assert tracker.mean_seconds == 2.0
    lease = tracker.acquire("a", "m")
    clock.now += 66.0
    tracker.release(lease)
    assert tracker.mean_seconds == pytest.approx(2.0 + 64.0 / 64)


def timed(tracker: LoadTracker, requests: int = 16) -> None:
    """The router has timed this many requests of its own (each taking no time)."""
    for _ in range(requests):
        tracker.release(tracker.acquire("x", "m"))


def test_the_load_bound_counts_the_other_routers_requests(clock) -> None:
    endpoints = ("a", "b", "c")
    tracker, index = LoadTracker(clock=clock), PrefixIndex(100)
    p = PeerLoad(tracker, clock=clock)
    timed(tracker)
    picker = build_picker(PickingSettings(), tracker, index)
    for e in endpoints:  # this router: one request on each
        tracker.acquire(e, "m")
    for run in range(3):  # the others: three new requests on a
        p.stored("a", None, [10 + run])
    held = {e: (0.0, Mode.EXACT) for e in endpoints}
    rotating = set()
    for _ in range(3):
        rotating.add(picker.pick(PickRequest("m", [1, 2], held=held), endpoints).endpoints[0])  # type: ignore[union-attr]
    assert "a" in rotating  # without the peers' load, a is as free as the others
    tracker.peers = p
    for _ in range(3):
        pick = picker.pick(PickRequest("m", [1, 2], held=held), endpoints)
        assert pick is not None and pick.endpoints[0] != "a"


def test_ours_waiting_in_a_replicas_queue_stand_for_the_others_waiting_there(clock) -> None:
    p = peers(clock, mean=10.0)
    for i in range(4):  # so far the others sent two requests for each of ours
        p.expect("a", [100 + i], held=0)
        p.stored("a", None, [100 + i])
        p.stored("b", None, [200 + i])
        p.stored("b", None, [300 + i])
    assert (p.own, p.foreign) == (4, 8)
    clock.now += 60.0  # (their counts have decayed away)
    p.expect("a", [1, 2], held=0)
    assert p.load("a") == 0.0  # just sent: its run is on its way
    clock.now += 1.0
    assert p.load("a") == pytest.approx(2.0)  # not scheduled a second later: it waits, with two others
    p.stored("a", None, [1, 2])
    assert p.load("a") == 0.0  # scheduled: it waits no more


def test_the_others_count_only_once_the_router_has_timed_its_own_requests(clock) -> None:
    tracker = LoadTracker(clock=clock)
    p = PeerLoad(tracker, clock=clock)
    tracker.peers = p
    p.stored("a", None, [1])
    assert p.load("a") > 0.9
    # A new sidecar does not know yet how long a request stays: it would count the others'
    # finished requests as running for as long as its first guess says.
    assert tracker.loads(["a", "b"]) == {}
    timed(tracker, 15)
    assert not p.active
    timed(tracker, 1)
    assert p.active
    assert tracker.loads(["a", "b"])["a"] == pytest.approx(p.load("a"))


def test_a_slow_decode_block_continues_its_request_a_late_prompt_run_does_not(clock) -> None:
    p = peers(clock)
    p.stored("a", None, [1, 2, 3])
    clock.now += 5.0  # a replica busy with long prefills: the request's next decode block comes late
    p.stored("a", 3, [4])
    assert p.started == 1
    clock.now += 5.0  # a next turn's prompt run on that chain, 5 s on: a new request
    p.stored("a", 4, [5, 6, 7])
    assert p.started == 2
