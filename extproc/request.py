"""OpenAI-style request bodies in; prompt messages out; the body with a new ``model`` back.

The body is parsed once (orjson, strict). The rewrite splices the new model name into the
original bytes, so every other byte the client sent reaches the upstream unchanged.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import itertools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple
from urllib.parse import unquote

import orjson

from extproc.errors import BadRequest


class Api(StrEnum):
    CHAT = "chat.completions"
    COMPLETIONS = "completions"
    RESPONSES = "responses"


CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
RESPONSES_PATH = "/v1/responses"
API_PATHS: dict[str, Api] = {CHAT_PATH: Api.CHAT, COMPLETIONS_PATH: Api.COMPLETIONS, RESPONSES_PATH: Api.RESPONSES}


# What a client sent to a path that only resembles an LLM path is told (by Envoy and the router).
UNKNOWN_PATH_MESSAGE = (
    f"unknown path; LLM calls go to exactly {', '.join(sorted(API_PATHS))} "
    "(lower case, no trailing slash, path parameters or escapes)"
)
_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def api_for_path(path: str) -> Api | None:
    """The API a request path calls: only an exact LLM path (the query string may vary), the one
    form Envoy's routes send to the router. None for everything else."""
    return API_PATHS.get(path.split("?", 1)[0])


def looks_like_llm_path(path: str) -> bool:
    """True for a path that is not exactly an LLM path but that some server might serve as one:
    once percent-decoded (repeatedly), lower-cased, with backslashes as slashes, ;params, dot
    segments, control characters and repeated slashes removed, it starts with an LLM path. The
    router refuses these instead of letting them through unrouted (Envoy does the same in its
    ``llm-path-variant`` route; README "Paths")."""
    if api_for_path(path) is not None:
        return False
    text = path.split("?", 1)[0].split("#", 1)[0]
    for _ in range(4):  # %2563 -> %63 -> c
        decoded = unquote(text, errors="replace")
        if decoded == text:
            break
        text = decoded
    text = _CONTROL.sub("", text.replace("\\", "/")).lower()
    segments: list[str] = []
    for segment in text.split("/"):
        segment = segment.split(";", 1)[0]
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    canonical = "/" + "/".join(segments)
    return any(canonical.startswith(p) for p in API_PATHS)


class Message(NamedTuple):
    """One turn of the prompt as plain text. Non-text parts (images, audio) are left out.
    (A named tuple: a body may hold 100,000 of them, and a frozen dataclass costs three times
    as much to create.)

    A message of several text parts (content parts, tool-call fields) is their texts joined by
    newlines; `breaks` holds the offsets of those joining newlines. A server's chat template may
    instead concatenate parts directly, which PII detection also reads (``joined``).
    """

    role: str
    text: str
    breaks: tuple[int, ...] = ()

    def joined(self) -> str:
        """The parts concatenated with nothing between them."""
        if not self.breaks:
            return self.text
        bounds = (-1, *self.breaks, len(self.text))
        return "".join(self.text[a + 1 : b] for a, b in itertools.pairwise(bounds))

    def joined_starts(self) -> list[int]:
        """Where parts 1.. begin in ``joined()``: computed once for many ``from_joined`` calls
        (a message may have thousands of parts)."""
        return [b - k for k, b in enumerate(self.breaks)]

    def from_joined(self, offset: int, starts: list[int] | None = None) -> int:
        """The offset in `text` of offset `offset` of ``joined()`` (``starts``: joined_starts())."""
        return offset + bisect.bisect_right(self.joined_starts() if starts is None else starts, offset)

    def crosses_break(self, start: int, end: int) -> bool:
        """Whether text[start:end] spans a joining newline (two parts)."""
        i = bisect.bisect_right(self.breaks, start)
        return i < len(self.breaks) and self.breaks[i] < end


@dataclass(slots=True)
class LLMRequest:
    api: Api
    raw: bytes
    body: dict[str, Any]
    model: str
    messages: tuple[Message, ...]
    stream: bool
    model_span: tuple[int, int]  # bytes of the model value, quotes included
    pieces: tuple[Pieces, ...]  # where each message's text lives in body
    unreadable: tuple[str, ...] = ()  # fields the model reads that the router cannot (token ids)

    @property
    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message.role == "user":
                return message.text
        return self.messages[-1].text if self.messages else ""

    def with_model(self, model: str) -> bytes:
        """The original bytes with only the top-level ``model`` value replaced."""
        if model == self.model:
            return self.raw
        start, end = self.model_span
        return b"".join((self.raw[:start], orjson.dumps(model), self.raw[end:]))


def model_span(request: LLMRequest, body: bytes, model: str) -> tuple[int, int]:
    """Where the model value (quotes included) is in ``body``, the request's bytes sent with
    ``model`` (by ``with_model`` or ``redact``): a chained request's later attempts splice
    theirs there (extproc/envoy/render/chains.py)."""
    if body is request.raw:
        return request.model_span
    start = request.model_span[0]
    if body[:start] == request.raw[:start] and body[start:].startswith(orjson.dumps(model)):
        return start, start + len(orjson.dumps(model))
    # Serialized again (a redaction): find the one top-level key; the prompt may spell "model".
    spans = _single_model_span(body) or _top_level_scan(body, ())[0]
    return spans[0]


def parse(api: Api, raw: bytes) -> LLMRequest:
    """Parse and check a request body. Raises BadRequest with a message a client can act on."""
    with _collector_paused():
        return _parse(api, raw)


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Every object a body becomes lives until the request ends, so the cyclic garbage collector,
    run again and again while they are built, only walks them: with it paused, 100,000 messages
    parse three times faster. (Nested or concurrent use only re-enables it early.)"""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _parse(api: Api, raw: bytes) -> LLMRequest:
    if not raw:
        raise BadRequest("request body is empty; send a JSON object with a 'model' field")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # orjson's message names the position and the problem, never the content.
        raise BadRequest(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object", code="invalid_json")
    model = body.get("model")
    if model is None:
        raise BadRequest("missing required field 'model'", param="model")
    if not isinstance(model, str):
        raise BadRequest("'model' must be a string", param="model", code="invalid_type")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream", code="invalid_type")
    messages, pieces = _EXTRACTORS[api](body)
    spans = _single_model_span(raw)
    twice = None
    if spans is None or _may_repeat(raw, _PROMPT_FIELDS[api]):
        spans, twice = _top_level_scan(raw, _PROMPT_FIELDS[api])
    # Parsers disagree on which duplicate wins (Python's json and orjson: the last; RapidJSON and
    # simdjson lookups: the first): the upstream might serve a model we did not pick, or read a
    # prompt we did not check.
    if len(spans) != 1:
        raise BadRequest("'model' appears more than once in the request body", param="model")
    if twice is not None:
        raise BadRequest(f"'{twice}' appears more than once in the request body", param=twice)
    return LLMRequest(
        api,
        raw,
        body,
        model,
        messages,
        bool(stream),
        spans[0],
        pieces,
        _unreadable(api, body),
    )


def render(messages: tuple[Message, ...]) -> str:
    """The conversation as one text, in order: what keyword rules and prefix hashing see."""
    return "".join(f"<{m.role}>\n{m.text}\n" for m in messages)


# --- prompt extraction, one function per API --------------------------------------------------
#
# Each extractor returns, per message, its role and the places its text lives in the parsed
# body ("pieces": a container and a key). The text is read from them now; redaction writes to
# them later. Every text a model reads is extracted (so the PII policy sees it), not only the
# turns: a message's name and reasoning, tool definitions, a completion's suffix, Responses
# items of any type. Images, audio and files are not text and are left out.

Piece = tuple[Any, Any]  # (dict or list, key or index) holding a string
Extracted = list[tuple[str, list[Piece]]]
# A message's pieces; a message object alone stands for its "content" string (the common shape,
# without a list and a tuple per message).
Pieces = list[Piece] | dict[str, Any]
Built = tuple[tuple[Message, ...], tuple[Pieces, ...]]


def _chat_messages(body: dict[str, Any]) -> Built:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be an array of message objects", param="messages")
    if not messages:
        raise BadRequest("'messages' must contain at least one message", param="messages")
    out: list[Message] = []
    where: list[Pieces] = []
    add, locate = out.append, where.append
    for i, message in enumerate(messages):
        if type(message) is dict and len(message) == 2:
            # The common shape (a string role and content, nothing else) built directly, without
            # the checks' per-message allocations: 100,000 messages in ~25 ms, not ~90.
            role, content = message.get("role"), message.get("content")
            if type(role) is str and type(content) is str:
                add(_new_message(Message, (role, content, ())))
                locate(message)
                continue
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"'{param}' must be an object", param=param, code="invalid_type")
        role = message.get("role")
        if not isinstance(role, str):
            raise BadRequest(f"'{param}.role' must be a string", param=f"{param}.role")
        pieces = _content_pieces(message, "content", f"{param}.content")
        pieces.extend(_string_fields(message, _MESSAGE_TEXT, param))
        pieces.extend(_tool_call_pieces(message, param))
        add(_message(role, pieces))
        locate(pieces)
    tools = _built(_tool_definitions(body, ("tools", "functions")))
    return (*out, *tools[0]), (*where, *tools[1])


_new_message = tuple.__new__  # Message's own __new__ is a Python function: twice the cost


# Message fields besides content that chat templates render (a participant's name, an
# assistant's refusal, the reasoning a reasoning model's template replays).
_MESSAGE_TEXT = ("name", "refusal", "reasoning_content", "reasoning")
TOOLS_ROLE = "tools"  # the role of the tool definitions, one more message after the conversation


def _string_fields(holder: dict[str, Any], fields: tuple[str, ...], param: str = "") -> list[Piece]:
    pieces: list[Piece] = []
    for field in fields:
        value = holder.get(field)
        if isinstance(value, str):
            pieces.append((holder, field))
        elif value is not None:
            name = f"{param}.{field}" if param else field
            raise BadRequest(f"'{name}' must be a string", param=name, code="invalid_type")
    return pieces


def _tool_definitions(body: dict[str, Any], keys: tuple[str, ...]) -> Extracted:
    """Every string in the tool definitions (names, descriptions, parameter schemas), which a
    chat template renders into the prompt: one message after the conversation."""
    pieces = [piece for key in keys if key in body for piece in _strings(body, key)]
    return [(TOOLS_ROLE, pieces)] if pieces else []


def _strings(container: Any, key: Any, skip: frozenset[str] = frozenset()) -> list[Piece]:
    """The places of every string under container[key] (iteratively: JSON nests up to 1024)."""
    pieces: list[Piece] = []
    stack = [(container, key)]
    while stack:
        holder, at = stack.pop()
        value = holder[at]
        if isinstance(value, str):
            pieces.append((holder, at))
        elif isinstance(value, dict):
            stack.extend((value, k) for k in reversed(value) if k not in skip)
        elif isinstance(value, list):
            stack.extend((value, j) for j in reversed(range(len(value))))
    return pieces


def _tool_call_pieces(message: dict[str, Any], param: str) -> list[Piece]:
    calls = message.get("tool_calls")
    if calls is None:
        calls = [{"function": message["function_call"]}] if "function_call" in message else []
    if not isinstance(calls, list):
        raise BadRequest(f"'{param}.tool_calls' must be an array", param=f"{param}.tool_calls")
    pieces: list[Piece] = []
    for call in calls:
        for kind, fields in (("function", ("name", "arguments")), ("custom", ("name", "input"))):
            function = call.get(kind) if isinstance(call, dict) else None
            if isinstance(function, dict):
                pieces.extend((function, k) for k in fields if isinstance(function.get(k), str))
    return pieces


def _content_pieces(holder: dict[str, Any], key: str, param: str) -> list[Piece]:
    """Text of a content field: a string, null, or an array of typed parts."""
    content = holder.get(key)
    if content is None:
        return []
    if isinstance(content, str):
        return [(holder, key)]
    if not isinstance(content, list):
        raise BadRequest(f"'{param}' must be a string or an array of content parts", param=param)
    pieces: list[Piece] = []
    for j, part in enumerate(content):
        if isinstance(part, str):  # the Responses API and some clients allow bare strings
            pieces.append((content, j))
            continue
        if not isinstance(part, dict):
            raise BadRequest(f"'{param}[{j}]' must be an object", param=f"{param}[{j}]")
        for field in ("text", "refusal"):
            value = part.get(field)
            if isinstance(value, str):
                pieces.append((part, field))
            elif value is not None:
                raise BadRequest(f"'{param}[{j}].{field}' must be a string", param=f"{param}[{j}].{field}")
        # image_url, input_audio, file and other parts carry no text to route on
    return pieces


def _completion_messages(body: dict[str, Any]) -> Extracted:
    # The suffix (fill-in-the-middle) is read with every prompt.
    suffix = [("user", pieces) for pieces in [_string_fields(body, ("suffix",))] if pieces]
    prompt = body.get("prompt", "")
    if isinstance(prompt, str):
        return [("user", [(body, "prompt")] if "prompt" in body else []), *suffix]
    if isinstance(prompt, list):
        if all(isinstance(p, str) for p in prompt):
            return [*([("user", [(prompt, i)]) for i in range(len(prompt))] or [("user", [])]), *suffix]
        if _token_ids(prompt):
            return [("user", []), *suffix]  # token ids: nothing to read (LLMRequest.unreadable)
    raise BadRequest(
        "'prompt' must be a string, an array of strings, or token ids", param="prompt", code="invalid_type"
    )


def _token_ids(prompt: list[Any]) -> bool:
    return all(isinstance(p, int) for p in prompt) or all(
        isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt
    )


def _unreadable(api: Api, body: dict[str, Any]) -> tuple[str, ...]:
    """Fields a model reads that hold no text the router can read: token ids and embeddings."""
    if api is not Api.COMPLETIONS:
        return ()
    prompt = body.get("prompt")
    ids = isinstance(prompt, list) and bool(prompt) and _token_ids(prompt)
    return (*(["prompt"] if ids else []), *(["prompt_embeds"] if body.get("prompt_embeds") is not None else []))


def _responses_messages(body: dict[str, Any]) -> Extracted:
    out: Extracted = []
    instructions = body.get("instructions")
    if isinstance(instructions, str):
        out.append(("system", [(body, "instructions")]))
    elif instructions is not None:
        raise BadRequest("'instructions' must be a string", param="instructions", code="invalid_type")
    items = body.get("input", "")
    if isinstance(items, str):
        out.append(("user", [(body, "input")] if "input" in body else []))
        return out + _tool_definitions(body, ("tools",))
    if not isinstance(items, list):
        raise BadRequest("'input' must be a string or an array of items", param="input", code="invalid_type")
    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"'{param}' must be an object", param=param, code="invalid_type")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str):
                raise BadRequest(f"'{param}.role' must be a string", param=f"{param}.role")
            out.append((role, _content_pieces(item, "content", f"{param}.content")))
        elif kind == "function_call":
            out.append(("assistant", [(item, k) for k in ("name", "arguments") if isinstance(item.get(k), str)]))
        elif kind == "function_call_output":
            out.append(("tool", _content_pieces(item, "output", f"{param}.output")))
        elif kind != "item_reference":
            # Tool calls and their outputs of other kinds (custom, MCP, shell), reasoning and
            # item types yet to come: every string but identifiers and opaque payloads.
            pieces = [p for k in item if k not in _OPAQUE for p in _strings(item, k, _OPAQUE)]
            if pieces:
                out.append(("tool" if kind.endswith("_output") else "assistant", pieces))
    return out + _tool_definitions(body, ("tools",))


# Fields of Responses items that hold identifiers or payloads no model reads as text.
_OPAQUE = frozenset(
    {"id", "type", "call_id", "status", "role", "encrypted_content", "image_url", "file_data", "file_id"}
)


_EXTRACTORS: dict[Api, Callable[[dict[str, Any]], Built]] = {
    Api.CHAT: _chat_messages,
    Api.COMPLETIONS: lambda body: _built(_completion_messages(body)),
    Api.RESPONSES: lambda body: _built(_responses_messages(body)),
}


def _built(extracted: Extracted) -> Built:
    return tuple(_message(role, pieces) for role, pieces in extracted), tuple(p for _, p in extracted)


def _message(role: str, pieces: list[Piece]) -> Message:
    if len(pieces) < 2:
        return Message(role, pieces[0][0][pieces[0][1]] if pieces else "")
    texts = [container[key] for container, key in pieces]
    breaks, at = [], -1
    for t in texts[:-1]:
        at += len(t) + 1
        breaks.append(at)
    return Message(role, "\n".join(texts), tuple(breaks))


def redact(request: LLMRequest, spans: Mapping[int, Sequence[tuple[int, int, str]]], model: str) -> bytes:
    """The body with each (start, end, placeholder) span of message i replaced, and the new model.

    Offsets are in the message's text (its pieces joined by newlines). The body is serialized
    again, so unlike a plain model rewrite its formatting is orjson's.
    """
    for index, replacements in spans.items():
        offset = 0
        pieces = request.pieces[index]
        ordered = sorted(replacements)
        first = 0  # replacements ending before this piece are done: each piece looks at its own only
        for container, key in [(pieces, "content")] if type(pieces) is dict else pieces:
            text = container[key]
            end_of_piece = offset + len(text)
            while first < len(ordered) and ordered[first][1] <= offset:
                first += 1
            edits = []
            k = first
            while k < len(ordered) and ordered[k][0] < end_of_piece:
                s, e, p = ordered[k]
                if e > offset:
                    edits.append((max(s, offset) - offset, min(e, end_of_piece) - offset, p))
                k += 1
            if edits:
                parts, at = [], 0
                for start, end, placeholder in edits:
                    parts += (text[at:start], placeholder)
                    at = max(at, end)
                container[key] = "".join((*parts, text[at:]))
            offset = end_of_piece + 1
    request.body["model"] = model
    return orjson.dumps(request.body)


# --- locating the top-level "model" value in the raw bytes ------------------------------------

_COLON = re.compile(rb"\s*:\s*")


def _depth_change(segment: bytes) -> int:
    return segment.count(b"{") + segment.count(b"[") - segment.count(b"}") - segment.count(b"]")


def _string_end(raw: bytes, start: int) -> int:
    """Index of the quote closing the string that opens at ``start``."""
    end = raw.find(b'"', start + 1)
    while True:
        backslashes = 0
        while raw[end - 1 - backslashes] == 0x5C:  # an odd run of backslashes escapes the quote
            backslashes += 1
        if backslashes % 2 == 0:
            return end
        end = raw.find(b'"', end + 1)


# Top-level fields a model reads the prompt from, per API: each must appear once.
_PROMPT_FIELDS: dict[Api, tuple[str, ...]] = {
    Api.CHAT: ("messages", "tools", "functions"),
    Api.COMPLETIONS: ("prompt", "suffix"),
    Api.RESPONSES: ("input", "instructions", "tools"),
}
_FIELD_TOKENS = {name: f'"{name}"'.encode() for names in _PROMPT_FIELDS.values() for name in names}


def _may_repeat(raw: bytes, names: tuple[str, ...]) -> bool:
    """False when no field of names can be a key twice: its token appears at most once, and (as
    _single_model_span has checked) no \\u escape could spell it otherwise."""
    return any(raw.count(_FIELD_TOKENS[name]) > 1 for name in names)


def _top_level_scan(raw: bytes, names: tuple[str, ...]) -> tuple[list[tuple[int, int]], str | None]:
    """Byte spans of the values of every top-level "model" key (string values, quotes included;
    (-1, -1) for others), and the first of names found twice as a top-level key (or None).

    Only called on a body orjson accepted, so the scan never sees malformed JSON. It jumps from
    quote to quote (memchr speed) and tracks nesting from the brackets in between, so a long
    prompt costs a few string searches, not a character-by-character walk. A string at the top
    level followed by a colon is a key (a value is followed by a comma or the closing brace).
    """
    spans: list[tuple[int, int]] = []
    seen: set[str] = set()
    twice = None
    depth = 0
    pos = 0
    while True:
        quote = raw.find(b'"', pos)
        if quote == -1:
            return spans, twice
        depth += _depth_change(raw[pos:quote])
        end = _string_end(raw, quote)
        pos = end + 1
        if depth != 1:
            continue
        colon = _COLON.match(raw, pos)
        if colon is None:
            continue
        key = _key(raw[quote:pos])
        pos = colon.end()
        if key == "model":
            spans.append((pos, _string_end(raw, pos) + 1) if raw[pos : pos + 1] == b'"' else (-1, -1))
        elif key in names:
            if key in seen and twice is None:
                twice = key
            seen.add(key)


def _single_model_span(raw: bytes) -> list[tuple[int, int]] | None:
    """The common case in C-speed searches: exactly one ``"model"`` token and no ``\\u`` escapes
    (so no escaped spelling of the key can hide elsewhere). Inside a JSON string an unescaped
    quote cannot occur, so that one token is the top-level key the parser read."""
    at = raw.find(b'"model"')
    if at == -1 or raw.find(b'"model"', at + 7) != -1 or b"\\u" in raw:
        return None
    if at and raw[at - 1] == 0x5C:  # the tail of a string ending in an escaped quote
        return None
    colon = _COLON.match(raw, at + 7)
    if colon is None or raw[colon.end() : colon.end() + 1] != b'"':
        return None
    start = colon.end()
    return [(start, _string_end(raw, start) + 1)]


def _key(token: bytes) -> str:
    """A key token's text (quotes included in token), escapes decoded only where there are any."""
    return orjson.loads(token) if b"\\" in token else token[1:-1].decode()
