"""Token usage read from upstream responses, without buffering whole streams.

Non-streaming responses carry ``usage`` at the end of one JSON object; streams carry it in the
final event when the client asked for ``stream_options.include_usage`` (chat and completions)
or in ``response.completed`` (Responses API). Only the unfinished last line of a stream, or a
bounded tail of a JSON body, is kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_TAIL = 64 * 1024
_MAX_LINE = 1024 * 1024
_decoder = json.JSONDecoder()


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int
    output_tokens: int


class UsageMeter:
    """Fed response-body chunks in order; ``usage`` is the last usage object seen."""

    __slots__ = ("_buffer", "_sse", "usage")

    def __init__(self) -> None:
        self._buffer = b""
        self._sse: bool | None = None
        self.usage: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if self._sse is None:
            start = chunk.lstrip()[:6]
            self._sse = start.startswith((b"data:", b"event:", b":"))
        if self._sse:
            self._feed_lines(chunk)
        else:
            self._buffer = (self._buffer + chunk)[-_TAIL:]
            self._scan(self._buffer)

    def _feed_lines(self, chunk: bytes) -> None:
        data = self._buffer + chunk
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > _MAX_LINE:  # a runaway line carries no usage we could read
            self._buffer = b""
        for line in lines:
            if line.startswith(b"data:") and b'"usage"' in line:
                self._scan(line[5:])

    def _scan(self, data: bytes) -> None:
        at = data.rfind(b'"usage"')
        while at != -1:
            found = _usage_at(data, at)
            if found is not None:
                self.usage = found
                return
            at = data.rfind(b'"usage"', 0, at)


def _usage_at(data: bytes, at: int) -> Usage | None:
    colon = data.find(b":", at + 7)
    if colon == -1:
        return None
    try:
        text = data[colon + 1 :].decode("utf-8", "ignore").lstrip()
        value, _ = _decoder.raw_decode(text)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    prompt = value.get("prompt_tokens", value.get("input_tokens"))
    completion = value.get("completion_tokens", value.get("output_tokens"))
    if isinstance(prompt, int) and isinstance(completion, int) and prompt >= 0 and completion >= 0:
        return Usage(prompt, completion)
    return None
