"""Prefix affinity: which replica most likely holds this prompt's prefix in its KV cache.

The rendered conversation is cut into blocks of B characters and hashed as a chain (each
block's hash covers everything before it), seeded with the model name. Each replica keeps a
bounded LRU of the chain hashes it has been sent; a replica's score is the fraction of the
prompt's leading blocks found in its index.
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
        n = 0
        for h in hashes:
            if h not in index:
                break
            n += 1
        return n

    def record(self, endpoint: str, hashes: list[int]) -> None:
        index = self._by_endpoint.get(endpoint)
        if index is None:
            index = self._by_endpoint[endpoint] = OrderedDict()
        for h in hashes:
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
