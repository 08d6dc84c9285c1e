"""The semantic cache's parts without a server: scope, guards, captured responses, rendering,
the index, and the policy's cache settings."""

from __future__ import annotations

import asyncio

import numpy as np
import orjson
import pytest

from extproc.cache import Capture, Index, MemoryStore, guards, prepare, render
from extproc.cache import scope as s
from extproc.cache.answers import Answer
from extproc.metrics import Metrics
from extproc.policy import ConfigError, parse_policy
from extproc.policy.config import CacheSettings, DecisionCache, Model
from extproc.policy.load import schema
from extproc.request import Api, parse

MODEL = Model("small", "small", "small-8b")
RULE = DecisionCache()
SETTINGS = CacheSettings()


def chat(text: str = "How do I reset my password?", **extra) -> dict:
    return {"model": "auto", "messages": [{"role": "user", "content": text}], "temperature": 0, **extra}


def lookup(body: dict, headers: dict | None = None, rule=RULE, settings=SETTINGS, api=Api.CHAT):
    return prepare(parse(api, orjson.dumps(body)), headers or {}, MODEL, rule, settings)


def test_the_scope_ignores_delivery_but_not_anything_that_shapes_the_answer() -> None:
    base = lookup(chat())
    assert isinstance(base, s.Lookup)
    assert lookup(chat(stream=True, stream_options={"include_usage": True})).scope == base.scope
    assert lookup(chat(max_tokens=10)).scope != base.scope
    assert lookup(chat(tools=[{"type": "function", "function": {"name": "f"}}])).scope != base.scope
    system = {"role": "system", "content": "Answer in French."}
    other = {**chat(), "messages": [system, *chat()["messages"]]}
    assert lookup(other).scope != base.scope
    other_model = prepare(parse(Api.CHAT, orjson.dumps(chat())), {}, Model("large", "large", "x"), RULE, SETTINGS)
    assert other_model.scope != base.scope
    # The question itself is compared by meaning, not in the scope (but its numbers are).
    assert lookup(chat("How can I reset my password?")).scope == base.scope
    assert lookup(chat("Is 5 prime?")).scope != lookup(chat("Is 7 prime?")).scope
    assert lookup(chat("Is it safe?")).scope != lookup(chat("Is it not safe?")).scope


def test_the_tenant_header_is_in_the_scope_and_required_when_configured() -> None:
    settings = CacheSettings(tenant_header="x-tenant")
    a = lookup(chat(), {"x-tenant": "acme"}, settings=settings)
    b = lookup(chat(), {"x-tenant": "globex"}, settings=settings)
    assert a.scope != b.scope
    assert lookup(chat(), {}, settings=settings) == s.TENANT


@pytest.mark.parametrize(
    ("body", "refusal"),
    [
        (chat(temperature=0.7), s.SAMPLING),
        ({k: v for k, v in chat().items() if k != "temperature"}, s.SAMPLING),  # unset: the server's 1
        (chat(n=2), s.CHOICES),
        (chat(logprobs=True), s.CHOICES),
        (
            {
                "model": "auto",
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "temperature": 0,
            },
            s.LAST_MESSAGE,
        ),
        (chat("x" * (s.MAX_QUESTION_CHARS + 1)), s.LONG),
    ],
)
def test_requests_the_cache_must_not_serve_are_refused(body: dict, refusal: str) -> None:
    assert lookup(body) == refusal


def test_a_decision_may_opt_in_to_sampled_requests() -> None:
    assert isinstance(lookup(chat(temperature=0.7), rule=DecisionCache(sampled=True)), s.Lookup)


def test_the_responses_api_is_not_cached() -> None:
    body = {"model": "auto", "input": "hello", "temperature": 0}
    assert lookup(body, api=Api.RESPONSES) == s.API


@pytest.mark.parametrize(
    ("a", "b", "alike"),
    [
        ("How do I read a file in Rust?", "How do I write a file in Rust?", True),
        ("What are the main exports of Japan?", "What are the main imports of Japan?", True),
        ("Convert 100 euros to yen.", "Convert 100 yen to euros.", True),
        ("How do I convert Celsius to Fahrenheit?", "What is the formula to go from Fahrenheit to Celsius?", True),
        ("How do I convert Celsius to Fahrenheit?", "What is the formula to go from Celsius to Fahrenheit?", False),
        ("How do I reset my account password?", "How can I reset the password of my account?", False),
        ("What's a good way to make lasagna at home?", "How do I cook lasagna?", False),
        # The price of catching antonyms: a one-word rewording is refused too.
        ("Give me a recipe for lasagna.", "How do I cook lasagna?", True),
    ],
)
def test_lookalike_wordings_are_told_from_rewordings(a: str, b: str, alike: bool) -> None:
    assert guards.lookalike(guards.words(a), guards.words(b)) is alike


def _json(reason: str = "stop", status: int = 200, **extra) -> tuple[int, bytes]:
    doc = {
        "object": "chat.completion",
        "model": "small-8b",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": reason}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        **extra,
    }
    return status, orjson.dumps(doc)


def _capture(status: int, body: bytes, content_type: str = "application/json", max_bytes: int = 1 << 20):
    capture = Capture(Api.CHAT.value, max_bytes)
    if capture.headers(status, content_type):
        for i in range(0, len(body), 7):  # in pieces, as Envoy streams it
            capture.feed(body[i : i + 7])
    return capture.finish()


def test_only_a_complete_200_that_finished_normally_is_stored() -> None:
    answer = _capture(*_json())
    assert isinstance(answer, Answer) and answer.content == "hi" and answer.completion_tokens == 7
    assert _capture(*_json("length")) == "unfinished"
    assert _capture(*_json(status=500)) == "status"
    assert _capture(*_json(), max_bytes=16) == "too_large"
    assert _capture(200, b'{"error": {"message": "x"}}') == "error"
    assert _capture(200, b'{"choices": [') == "unreadable"


def _sse(*events: dict, done: bool = True) -> bytes:
    body = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    return body + (b"data: [DONE]\n\n" if done else b"")


def _chunk(content: str | None = None, reason: str | None = None, **delta) -> dict:
    d = {"content": content} if content is not None else {}
    return {
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {**d, **delta}, "finish_reason": reason}],
    }


def test_a_stream_is_stored_only_when_it_ended_with_done_and_a_stop() -> None:
    usage = {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    whole = _sse(_chunk("Hel"), _chunk("lo"), _chunk(reason="stop"), usage)
    answer = _capture(200, whole, "text/event-stream")
    assert isinstance(answer, Answer) and answer.content == "Hello" and answer.completion_tokens == 4
    assert _capture(200, _sse(_chunk("Hel"), done=False), "text/event-stream") == "truncated"
    assert _capture(200, _sse(_chunk("Hel"), _chunk(reason="length")), "text/event-stream") == "unfinished"
    calls = _sse(_chunk(tool_calls=[{"index": 0}]), _chunk(reason="stop"))
    assert _capture(200, calls, "text/event-stream") == "tool_calls"
    assert _capture(200, _sse({"error": {"message": "x"}}), "text/event-stream") == "error"


def test_a_hit_renders_as_json_or_sse_with_consistent_usage() -> None:
    answer = Answer(Api.CHAT.value, "small-8b", "Hello there", "stop", 9, 4)
    kind, body = render(answer, stream=False, include_usage=False, prompt_tokens=11)
    doc = orjson.loads(body)
    assert kind == "application/json" and doc["object"] == "chat.completion"
    assert doc["choices"][0]["message"]["content"] == "Hello there"
    assert doc["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    kind, body = render(answer, stream=True, include_usage=True, prompt_tokens=11)
    assert kind == "text/event-stream"
    stored = _capture(200, body, "text/event-stream")  # what we send, we could read back
    assert isinstance(stored, Answer) and stored.content == "Hello there" and stored.completion_tokens == 4


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(384).astype(np.float32)
    return v / np.linalg.norm(v)


def test_the_index_is_bounded_expires_and_keeps_scopes_apart() -> None:
    evicted: list[tuple[str, str]] = []
    index = Index(3, lambda i, r: evicted.append((i, r)))
    for i in range(4):
        index.add(f"e{i}", b"scope", "m", _unit(i), expires=1e12)
    assert len(index) == 3 and evicted == [("e0", "size")]
    assert index.search(b"scope", _unit(3), now=0, threshold=0.99) == ("e3", pytest.approx(1.0, abs=1e-5))
    assert index.search(b"other", _unit(3), now=0, threshold=0.5) == (None, -1.0)
    index.add("soon", b"scope", "m", _unit(9), expires=10)
    assert index.search(b"scope", _unit(9), now=20, threshold=0.99)[0] is None
    assert ("soon", "expired") in evicted
    # Every remaining entry is still found after the removals moved rows around.
    for i in (2, 3):
        assert index.search(b"scope", _unit(i), now=0, threshold=0.99)[0] == f"e{i}"


def test_a_lookalike_entry_is_skipped_for_the_next_most_similar() -> None:
    index = Index(10)
    v = _unit(1)
    index.add("write", b"s", "m", v, 1e12, guards.words("How do I write a file in Rust?"))
    found, similarity = index.search(b"s", v, 0, 0.9, guards.words("How do I read a file in Rust?"))
    assert found is None and similarity == pytest.approx(1.0, abs=1e-5)
    index.add("reword", b"s", "m", v, 1e12, guards.words("What is the way to read a file in Rust?"))
    assert index.search(b"s", v, 0, 0.9, guards.words("How do I read a file in Rust?"))[0] == "reword"


def test_invalidation_by_model_leaves_the_others() -> None:
    store = MemoryStore(10)
    answer = Answer(Api.CHAT.value, "m", "a", "stop", 1, 1)

    async def run() -> tuple[int, int]:
        await store.put("a", b"s", "small", _unit(1), (), answer, 60)
        await store.put("b", b"s", "large", _unit(2), (), answer, 60)
        return await store.invalidate("small"), len(store.index)

    assert asyncio.run(run()) == (1, 1)


def test_the_memory_store_is_bounded_in_bytes_too() -> None:
    store = MemoryStore(1000, max_bytes=10_000)
    answer = Answer(Api.CHAT.value, "m", "x" * 3000, "stop", 1, 1)

    async def run() -> None:
        for i in range(10):
            await store.put(f"e{i}", b"s", "m", _unit(i), (), answer, 60)

    asyncio.run(run())
    assert store.bytes <= 10_000 and len(store.index) == 2
    assert store.index.ids() == ["e8", "e9"]  # the oldest went first


POLICY = "version: 1\ndefault_model: a\nmodels: {a: {}}\n"


def test_the_cache_policy_reference_matches_the_code_defaults() -> None:
    props = schema()["properties"]["cache"]["properties"]
    defaults = CacheSettings()
    for name, prop in props.items():
        if "default" in prop:
            assert prop["default"] == getattr(defaults, name), name


def test_decisions_opt_in_and_the_settings_are_checked() -> None:
    policy = parse_policy(POLICY + "decisions:\n  - {name: faq, model: a, cache: {ttl_seconds: 60}}\n")
    assert policy.uses_cache and policy.uses_classifier
    assert policy.decisions[0].cache == DecisionCache(ttl_seconds=60)
    assert not parse_policy(POLICY + "decisions:\n  - {name: faq, model: a, cache: false}\n").uses_cache
    with pytest.raises(ConfigError, match=r"cache\.redis_url.*required when backend is 'redis'"):
        parse_policy(POLICY + "cache: {backend: redis}\n")
    with pytest.raises(ConfigError, match="cache"):
        parse_policy(POLICY + "cache: {threshold: 2}\n")
    with pytest.raises(ConfigError, match="semantic cache"):
        parse_policy(POLICY + "classifier: {enabled: false}\ndecisions:\n  - {name: f, model: a, cache: true}\n")


def test_cache_metrics_exist_with_the_conventional_names() -> None:
    names = {m.name for m in Metrics().registry.collect()}
    for name in (
        "extproc_cache_lookups",
        "extproc_cache_stores",
        "extproc_cache_evictions",
        "extproc_cache_saved_cost_usd",
        "extproc_cache_lookup_duration_seconds",
    ):
        assert name in names, name
