"""Which requests may use the cache, and the exact part of their key (the scope).

A stored answer may serve a new request only if everything that shapes the answer, except the
wording of the last user message, is the same: the chosen model, the API, every other field of
the body (system prompt, earlier turns, tools, tool_choice, response_format, sampling parameters,
max_tokens, stop, seed, the body's `user`...) and, when configured, the tenant header. Rather
than list the fields that matter, the scope takes them all and leaves out only what cannot change
the answer: `model` (the chosen model stands in its place), `stream` and `stream_options` (a
stored answer is rendered either way). A field unknown today is therefore in the scope too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from extproc.cache import guards
from extproc.classifier.text import WINDOW
from extproc.policy.config import CacheSettings, DecisionCache, Model
from extproc.request import Api, LLMRequest

# Left out of the scope: they change how an answer is delivered, not what it says.
_DELIVERY = frozenset({"model", "stream", "stream_options"})


class Refusal(str):
    """Why a request is not looked up (a low-cardinality metric label)."""


API = Refusal("api")  # the Responses API (its stored state and ids make a replay wrong)
SAMPLING = Refusal("sampling")  # temperature > 0 or unset, and the decision did not opt in
CHOICES = Refusal("choices")  # n > 1, logprobs, or a prompt that is not one text
TENANT = Refusal("tenant")  # the tenant header is configured but missing
LAST_MESSAGE = Refusal("last_message")  # the last message is not the user's (a tool result...)
UNREADABLE = Refusal("unreadable")  # token ids the PII check cannot read
PII = Refusal("pii")  # personal data found
PII_UNCHECKED = Refusal("pii_unchecked")  # the check could not run (or not over everything)
ENCODER = Refusal("encoder")  # no sentence embedding in time
LONG = Refusal("long")  # a question longer than the encoder surely reads whole

# The classifier reads a text this long in one window, whole (classifier.py): a longer question's
# embedding would leave its middle out, and two questions differing there would match.
MAX_QUESTION_CHARS = 2 * WINDOW


@dataclass(frozen=True, slots=True)
class Lookup:
    """A request that may be served from (and stored in) the cache."""

    scope: bytes  # 16-byte digest of everything but the question
    query: str  # the last user message: what is compared by meaning
    words: tuple[int, ...]  # its content words' digests, for the look-alike check (guards.py)
    model: str  # the chosen model's policy name
    threshold: float
    ttl_seconds: float
    stream: bool
    include_usage: bool  # stream_options.include_usage: a final usage event is expected


def prepare(
    parsed: LLMRequest,
    headers: Mapping[str, str],
    model: Model,
    rule: DecisionCache,
    settings: CacheSettings,
) -> Lookup | Refusal:
    """The request's Lookup, or why it may not use the cache."""
    body = parsed.body
    if parsed.api is Api.RESPONSES:
        return API
    if parsed.unreadable:
        return UNREADABLE
    if not _deterministic(body) and not rule.sampled:
        return SAMPLING
    if body.get("n", 1) not in (1, None) or body.get("logprobs") or body.get("echo") or body.get("best_of", 1) != 1:
        return CHOICES
    tenant = ""
    if settings.tenant_header:
        tenant = headers.get(settings.tenant_header, "")
        if not tenant:
            return TENANT
    rest: dict[str, Any] = {k: v for k, v in body.items() if k not in _DELIVERY}
    if parsed.api is Api.CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            return LAST_MESSAGE
        last = messages[-1]
        at = len(messages) - 1  # (the tool definitions, if any, are one more parsed message after it)
        if last.get("role") != "user" or len(parsed.messages) <= at or parsed.messages[at].role != "user":
            return LAST_MESSAGE
        query = parsed.messages[at].text
        # The question's wording is compared by meaning; its other fields (a name) stay exact.
        rest["messages"] = [*messages[:-1], {k: v for k, v in last.items() if k != "content"}]
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return CHOICES
        query = prompt
        rest.pop("prompt")
    if not query.strip():
        return LAST_MESSAGE
    if len(query) > MAX_QUESTION_CHARS:
        return LONG
    digest = hashlib.blake2b(digest_size=16)
    for part in (model.name, model.upstream_model, parsed.api.value, tenant):
        digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
    digest.update(orjson.dumps(rest, option=orjson.OPT_SORT_KEYS))
    # What the embedding hardly sees, exactly: the question's numbers and negations.
    digest.update(b"\0" + guards.markers(query))
    stream_options = body.get("stream_options")
    return Lookup(
        scope=digest.digest(),
        query=query,
        words=guards.words(query),
        model=model.name,
        threshold=rule.threshold if rule.threshold is not None else settings.threshold,
        ttl_seconds=rule.ttl_seconds if rule.ttl_seconds is not None else settings.ttl_seconds,
        stream=parsed.stream,
        include_usage=isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
    )


def _deterministic(body: Mapping[str, Any]) -> bool:
    """Greedy decoding asked for: temperature 0. Unset means the server's default, 1 for OpenAI
    and vLLM, so it samples."""
    temperature = body.get("temperature")
    return isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0
