"""Replica picking: filters, scorers and the picker, without a server."""

from __future__ import annotations

from collections import Counter

import pytest

from extproc.policy.config import PickingSettings
from extproc.replicas.load import LoadTracker
from extproc.replicas.picking import (
    BoundedLoad,
    LeastLoad,
    Picker,
    PickRequest,
    PrefixAffinity,
    PrefixLeader,
    SessionAffinity,
    StickyHome,
    build_picker,
)
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


def _loaded(tracker: LoadTracker, counts: dict[str, int]) -> None:
    for endpoint, count in counts.items():
        for _ in range(count):
            tracker.acquire(endpoint, "m")


def test_sticky_home_keeps_a_turn_whose_move_would_reprefill_its_history() -> None:
    tracker, index = LoadTracker(), PrefixIndex(1000)
    home, other = ENDPOINTS[0], ENDPOINTS[1]
    long_turn = block_hashes("m", "a long conversation " * 400, 64)  # 125 blocks
    index.record(home, long_turn[:-2])
    index.record(other, long_turn[:2])  # the shared system prompt
    _loaded(tracker, {home: 12, other: 8, ENDPOINTS[2]: 8, ENDPOINTS[3]: 8})  # home over the plain bound
    sticky = StickyHome(BoundedLoad(tracker, 0.0), index, tracker, sticky_epsilon=1.0, min_blocks=12)
    assert home not in BoundedLoad(tracker, 0.0).filter(PickRequest("m", long_turn), ENDPOINTS)
    assert home in sticky.filter(PickRequest("m", long_turn), ENDPOINTS)
    # A cheap move (the other replica holds nearly as much) is still made.
    index.record(other, long_turn[:-8])
    assert home not in sticky.filter(PickRequest("m", long_turn), ENDPOINTS)
    # And the sticky bound still holds: 51 in flight, ceil(2 x 51 / 4) = 26 < 26 + 1.
    fresh = PrefixIndex(1000)
    fresh.record(home, long_turn[:-2])
    _loaded(tracker, {home: 14})
    sticky = StickyHome(BoundedLoad(tracker, 0.0), fresh, tracker, sticky_epsilon=1.0, min_blocks=12)
    assert home not in sticky.filter(PickRequest("m", long_turn), ENDPOINTS)
    _loaded(tracker, {other: 8})  # 59 in flight: ceil(2 x 59 / 4) = 30, room again
    assert home in sticky.filter(PickRequest("m", long_turn), ENDPOINTS)


def test_prefix_leader_prefers_the_replica_with_the_newest_turn() -> None:
    index = PrefixIndex(1000)
    turns = block_hashes("m", "turn after turn " * 200, 64)
    leader = PrefixLeader(index)
    assert leader.score(PickRequest("m", turns), ENDPOINTS) == {}  # nobody holds anything: no opinion
    index.record(ENDPOINTS[0], turns[:30])  # its rendezvous home, before a move
    index.record(ENDPOINTS[2], turns[:40])  # where the last turn was moved
    scores = leader.score(PickRequest("m", turns), ENDPOINTS)
    assert scores[ENDPOINTS[2]] == 1.0 and scores[ENDPOINTS[0]] == 0.0


def test_after_a_move_the_conversation_stays_with_a_leader_weight() -> None:
    tracker, index = LoadTracker(), PrefixIndex(1000)
    settings = PickingSettings(weights={"prefix_leader": 5.0}, sticky_move_blocks=12, sticky_load_bound=1.0)
    p = build_picker(settings, tracker, index)
    conversation = "system prompt " * 40 + "first turn " * 100
    session = "s1"
    home = p.pick(PickRequest("m", block_hashes("m", conversation, 64), session), ENDPOINTS).endpoints[0]
    index.record(home, block_hashes("m", conversation, 64))
    moved_to = next(e for e in ENDPOINTS if e != home)
    conversation += " second turn " * 30
    index.record(moved_to, block_hashes("m", conversation, 64))  # a forced move took the second turn
    conversation += " third turn " * 30
    picked = p.pick(PickRequest("m", block_hashes("m", conversation, 64), session), ENDPOINTS).endpoints[0]
    assert picked == moved_to
    # Without the leader weight the session pulls it back to its home, which lacks the second turn.
    q = build_picker(PickingSettings(), tracker, index)
    assert q.pick(PickRequest("m", block_hashes("m", conversation, 64), session), ENDPOINTS).endpoints[0] == home


# --- plugins by name --------------------------------------------------------------------------


def test_every_plugin_is_registered_once_by_the_name_explanations_show() -> None:
    from extproc.replicas import picking as pk

    kinds = {p.name: p.kind for p in pk.PLUGINS.values()}
    assert kinds == {
        "outlier_detection": "exclusion",
        "bounded_load": "filter",
        "prefix": "scorer",
        "kv_cache": "scorer",
        "load": "scorer",
        "session": "scorer",
        "prefix_leader": "scorer",
        "max_score": "picker",
    }
    assert pk.canonical("leader") == "prefix_leader" and pk.ALIASES == {"leader": "prefix_leader"}
    tracker, index = LoadTracker(), PrefixIndex(100)
    p = build_picker(PickingSettings(weights={"leader": 1.0}), tracker, index)
    assert [s.name for s, _ in p.scorers] == ["prefix", "kv_cache", "load", "session", "prefix_leader"]
    blocks = block_hashes("m", "x" * 2000, 64)
    index.record(ENDPOINTS[0], blocks)
    pick = p.pick(PickRequest("m", blocks, "s1"), ENDPOINTS, explain=True)
    assert pick is not None and set(pick.scores[ENDPOINTS[0]]) == {"prefix", "load", "session", "prefix_leader"}


def test_the_schema_names_every_scorer_and_picker_with_the_registered_defaults() -> None:
    from extproc.policy.load import schema
    from extproc.replicas import picking as pk

    declared = schema()["$defs"]["picking"]["properties"]
    scorers = {p.name: p.weight for p in pk.plugins("scorer")}
    weights = declared["weights"]["properties"]
    assert set(weights) == set(scorers) | set(pk.ALIASES)
    assert {name: spec["default"] for name, spec in weights.items() if name not in pk.ALIASES} == scorers
    assert declared["picker"]["enum"] == [p.name for p in pk.plugins("picker")]
    assert declared["picker"]["default"] == PickingSettings().picker


def test_every_picking_setting_belongs_to_one_plugin_or_the_prefix_index() -> None:
    from extproc.replicas import picking as pk

    owners: dict[str, str] = {}
    for plugin in pk.PLUGINS.values():
        for setting in plugin.settings:
            assert setting not in owners, f"{setting} is read by {owners[setting]} and {plugin.name}"
            owners[setting] = plugin.name
    index_settings = {"block_chars", "index_blocks"}
    assert set(owners) | index_settings | {"weights", "picker"} == set(PickingSettings.__dataclass_fields__)


def test_a_new_scorer_is_a_registered_plugin_and_needs_no_change_to_the_picker() -> None:
    from extproc.replicas import picking as pk

    @pk.register("scorer", "first_listed", lambda s, d: FirstListed(), weight=100.0)
    class FirstListed:
        def score(self, request: PickRequest, endpoints: object) -> dict[str, float]:
            return {ENDPOINTS[-1]: 1.0}

    try:
        p = build_picker(PickingSettings(), LoadTracker(), PrefixIndex(100))
        pick = p.pick(PickRequest("m", [], None), ENDPOINTS, explain=True)
        assert pick is not None and pick.endpoints[0] == ENDPOINTS[-1]
        assert pick.scores[ENDPOINTS[-1]]["first_listed"] == 1.0
        off = build_picker(PickingSettings(weights={"first_listed": 0.0}), LoadTracker(), PrefixIndex(100))
        assert off.pick(PickRequest("m", [], None), ENDPOINTS).endpoints[0] != ENDPOINTS[-1]  # type: ignore[union-attr]
    finally:
        del pk.PLUGINS["first_listed"]


def test_a_plugin_name_cannot_be_registered_twice() -> None:
    from extproc.replicas import picking as pk

    with pytest.raises(ValueError, match="'leader' is registered twice"):
        pk.register("scorer", "leader", lambda s, d: None)(type("Other", (), {}))
    assert "leader" not in pk.PLUGINS


def test_leader_and_prefix_leader_together_are_refused() -> None:
    from extproc.policy import ConfigError, parse_policy

    text = "version: 1\ndefault_model: m\nmodels: {m: {}}\npicking:\n  weights: {leader: 1, prefix_leader: 2}\n"
    with pytest.raises(ConfigError, match=r"picking\.weights"):
        parse_policy(text)
    alias = parse_policy(text.replace(", prefix_leader: 2", "")).picking
    named = parse_policy(text.replace("leader: 1, ", "")).picking
    from extproc.replicas.picking import weights

    assert weights(alias)["prefix_leader"] == 1 and weights(named)["prefix_leader"] == 2
