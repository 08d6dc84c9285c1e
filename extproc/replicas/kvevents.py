"""vLLM's KV-cache events on the wire, and vLLM's own block hashes.

vLLM (``--kv-events-config '{"enable_kv_cache_events": true, "publisher": "zmq", ...}'``)
publishes from each engine a ZMQ PUB stream of three-frame messages ``(topic, seq, payload)``:
``seq`` is an 8-byte big-endian counter from 0, ``payload`` a msgpack-encoded ``KVEventBatch``
(msgspec structs): ``(ts, events, data_parallel_rank)``, each event one of

* ``BlockStored(block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium,
  lora_name, extra_keys, group_idx, ...)``: full blocks that entered the prefix cache, in chain
  order; ``token_ids`` holds ``block_size`` tokens per block;
* ``BlockRemoved(block_hashes, medium, group_idx)``: blocks evicted;
* ``AllBlocksCleared()``: the cache was reset.

The structs are tagged (``tag=True``: the tag is the class name) and, in the releases that
ship them so far, ``array_like``: an event is ``["BlockStored", hashes, parent, tokens, ...]``
with trailing default fields omitted. Newer sources encode them as maps (``{"type":
"BlockStored", "block_hashes": ...}``); both are read here. Block hashes are 32-byte sha256
digests (vLLM >= 0.11), or 64-bit integers (earlier releases, or
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``); the router only compares them for equality.

A ROUTER socket (``replay_endpoint``) answers a request ``(b"", start_seq)`` from a DEALER with
every buffered ``(b"", seq, payload)`` from ``start_seq`` on, then ``(b"", -1, b"")``.

``vllm_block_hashes`` is vLLM's ``hash_block_tokens`` chain (sha256 over pickle, or over
canonical CBOR for ``--prefix-caching-hash-algo sha256_cbor``, from ``NONE_HASH`` derived from
``PYTHONHASHSEED``): the stand-in model servers publish real hashes with it. The router itself
does not need it (extproc/replicas/kvindex.py indexes the token ids the events carry).
"""

from __future__ import annotations

import hashlib
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

ExternalHash = bytes | int
END_SEQ = -1


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[ExternalHash, ...]
    parent_block_hash: ExternalHash | None
    token_ids: tuple[int, ...]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: tuple[Any, ...] | None = None  # per block; any non-None entry: not plain tokens


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[ExternalHash, ...]
    medium: str | None = None


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    ts: float  # the publisher's wall clock (time.time()) when the batch was made
    events: tuple[Event, ...]
    data_parallel_rank: int | None = None


class MalformedBatch(ValueError):
    """A payload that is not a KV event batch in any format vLLM has used."""


_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name")


def decode_batch(payload: bytes) -> EventBatch:
    """One msgpack payload -> EventBatch. Unknown event types are skipped (a newer vLLM may add
    some); a known one with the wrong shape raises MalformedBatch."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedBatch(f"not msgpack: {exc}") from None
    if isinstance(raw, dict):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, list) and len(raw) >= 2:
        ts, events, rank = raw[0], raw[1], raw[2] if len(raw) > 2 else None
    else:
        raise MalformedBatch("a batch is (ts, events[, data_parallel_rank])")
    if not isinstance(ts, (int, float)) or not isinstance(events, list):
        raise MalformedBatch("a batch is (ts, events[, data_parallel_rank])")
    out = []
    for event in events:
        decoded = _event(event)
        if decoded is not None:
            out.append(decoded)
    return EventBatch(float(ts), tuple(out), rank if isinstance(rank, int) else None)


def _event(raw: Any) -> Event | None:
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        kind, values = raw[0], raw[1:]
        fields: dict[str, Any] = {}
        names = (*_STORED_FIELDS, "extra_keys") if kind == "BlockStored" else ("block_hashes", "medium")
        fields = dict(zip(names, values, strict=False))
    elif isinstance(raw, dict) and isinstance(raw.get("type"), str):
        kind, fields = raw["type"], raw
    else:
        raise MalformedBatch("an event is a tagged array or map")
    try:
        if kind == "BlockStored":
            hashes = _hashes(fields["block_hashes"])
            tokens = tuple(int(t) for t in fields["token_ids"])
            size = fields["block_size"]
            if isinstance(size, list) and size:  # the first releases sent num_toks_per_block per block
                size = size[0]
            size = int(size)
            if size <= 0 or len(tokens) != size * len(hashes):
                raise MalformedBatch(f"BlockStored: {len(tokens)} token ids for {len(hashes)} blocks of {size}")
            parent = fields.get("parent_block_hash")
            extra = fields.get("extra_keys")
            return BlockStored(
                hashes,
                _hash(parent) if parent is not None else None,
                tokens,
                size,
                fields.get("lora_id"),
                fields.get("medium"),
                fields.get("lora_name"),
                tuple(extra) if isinstance(extra, list) else None,
            )
        if kind == "BlockRemoved":
            return BlockRemoved(_hashes(fields["block_hashes"]), fields.get("medium"))
        if kind == "AllBlocksCleared":
            return AllBlocksCleared()
    except (KeyError, TypeError) as exc:
        raise MalformedBatch(f"{kind}: {exc}") from None
    return None  # an event type this router does not know


def _hash(value: Any) -> ExternalHash:
    if isinstance(value, (bytes, int)) and not isinstance(value, bool):
        return value
    raise MalformedBatch(f"a block hash is bytes or an integer, not {type(value).__name__}")


def _hashes(values: Any) -> tuple[ExternalHash, ...]:
    if not isinstance(values, list):
        raise MalformedBatch("block_hashes is a list")
    return tuple(_hash(v) for v in values)


def encode_batch(batch: EventBatch) -> bytes:
    """The payload vLLM's array-like msgspec structs make (trailing defaults omitted)."""
    events = []
    for event in batch.events:
        if isinstance(event, BlockStored):
            fields = [
                list(event.block_hashes),
                event.parent_block_hash,
                list(event.token_ids),
                event.block_size,
                event.lora_id,
                event.medium,
                event.lora_name,
            ]
            if event.extra_keys is not None:
                fields.append(list(event.extra_keys))
            events.append(["BlockStored", *fields])
        elif isinstance(event, BlockRemoved):
            events.append(["BlockRemoved", list(event.block_hashes), event.medium])
        else:
            events.append(["AllBlocksCleared"])
    body: list[Any] = [batch.ts, events]
    if batch.data_parallel_rank is not None:
        body.append(batch.data_parallel_rank)
    return msgpack.packb(body, use_bin_type=True)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


def read_seq(frame: bytes) -> int:
    if len(frame) != 8:
        raise MalformedBatch(f"a sequence number is 8 bytes, not {len(frame)}")
    return int.from_bytes(frame, "big", signed=True)


# --- vLLM's block hashes (vllm/v1/core/kv_cache_utils.py: hash_block_tokens, init_none_hash) ---


def _cbor(value: Any) -> bytes:
    """Canonical CBOR (RFC 8949 4.2.1) of None, ints, str, bytes and tuples/lists: the subset
    hash_block_tokens feeds cbor2.dumps(..., canonical=True)."""
    if value is None:
        return b"\xf6"
    if isinstance(value, bool):
        return b"\xf5" if value else b"\xf4"
    if isinstance(value, int):
        return _cbor_head(0, value) if value >= 0 else _cbor_head(1, -1 - value)
    if isinstance(value, bytes):
        return _cbor_head(2, len(value)) + value
    if isinstance(value, str):
        data = value.encode()
        return _cbor_head(3, len(data)) + data
    if isinstance(value, (tuple, list)):
        return _cbor_head(4, len(value)) + b"".join(_cbor(v) for v in value)
    raise TypeError(f"no canonical CBOR here for {type(value).__name__}")


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | info]) + struct.pack(fmt, n)
    raise ValueError("integer too large for CBOR's 64-bit head")


def vllm_hash_function(algo: str):
    """vLLM's ``--prefix-caching-hash-algo``: sha256 (pickle) or sha256_cbor."""
    if algo == "sha256":
        return lambda value: hashlib.sha256(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).digest()
    if algo == "sha256_cbor":
        return lambda value: hashlib.sha256(_cbor(value)).digest()
    raise ValueError(f"hash algorithm {algo!r}: sha256 or sha256_cbor")


def vllm_none_hash(algo: str, seed: str) -> bytes:
    """NONE_HASH, the parent of a chain's first block, for ``PYTHONHASHSEED=seed`` (unset, vLLM
    draws it at random per process: no one else can reproduce its hashes)."""
    return vllm_hash_function(algo)(seed)


def vllm_block_hashes(
    tokens: Sequence[int], block_size: int, algo: str = "sha256_cbor", seed: str = "0", parent: bytes | None = None
) -> list[bytes]:
    """The chain vLLM's request_block_hasher computes for a prompt without LoRA, images or cache
    salt (extra_keys None): hash((parent, tuple(block tokens), None)) per full block."""
    function = vllm_hash_function(algo)
    h = parent if parent is not None else vllm_none_hash(algo, seed)
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        h = function((h, tuple(tokens[start : start + block_size]), None))
        out.append(h)
    return out
