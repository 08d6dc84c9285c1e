"""Stand-in model servers: small OpenAI-compatible HTTP/1.1 servers for the demo, the tests and
the benchmarks. They answer at once (or after a set delay), stream SSE on request, report
usage, expose vLLM-style /metrics, and remember what they received. For fault tests they can
misbehave on LLM calls (``fault``, see FAULTS) or answer with large bodies."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

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
