"""vLLM's KV events: wire format, vLLM's block hashes, the exact index, the ZMQ subscriber."""

from __future__ import annotations

import hashlib
import pickle
import time

import cbor2
import msgpack
import pytest

from extproc.replicas import kvevents
from extproc.replicas.kvevents import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    MalformedBatch,
    decode_batch,
    encode_batch,
    vllm_block_hashes,
)
from extproc.replicas.kvindex import KvIndex, Mode, PromptBlocks, chain, held_fractions
from extproc.replicas.kvsubscribe import KvEventSubscriber, Target
from extproc.standin import KvCache
from tests.harness import wait_for
from tests.kv.common import conversation, tokenizer

# --- wire format ------------------------------------------------------------------------------


def test_array_like_batches_round_trip() -> None:
    batch = EventBatch(
        12.5,
        (
            BlockStored((b"a" * 32, b"b" * 32), None, tuple(range(32)), 16, medium="GPU"),
            BlockRemoved((b"c" * 32,), "GPU"),
            AllBlocksCleared(),
        ),
    )
    assert decode_batch(encode_batch(batch)) == batch


def test_map_encoded_batches_and_int_hashes_decode() -> None:
    # The map form newer vLLM sources use, with 64-bit integer hashes (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES).
    payload = msgpack.packb(
        {
            "ts": 1.0,
            "events": [
                {
                    "type": "BlockStored",
                    "block_hashes": [7, 8],
                    "parent_block_hash": 6,
                    "token_ids": [1] * 8,
                    "block_size": 4,
                    "lora_id": None,
                    "medium": None,
                    "lora_name": None,
                },
                {"type": "BlockRemoved", "block_hashes": [7], "medium": None},
                {"type": "SomethingNew", "x": 1},
            ],
            "data_parallel_rank": 0,
        }
    )
    batch = decode_batch(payload)
    assert batch.events == (BlockStored((7, 8), 6, (1,) * 8, 4), BlockRemoved((7,)))
    assert batch.data_parallel_rank == 0


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # not msgpack
        msgpack.packb([1.0]),
        msgpack.packb([1.0, [["BlockStored", [1, 2], None, [1, 2, 3], 2]]]),  # 3 tokens for 2 blocks of 2
        msgpack.packb([1.0, [["BlockStored", [1.5], None, [1], 1]]]),  # a float hash
    ],
)
def test_malformed_batches_are_refused(payload: bytes) -> None:
    with pytest.raises(MalformedBatch):
        decode_batch(payload)


# --- vLLM's own hashes ---------------------------------------------------------------------------


def test_canonical_cbor_matches_cbor2() -> None:
    for value in [None, "1234", (b"\x00" * 32, (1, 23, 24, 255, 256, 65536, 2**32, 2**40), None), (-5, "x", [])]:
        assert kvevents._cbor(value) == cbor2.dumps(value, canonical=True)


def test_block_hashes_follow_hash_block_tokens() -> None:
    tokens = list(range(40))
    for algo, encode in (
        ("sha256", lambda v: pickle.dumps(v, protocol=pickle.HIGHEST_PROTOCOL)),
        ("sha256_cbor", lambda v: cbor2.dumps(v, canonical=True)),
    ):
        none = hashlib.sha256(encode("0")).digest()  # NONE_HASH with PYTHONHASHSEED=0
        first = hashlib.sha256(encode((none, tuple(range(16)), None))).digest()
        second = hashlib.sha256(encode((first, tuple(range(16, 32)), None))).digest()
        assert vllm_block_hashes(tokens, 16, algo, "0") == [first, second]  # the partial block is not hashed


# --- the index ------------------------------------------------------------------------------


def stored(tokens: list[int], size: int, hashes: list[bytes], parent: bytes | None = None, **kw) -> BlockStored:
    return BlockStored(tuple(hashes), parent, tuple(tokens), size, **kw)


def test_index_keys_by_the_tokens_not_by_vllms_hashes() -> None:
    index = KvIndex(warm_seconds=0)
    tokens = list(range(48))
    a, b = vllm_block_hashes(tokens, 16, seed="1"), vllm_block_hashes(tokens, 16, seed="2")
    for replica, hashes in (("r1", a), ("r2", b)):
        index.subscribe(replica)
        index.apply(replica, [stored(tokens[:32], 16, hashes[:2]), stored(tokens[32:], 16, hashes[2:], hashes[1])])
    prompt = PromptBlocks([*tokens, 99, 100])
    assert held_fractions(index, prompt, ["r1", "r2", "r3"]) == {
        "r1": (48 / 50, Mode.EXACT),
        "r2": (48 / 50, Mode.EXACT),
        "r3": (0.0, Mode.APPROXIMATE),
    }
    index.apply("r1", [BlockRemoved((a[1],))])  # the middle block: the prefix ends before it
    assert index.matched("r1", prompt.keys(16)) == 1
    index.apply("r2", [AllBlocksCleared()])
    assert index.matched("r2", prompt.keys(16)) == 0


def test_blocks_of_an_adapter_or_with_extra_keys_never_match_a_plain_prompt() -> None:
    index = KvIndex(warm_seconds=0)
    index.subscribe("r1")
    tokens = list(range(32))
    index.apply("r1", [stored(tokens, 16, [b"x", b"y"], lora_name="sql-adapter")])
    index.apply("r1", [stored(tokens, 16, [b"p", b"q"], extra_keys=(None, ("salt",)))])
    assert index.matched("r1", chain(tokens, 16)) == 1  # the salted block differs, and so on


def test_a_chain_whose_parent_was_never_seen_is_not_guessed() -> None:
    index = KvIndex(warm_seconds=0)
    index.subscribe("r1")
    index.apply("r1", [stored(list(range(16, 32)), 16, [b"child"], parent=b"unknown")])
    assert index.size("r1") == 0


def test_a_replica_is_approximate_until_its_history_is_known() -> None:
    now = [100.0]
    index = KvIndex(warm_seconds=30, clock=lambda: now[0])
    index.subscribe("r1")
    assert index.mode("r1") is Mode.APPROXIMATE
    now[0] += 31
    assert index.mode("r1") is Mode.EXACT
    index.reset("r1", complete=False)  # a gap that could not be replayed
    assert index.mode("r1") is Mode.APPROXIMATE
    index.reset("r1", complete=True)  # a publisher that restarted from 0
    assert index.mode("r1") is Mode.EXACT


def test_chain_keys_do_not_depend_on_the_process_hash_seed() -> None:
    import subprocess
    import sys

    code = "from extproc.replicas.kvindex import chain; print(chain(list(range(100)), 16))"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        ).stdout
        for seed in ("1", "2", "random")
    }
    assert len(outputs) == 1


# --- subscribing to a real publisher --------------------------------------------------------------


@pytest.fixture
def cache():
    kv = KvCache(tokenizer(), capacity=40, block_size=16)
    yield kv
    kv.close()


def follow(cache: KvCache, replay: bool = True) -> tuple[KvIndex, KvEventSubscriber, list[str]]:
    index = KvIndex(warm_seconds=0)
    seen: list[str] = []
    subscriber = KvEventSubscriber(index, on_event=lambda model, what: seen.append(what))
    subscriber.set_targets({"r1": Target(cache.endpoint, cache.replay_endpoint if replay else None, model="m")})
    return index, subscriber, seen


def in_sync(index: KvIndex, cache: KvCache) -> bool:
    cache.publisher.flush()
    return index.size("r1") == len(cache.blocks)


def test_the_index_follows_stores_and_evictions(cache) -> None:
    index, subscriber, _ = follow(cache)
    try:
        time.sleep(0.3)  # a SUB socket misses what is sent before it connects: the replay has it
        messages = conversation("lisbon", 2)
        cache.serve(messages)
        wait_for(lambda: in_sync(index, cache), timeout=5)
        prompt = PromptBlocks(tokenizer().chat(messages))
        assert index.matched("r1", prompt.keys(16)) * 16 == cache.holds(prompt.tokens) > 0
        cache.serve(conversation("kyoto", 3))  # over capacity: lisbon's blocks are evicted
        wait_for(lambda: in_sync(index, cache), timeout=5)
        assert index.matched("r1", prompt.keys(16)) * 16 == cache.holds(prompt.tokens)
        assert cache.holds(prompt.tokens) < len(prompt.tokens) // 2
    finally:
        subscriber.stop()


def test_a_gap_is_replayed_from_the_publisher(cache) -> None:
    index, subscriber, seen = follow(cache)
    try:
        cache.serve(conversation("a", 1))
        wait_for(lambda: in_sync(index, cache), timeout=5)
        cache.publisher.drop_next = 2  # lost on the way
        for topic in ("b", "c", "d"):
            cache.serve(conversation(topic, 1))
        wait_for(lambda: in_sync(index, cache) and "gap_replayed" in seen, timeout=5)
        assert index.mode("r1") is Mode.EXACT
    finally:
        subscriber.stop()


def test_a_gap_without_replay_drops_the_state_and_waits(cache) -> None:
    index, subscriber, seen = follow(cache, replay=False)
    index.warm_seconds = 60
    try:
        time.sleep(0.3)
        cache.serve(conversation("a", 1))
        wait_for(lambda: index.size("r1") > 0, timeout=5)
        cache.publisher.drop_next = 1
        cache.serve(conversation("b", 1))
        cache.serve(conversation("c", 1))
        wait_for(lambda: "gap_resynced" in seen, timeout=5)
        assert index.mode("r1") is Mode.APPROXIMATE
        assert index.size("r1") < len(cache.blocks)  # what came before the gap is unknown now
    finally:
        subscriber.stop()
