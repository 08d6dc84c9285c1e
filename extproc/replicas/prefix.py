"""Prefix affinity: which replica most likely holds this prompt's prefix in its KV cache.

The rendered conversation is cut into blocks of B characters and hashed as a chain (each
block's hash covers everything before it), seeded with the model name. Each replica keeps a
bounded LRU of the chain hashes it has been sent; a replica's score is the fraction of the
prompt's leading blocks found in its index.

A chain is recorded tail first, so a block is always more recent than the blocks after it and
the LRU evicts a chain from its tail, as vLLM evicts cached blocks. An index is therefore
prefix-closed (a block is present only if every block before it is), so the longest matched prefix
is found by binary search.
"""

from __future__ import annotations

from collections import OrderedDict


def block_hashes(model: str, text: str, block_chars: int) -> list[int]:
    """Chain hashes of the complete blocks of text. A trailing partial block is not cacheable."""
    out = []
    h = hash(model)
    for start in range(0, len(text) - block_chars + 1, block_chars):
        h = hash((h, text[start : start + block_chars]))
        out.append(h)
    return out


class PrefixIndex:
    """Per-replica LRU sets of block hashes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._by_endpoint: dict[str, OrderedDict[int, None]] = {}

    def matched_blocks(self, endpoint: str, hashes: list[int]) -> int:
        """Length of the longest prefix of hashes this replica was sent."""
        index = self._by_endpoint.get(endpoint)
        if not index:
            return 0
        # Prefix-closed, so "hashes[k - 1] is present" holds for every k up to the answer and none after.
        lo, hi = 0, len(hashes)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in index:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def record(self, endpoint: str, hashes: list[int]) -> None:
        index = self._by_endpoint.get(endpoint)
        if index is None:
            index = self._by_endpoint[endpoint] = OrderedDict()
        for h in reversed(hashes):  # tail first: see the module docstring
            if h in index:
                index.move_to_end(h)
            else:
                index[h] = None
        while len(index) > self.capacity:
            index.popitem(last=False)

    def forget(self, keep: set[str]) -> None:
        """Drop the indexes of replicas that left every pool."""
        for endpoint in [e for e in self._by_endpoint if e not in keep]:
            del self._by_endpoint[endpoint]

    def size(self, endpoint: str) -> int:
        return len(self._by_endpoint.get(endpoint, ()))
