"""PrefixIndex finds the longest matched prefix by binary search, which is only right if every
index stays prefix-closed (a block present only with all the blocks before it). These tests pin
that down against a plain linear scan, under eviction, for any order of recorded conversations."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.replicas.prefix import PrefixIndex, block_hashes


def linear_match(index: PrefixIndex, endpoint: str, hashes: list[int]) -> int:
    present = index._by_endpoint.get(endpoint, {})
    n = 0
    for h in hashes:
        if h not in present:
            break
        n += 1
    return n


def conversation(system: int, turns: list[int]) -> str:
    # Conversations share system prompts and grow turn by turn, as chats do.
    return f"system prompt {system} " * 12 + "".join(f"turn {t} of {system} " * 5 for t in turns)


conversations = st.tuples(st.integers(0, 2), st.lists(st.integers(0, 6), max_size=8))


@settings(max_examples=300, deadline=None)
@given(
    capacity=st.integers(1, 40),
    recorded=st.lists(st.tuples(st.sampled_from("ab"), conversations), max_size=40),
    probes=st.lists(conversations, min_size=1, max_size=10),
)
def test_binary_search_matches_a_linear_scan_under_eviction(capacity, recorded, probes) -> None:
    index = PrefixIndex(capacity)
    for endpoint, (system, turns) in recorded:
        index.record(endpoint, block_hashes("m", conversation(system, turns), 16))
        assert index.size(endpoint) <= capacity
    for system, turns in probes:
        blocks = block_hashes("m", conversation(system, turns), 16)
        for endpoint in "ab":
            assert index.matched_blocks(endpoint, blocks) == linear_match(index, endpoint, blocks)


def test_a_chain_is_evicted_from_its_tail() -> None:
    index = PrefixIndex(capacity=10)
    blocks = block_hashes("m", conversation(0, [1, 2, 3]), 16)
    assert len(blocks) > 10
    index.record("r", blocks)
    assert index.size("r") == 10
    assert index.matched_blocks("r", blocks) == 10  # the head survives, not the tail
