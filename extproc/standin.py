"""Stand-in model servers: small OpenAI-compatible HTTP/1.1 servers for the demo, the tests and
the benchmarks. They answer at once (or after a set delay), stream SSE on request, report
usage, expose vLLM-style /metrics, and remember what they received. For fault tests they can
misbehave on LLM calls (``fault``, see FAULTS) or answer with large bodies.

With ``kv`` set, a stand-in also keeps a real LRU prefix cache of token blocks (the served model's
tokens, through the same chat template) and publishes vLLM's KV events for it over ZMQ, in vLLM's
wire format: BlockStored with vLLM's own block hashes, BlockRemoved on eviction,
AllBlocksCleared, sequence numbers and a replay socket."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson

# How a stand-in may misbehave on LLM calls (StandIn.fault).
FAULTS = {
    "reset": "drop the connection instead of answering",
    "garbage": "answer with bytes that are not HTTP",
    "cut": "send the headers and part of the body (of a stream: its first event), then drop the connection",
    "bad-length": "answer with two different content-lengths",
    "huge-headers": "answer with a 100 KiB header",
    "not-json": "answer 200 with an HTML body",
    # A server's keep-alive timeout (uvicorn's: 5 s) closing a connection as a request is sent on it.
    "close-reused": "drop a kept-alive connection when another request arrives on it",
}
if TYPE_CHECKING:
    from extproc.replicas.prompt_tokens import PromptTokenizer


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StandIn:
    """One replica. ``delay`` is the time to the first byte; ``chunk_delay`` spaces stream chunks."""

    name: str
    host: str = "127.0.0.1"
    port: int = 0
    delay: float = 0.0
    chunk_delay: float = 0.0
    chunks: int = 3
    status: int = 200  # answer every LLM call with this status (fault tests)
    gate: asyncio.Event | None = None  # streams pause after their first chunk until this is set
    fault: str = ""  # one of FAULTS, or "" to behave
    answer_bytes: int = 0  # pad each answer's text (or each stream event's) to this many bytes
    waiting: int = 0  # queue length reported on /metrics (as vLLM does)
    kv: KvCache | None = None  # a prefix cache that publishes vLLM's KV events
    received: collections.deque[Received] = field(default_factory=lambda: collections.deque(maxlen=2000))
    inflight: int = 0
    peak: int = 0  # most requests in flight at once
    served: int = 0
    _server: asyncio.Server | None = None
    _open: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.kv is not None:
            self.kv.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def kill(self) -> None:
        """Die as a crashed process does: stop listening and drop every open connection."""
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):
            writer.transport.abort()
        await self.stop()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            for served in itertools.count():
                request = await _read_request(reader)
                if request is None:
                    break
                self.received.append(request)
                if served and self.fault == "close-reused" and request.path.startswith("/v1/"):
                    writer.transport.abort()
                    break
                keep_alive = request.headers.get("connection", "").lower() != "close"
                await self._answer(request, writer)
                if not keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self._open.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, request: Received, writer: asyncio.StreamWriter) -> None:
        if request.path == "/metrics":
            text = (
                f'vllm:num_requests_running{{model_name="{self.name}"}} {self.inflight}\n'
                f'vllm:num_requests_waiting{{model_name="{self.name}"}} {self.waiting}\n'
                f'vllm:kv_cache_usage_perc{{model_name="{self.name}"}} 0.1\n'
            ).encode()
            return await _send(writer, 200, text, "text/plain; version=0.0.4", self.name)
        if request.path.startswith("/v1/models"):
            body = orjson.dumps({"object": "list", "data": [{"id": self.name, "object": "model"}]})
            return await _send(writer, 200, body, "application/json", self.name)
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            try:
                payload = orjson.loads(request.body) if request.body else {}
            except orjson.JSONDecodeError:
                payload = None
            if not isinstance(payload, dict):
                error = {"error": {"message": "invalid JSON", "type": "invalid_request_error"}}
                return await _send(writer, 400, orjson.dumps(error), "application/json", self.name)
            if self.fault and self.fault != "close-reused" and not (self.fault == "cut" and payload.get("stream")):
                return await self._misbehave(writer)
            if self.kv is not None and isinstance(payload.get("messages"), list):
                self.kv.serve(payload["messages"])
            if self.status != 200:
                error = {"error": {"message": f"stand-in {self.name} fails", "type": "server_error"}}
                return await _send(writer, self.status, orjson.dumps(error), "application/json", self.name)
            if payload.get("stream"):
                await self._stream(request.path, payload, writer)
            else:
                await _send(
                    writer, 200, orjson.dumps(self._completion(request.path, payload)), "application/json", self.name
                )
            self.served += 1
        finally:
            self.inflight -= 1

    async def _misbehave(self, writer: asyncio.StreamWriter) -> None:
        if self.fault == "reset":
            writer.transport.abort()
        elif self.fault == "garbage":
            writer.write(b"this is not HTTP\r\n\r\n")
            await writer.drain()
            writer.transport.abort()
        elif self.fault == "cut":
            writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4000\r\n\r\n{"id"')
            await writer.drain()
            writer.transport.abort()
        elif self.fault == "bad-length":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}")
            await writer.drain()
        elif self.fault == "huge-headers":
            writer.write(b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 100 * 1024 + b"\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
        elif self.fault == "not-json":
            await _send(writer, 200, b"<html><body>upstream proxy page</body></html>", "text/html", self.name)
        else:
            raise ValueError(f"unknown fault {self.fault!r}; one of {', '.join(FAULTS)}")

    def _text(self, text: str) -> str:
        return text + "." * (self.answer_bytes - len(text)) if self.answer_bytes > len(text) else text

    def _usage(self, payload: dict) -> dict[str, int]:
        prompt = len(orjson.dumps(payload.get("messages") or payload.get("prompt") or payload.get("input") or ""))
        return {
            "prompt_tokens": max(1, prompt // 4),
            "completion_tokens": 5 * self.chunks,
            "total_tokens": max(1, prompt // 4) + 5 * self.chunks,
        }

    def _completion(self, path: str, payload: dict) -> dict:
        text = self._text(f"answer from {self.name}")
        usage = self._usage(payload)
        if path.startswith("/v1/responses"):
            return {
                "id": "resp_1",
                "object": "response",
                "model": payload.get("model"),
                "status": "completed",
                "output": [
                    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}
                ],
                "usage": {
                    "input_tokens": usage["prompt_tokens"],
                    "output_tokens": usage["completion_tokens"],
                    "total_tokens": usage["total_tokens"],
                },
            }
        if path.startswith("/v1/completions"):
            return {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": payload.get("model"),
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                "usage": usage,
            }
        return {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": payload.get("model"),
            "replica": self.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage,
        }

    async def _stream(self, path: str, payload: dict, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
            + f"x-replica: {self.name}\r\n\r\n".encode()
        )
        model = payload.get("model")
        for i in range(self.chunks):
            event = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "model": model,
                "replica": self.name,
                "choices": [{"index": 0, "delta": {"content": self._text(f"part {i} ")}, "finish_reason": None}],
            }
            _chunk(writer, b"data: " + orjson.dumps(event) + b"\n\n")
            await writer.drain()
            if self.fault == "cut":
                writer.transport.abort()
                return
            if i == 0 and self.gate is not None:
                await self.gate.wait()
            if self.chunk_delay:
                await asyncio.sleep(self.chunk_delay)
        # As OpenAI and vLLM end a stream: a last chunk with an empty delta and the finish reason.
        end = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "model": model,
            "replica": self.name,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
        _chunk(writer, b"data: " + orjson.dumps(end) + b"\n\n")
        if (payload.get("stream_options") or {}).get("include_usage"):
            final = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [],
                "usage": self._usage(payload),
            }
            _chunk(writer, b"data: " + orjson.dumps(final) + b"\n\n")
        _chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


def _chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


async def _send(writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str, replica: str) -> None:
    reason = {
        200: "OK",
        400: "Bad Request",
        404: "Not Found",
        500: "Internal Server Error",
        503: "Service Unavailable",
    }.get(status, "Status")
    writer.write(
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
        f"x-replica: {replica}\r\n\r\n".encode()
        + body
    )
    await writer.drain()


async def _read_request(reader: asyncio.StreamReader) -> Received | None:
    line = await reader.readline()
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readline()
                break
            parts.append(await reader.readexactly(size))
            await reader.readline()
        body = b"".join(parts)
    else:
        body = b""
    return Received(method, path, headers, body)


class KvCache:
    """A model server's prefix cache, as vLLM's block pool keeps it: full blocks of
    ``block_size`` tokens keyed by vLLM's chained block hashes, ``capacity`` blocks, least recently
    used evicted first (a chain's tail before its head). Every change is published as vLLM
    publishes it (extproc/replicas/kvevents.py): a PUB socket on ``endpoint`` and a ROUTER for
    replays on ``replay_endpoint``; ``publish=False`` keeps the cache silent (a server without
    KV events)."""

    def __init__(
        self,
        tokenizer: PromptTokenizer,
        *,
        capacity: int = 4096,
        block_size: int = 16,
        algo: str = "sha256_cbor",
        seed: str = "0",
        host: str = "127.0.0.1",
        replay: bool = True,
        publish: bool = True,
        buffer_steps: int = 10_000,
    ) -> None:
        from extproc.replicas.kvevents import vllm_none_hash

        self.tokenizer = tokenizer
        self.capacity = capacity
        self.block_size = block_size
        self.algo = algo
        self._none_hash = vllm_none_hash(algo, seed)
        self.blocks: OrderedDict[bytes, None] = OrderedDict()  # least recently used first
        self.hits: list[int] = []  # cached tokens of each request served
        self.publisher = KvPublisher(host, replay=replay, buffer_steps=buffer_steps) if publish else None

    @property
    def endpoint(self) -> str:
        return self.publisher.endpoint if self.publisher else ""

    @property
    def replay_endpoint(self) -> str | None:
        return self.publisher.replay_endpoint if self.publisher else None

    def serve(self, messages: Sequence[dict]) -> int:
        """Prefill a chat request: reuse its cached leading blocks, store the rest, evict past
        capacity. Returns the tokens found cached."""
        return self.admit(self.tokenizer.chat(messages))

    def admit(self, tokens: Sequence[int]) -> int:
        from extproc.replicas.kvevents import BlockRemoved, BlockStored, vllm_block_hashes

        hashes = vllm_block_hashes(tokens, self.block_size, self.algo, parent=self._none_hash)
        matched = 0
        for h in hashes:
            if h not in self.blocks:
                break
            matched += 1
        events: list = []
        new = hashes[matched:]
        if new:
            size = self.block_size
            events.append(
                BlockStored(
                    tuple(new),
                    hashes[matched - 1] if matched else None,
                    tuple(tokens[matched * size : len(hashes) * size]),
                    size,
                    medium="GPU",
                )
            )
        for h in reversed(hashes):  # tail first: the head ends most recent, evicted last
            self.blocks[h] = None
            self.blocks.move_to_end(h)
        evicted = []
        while len(self.blocks) > self.capacity:
            evicted.append(self.blocks.popitem(last=False)[0])
        if evicted:
            events.append(BlockRemoved(tuple(evicted), medium="GPU"))
        self._publish(events)
        self.hits.append(matched * self.block_size)
        return matched * self.block_size

    def evict(self, n: int) -> None:
        """Evict the n least recently used blocks (memory pressure from traffic elsewhere)."""
        from extproc.replicas.kvevents import BlockRemoved

        evicted = [self.blocks.popitem(last=False)[0] for _ in range(min(n, len(self.blocks)))]
        if evicted:
            self._publish([BlockRemoved(tuple(evicted), medium="GPU")])

    def clear(self) -> None:
        from extproc.replicas.kvevents import AllBlocksCleared

        self.blocks.clear()
        self._publish([AllBlocksCleared()])

    def holds(self, tokens: Sequence[int]) -> int:
        """Leading tokens of a prompt this cache holds."""
        from extproc.replicas.kvevents import vllm_block_hashes

        n = 0
        for h in vllm_block_hashes(tokens, self.block_size, self.algo, parent=self._none_hash):
            if h not in self.blocks:
                break
            n += 1
        return n * self.block_size

    def _publish(self, events: list) -> None:
        if events and self.publisher is not None:
            from extproc.replicas.kvevents import EventBatch

            self.publisher.publish(EventBatch(time.time(), tuple(events)))

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()


class KvPublisher:
    """vLLM's ZmqEventPublisher in miniature: PUB ``(topic, seq, payload)`` from its own
    thread, the last ``buffer_steps`` batches kept for a ROUTER that replays them."""

    def __init__(self, host: str = "127.0.0.1", *, replay: bool = True, buffer_steps: int = 10_000, topic: str = ""):
        import zmq

        self._zmq = zmq
        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, 100_000)
        port = self._pub.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._replay = None
        self.replay_endpoint: str | None = None
        if replay:
            self._replay = self._context.socket(zmq.ROUTER)
            replay_port = self._replay.bind_to_random_port(f"tcp://{host}")
            self.replay_endpoint = f"tcp://{host}:{replay_port}"
        self._topic = topic.encode()
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=buffer_steps)
        self._queue: queue.Queue = queue.Queue()
        self.seq = 0
        self.drop_next = 0  # the next n batches get a sequence number but are never sent (a lossy link)
        self._running = True
        self._thread = threading.Thread(target=self._run, name="standin-kv-publisher", daemon=True)
        self._thread.start()

    def publish(self, batch) -> None:
        self._queue.put(batch)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every batch handed over so far is sent."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def _run(self) -> None:
        from extproc.replicas.kvevents import END_SEQ, encode_batch, seq_bytes

        zmq = self._zmq
        while self._running:
            if self._replay is not None and self._replay.poll(0):
                client, _, start = self._replay.recv_multipart()
                first = int.from_bytes(start, "big", signed=True)
                for seq, payload in list(self._buffer):
                    if seq >= first:
                        self._replay.send_multipart([client, b"", seq_bytes(seq), payload])
                self._replay.send_multipart([client, b"", seq_bytes(END_SEQ), b""])
            try:
                item = self._queue.get(timeout=0.01)
            except queue.Empty:
                continue
            if isinstance(item, threading.Event):
                item.set()
                continue
            payload = encode_batch(item)
            seq = self.seq
            self.seq += 1
            self._buffer.append((seq, payload))
            if self.drop_next > 0:
                self.drop_next -= 1
                continue
            with contextlib.suppress(zmq.ZMQError):
                self._pub.send_multipart([self._topic, seq_bytes(seq), payload])

    def close(self) -> None:
        self._running = False
        self._thread.join(2)
        self._context.destroy(linger=0)


class StandInFleet:
    """Several stand-ins served from one background thread, for synchronous callers."""

    def __init__(self, replicas: Iterable[StandIn]) -> None:
        self.replicas = {r.name: r for r in replicas}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="standins", daemon=True)

    def __enter__(self) -> StandInFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()
        for replica in self.replicas.values():
            asyncio.run_coroutine_threadsafe(replica.start(), self._loop).result(10)

    def stop(self) -> None:
        for replica in self.replicas.values():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(replica.stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __getitem__(self, name: str) -> StandIn:
        return self.replicas[name]

    def by_address(self) -> dict[str, StandIn]:
        return {r.address: r for r in self.replicas.values()}

    def call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)
