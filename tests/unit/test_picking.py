"""Replica picking: filters, scorers and the picker, without a server."""

from __future__ import annotations

from collections import Counter

from extproc.replicas.load import LoadTracker
from extproc.replicas.picking import BoundedLoad, LeastLoad, Picker, PickRequest, PrefixAffinity, SessionAffinity
from extproc.replicas.prefix import PrefixIndex, block_hashes
from extproc.replicas.scrape import LoadReport

ENDPOINTS = ("10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000", "10.0.0.4:8000")


def picker(tracker: LoadTracker, index: PrefixIndex, epsilon: float = 0.25) -> Picker:
    return Picker(
        [BoundedLoad(tracker, epsilon)],
        [(PrefixAffinity(index), 3.0), (LeastLoad(tracker), 2.0), (SessionAffinity(), 4.0)],
        fallbacks=2,
        tracker=tracker,
    )


def test_block_hashes_chain_and_depend_on_the_model() -> None:
    a = block_hashes("m", "x" * 100 + "y" * 100, 50)
    b = block_hashes("m", "x" * 100 + "z" * 100, 50)
    assert len(a) == 4 and a[:2] == b[:2] and a[2:] != b[2:]
    assert block_hashes("other", "x" * 100, 50) != a[:2]
    assert block_hashes("m", "x" * 49, 50) == []


def test_prefix_index_scores_the_longest_matched_prefix_and_is_bounded() -> None:
    index = PrefixIndex(capacity=10)
    blocks = block_hashes("m", "abcd" * 100, 40)
    index.record("r1", blocks[:6])
    assert index.matched_blocks("r1", blocks) == 6
    assert index.matched_blocks("r2", blocks) == 0
    index.record("r1", block_hashes("m", "zzzz" * 100, 40))
    assert index.size("r1") == 10


def test_prefix_affinity_sends_a_conversation_back_to_its_replica() -> None:
    tracker, index = LoadTracker(), PrefixIndex(1000)
    p = picker(tracker, index)
    conversation = "system prompt " * 40
    first = p.pick(PickRequest("m", block_hashes("m", conversation, 64)), ENDPOINTS).endpoints[0]
    index.record(first, block_hashes("m", conversation, 64))
    for turn in range(5):
        conversation += f" turn {turn} " * 20
        picked = p.pick(PickRequest("m", block_hashes("m", conversation, 64)), ENDPOINTS).endpoints[0]
        assert picked == first
        index.record(picked, block_hashes("m", conversation, 64))


def test_bounded_load_sheds_a_hot_replica() -> None:
    tracker, index = LoadTracker(), PrefixIndex(1000)
    p = picker(tracker, index, epsilon=0.25)
    blocks = block_hashes("m", "shared system prompt " * 50, 64)
    index.record(ENDPOINTS[0], blocks)
    leases = []
    for _ in range(40):
        chosen = p.pick(PickRequest("m", blocks), ENDPOINTS).endpoints[0]
        leases.append(tracker.acquire(chosen, "m"))
        counts = [tracker.inflight[e] for e in ENDPOINTS]
        mean = sum(counts) / len(counts)
        assert max(counts) <= max(2, -(-1.25 * mean // 1))  # max(floor, ceil((1 + eps) * mean))
    assert tracker.inflight[ENDPOINTS[0]] > 10  # affinity still favours it within the bound
    for lease in leases:
        tracker.release(lease)
    assert tracker.inflight == Counter()


def test_session_affinity_is_stable_and_spreads_sessions() -> None:
    tracker, index = LoadTracker(), PrefixIndex(10)
    p = picker(tracker, index)
    owners = {s: p.pick(PickRequest("m", [], f"s{s}"), ENDPOINTS).endpoints[0] for s in range(200)}
    assert all(p.pick(PickRequest("m", [], f"s{s}"), ENDPOINTS).endpoints[0] == owners[s] for s in range(200))
    assert len(set(owners.values())) == 4
    # Removing a replica moves only its own sessions.
    survivors = ENDPOINTS[:3]
    moved = [s for s in range(200) if p.pick(PickRequest("m", [], f"s{s}"), survivors).endpoints[0] != owners[s]]
    assert all(owners[s] == ENDPOINTS[3] for s in moved)


def test_fallbacks_are_distinct_and_follow_the_pick() -> None:
    tracker = LoadTracker()
    pick = picker(tracker, PrefixIndex(10)).pick(PickRequest("m", []), ENDPOINTS)
    assert len(pick.endpoints) == 3 and len(set(pick.endpoints)) == 3


def test_idle_replicas_take_turns() -> None:
    tracker = LoadTracker()
    p = picker(tracker, PrefixIndex(10))
    picks = Counter(p.pick(PickRequest("m", []), ENDPOINTS).endpoints[0] for _ in range(40))
    assert set(picks.values()) == {10}


def test_scraped_queue_and_kv_usage_lower_the_load_score() -> None:
    tracker = LoadTracker()
    reports = {ENDPOINTS[0]: LoadReport(waiting=12, running=4, kv_cache_usage=0.95, scraped_at=0.0)}
    scores = LeastLoad(tracker, reports.get).score(PickRequest("m", []), ENDPOINTS)
    assert scores[ENDPOINTS[0]] < min(scores[e] for e in ENDPOINTS[1:])
