"""Responses in (what a miss's model answered, mirrored by Envoy), stored answers out (a hit,
rendered as the API's JSON or SSE).

Only an answer that finished normally is kept: a 200 whose body is complete (a stream ends with
`data: [DONE]`), one choice, finish_reason `stop` (or `tool_calls` from a whole JSON response),
no error event, and no larger than the entry bound. Anything else, and every stream that is cut,
is dropped.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.request import Api

_FINISHED = frozenset({"stop", "tool_calls"})


@dataclass(frozen=True, slots=True)
class Answer:
    api: str  # Api value: chat.completions | completions
    model: str  # the model id the upstream reported
    content: str | None
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    tool_calls: list[Any] | None = None

    def dumps(self) -> bytes:
        return orjson.dumps(
            {
                "api": self.api,
                "model": self.model,
                "content": self.content,
                "finish_reason": self.finish_reason,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "tool_calls": self.tool_calls,
            }
        )

    @classmethod
    def loads(cls, data: bytes) -> Answer:
        return cls(**orjson.loads(data))


class Capture:
    """One miss's response as Envoy mirrors it: headers, then body chunks."""

    __slots__ = ("api", "chunks", "max_bytes", "size", "status", "streamed", "too_large")

    def __init__(self, api: str, max_bytes: int) -> None:
        self.api = api
        self.max_bytes = max_bytes
        self.chunks: list[bytes] = []
        self.size = 0
        self.status = 0
        self.streamed = False
        self.too_large = False

    def headers(self, status: int, content_type: str) -> bool:
        """Whether the body is worth reading: a 200 of JSON or SSE."""
        self.status = status
        media = content_type.split(";", 1)[0].strip().lower()
        self.streamed = media == "text/event-stream"
        return status == 200 and (self.streamed or media == "application/json")

    def feed(self, chunk: bytes) -> None:
        if self.too_large:
            return
        self.size += len(chunk)
        if self.size > self.max_bytes:
            self.too_large, self.chunks = True, []
            return
        self.chunks.append(chunk)

    def finish(self) -> Answer | str:
        """The answer, or why it is not stored."""
        if self.status != 200:
            return "status"
        if self.too_large:
            return "too_large"
        body = b"".join(self.chunks)
        try:
            return _from_events(self.api, body) if self.streamed else _from_json(self.api, body)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "unreadable"


def _usage(usage: Any) -> tuple[int, int]:
    if not isinstance(usage, dict):
        return 0, 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _from_json(api: str, body: bytes) -> Answer | str:
    doc = orjson.loads(body)
    if not isinstance(doc, dict) or "error" in doc:
        return "error"
    choices = doc.get("choices")
    if not isinstance(choices, list) or len(choices) != 1:
        return "choices"
    choice = choices[0]
    reason = choice.get("finish_reason")
    if reason not in _FINISHED:
        return "unfinished"
    prompt, completion = _usage(doc.get("usage"))
    model = str(doc.get("model") or "")
    if api == Api.CHAT:
        message = choice["message"]
        content, tool_calls = message.get("content"), message.get("tool_calls")
        if content is not None and not isinstance(content, str):
            return "unreadable"
        return Answer(api, model, content, reason, prompt, completion, tool_calls or None)
    text = choice.get("text")
    if not isinstance(text, str) or reason != "stop":
        return "unreadable"
    return Answer(api, model, text, reason, prompt, completion)


def _from_events(api: str, body: bytes) -> Answer | str:
    parts: list[str] = []
    reason: str | None = None
    prompt = completion = 0
    model = ""
    done = False
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        data = b"\n".join(line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:"))
        if not data:
            continue
        if data.strip() == b"[DONE]":
            done = True
            continue
        if done:
            return "unreadable"  # events after the end
        doc = orjson.loads(data)
        if not isinstance(doc, dict) or "error" in doc:
            return "error"
        model = str(doc.get("model") or model)
        if doc.get("usage"):
            prompt, completion = _usage(doc["usage"])
        for choice in doc.get("choices") or ():
            if choice.get("index", 0) != 0:
                return "choices"
            if api == Api.CHAT:
                delta = choice.get("delta") or {}
                if delta.get("tool_calls") or delta.get("function_call"):
                    return "tool_calls"  # streamed tool calls are not reassembled
                piece = delta.get("content")
            else:
                piece = choice.get("text")
            if isinstance(piece, str):
                parts.append(piece)
            if choice.get("finish_reason"):
                reason = choice["finish_reason"]
    if not done:
        return "truncated"
    if reason != "stop":
        return "unfinished"
    return Answer(api, model, "".join(parts), reason, prompt, completion)


def render(answer: Answer, *, stream: bool, include_usage: bool, prompt_tokens: int) -> tuple[str, bytes]:
    """(content type, body) of a hit. Usage is consistent: this request's prompt tokens, the
    stored answer's completion tokens, their sum; nothing was generated for it upstream."""
    created = int(time.time())
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": prompt_tokens + answer.completion_tokens,
    }
    chat = answer.api == Api.CHAT
    ident = ("chatcmpl-cache-" if chat else "cmpl-cache-") + secrets.token_hex(12)
    if not stream:
        if chat:
            message: dict[str, Any] = {"role": "assistant", "content": answer.content}
            if answer.tool_calls:
                message["tool_calls"] = answer.tool_calls
            choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": answer.finish_reason}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": answer.content or "", "finish_reason": answer.finish_reason}
            kind = "text_completion"
        doc = {"id": ident, "object": kind, "created": created, "model": answer.model, "choices": [choice]}
        return "application/json", orjson.dumps({**doc, "usage": usage})
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = {"id": ident, "object": kind, "created": created, "model": answer.model}

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**head, "choices": choices, **extra}) + b"\n\n"

    events = []
    if chat:
        if answer.tool_calls:
            raise ValueError("tool calls are served as JSON only")
        delta = {"role": "assistant", "content": answer.content or ""}
        events.append(event([{"index": 0, "delta": delta, "finish_reason": None}]))
        events.append(event([{"index": 0, "delta": {}, "finish_reason": answer.finish_reason}]))
    else:
        events.append(event([{"index": 0, "text": answer.content or "", "finish_reason": answer.finish_reason}]))
    if include_usage:
        events.append(event([], usage=usage))
    events.append(b"data: [DONE]\n\n")
    return "text/event-stream", b"".join(events)
