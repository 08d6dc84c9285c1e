"""The classifier's per-request budget, the structured scan of the whole conversation, the cheap
path for texts no structured value can be in, and bounded rule conditions (regex, keyword,
tokens). A recording stand-in for the encoder shows what it was asked to read."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import orjson
import pytest

from extproc import errors
from extproc.classifier.classifier import Classification
from extproc.classifier.pii import PiiSpan
from extproc.policy import conditions
from extproc.policy.config import ClassifierSettings
from extproc.policy.load import ConfigError, parse_policy, schema
from extproc.replicas.pool import Discovery, Pools
from extproc.request import Api, Message, parse
from extproc.router import Call, Router, RouterState
from extproc.signals import Signals
from extproc.signals.classifier import ClassifierSignal, scan_conversation
from extproc.signals.tokens import EXACT_CHARS, TokenCounter

SSN = "078-05-1120"


class Recording:
    """Stands in for AsyncClassifier: no model; records (text length, tagger tokens, topic)."""

    def __init__(self, names: dict[str, tuple[int, int]] | None = None) -> None:
        self.calls: list[tuple[int, int, bool]] = []
        self.topic_tokens: list[int] = []
        self.names = names or {}  # text -> a PERSON span the "tagger" finds

    def cached(self, text: str, pii_tokens: int = 0, topic: bool = True, topic_tokens: int = 510) -> bool:
        return False

    async def classify(
        self,
        text: str,
        pii_tokens: int = 510,
        topic: bool = True,
        deadline: float | None = None,
        topic_tokens: int = 510,
    ) -> Classification:
        self.calls.append((len(text), pii_tokens, topic))
        self.topic_tokens.append(topic_tokens)
        read = min(len(text), pii_tokens * 8)
        spans = (
            tuple(PiiSpan("PERSON", a, b, 0.9) for a, b in [self.names[text]] if b <= read)
            if text in self.names
            else ()
        )
        return Classification("math", {"math": 1.0}, 0.5, spans, pii_chars=read, topic_chars=min(len(text), 4000))


def signals_for(*texts: str) -> Signals:
    return Signals(tuple(Message("user", t) for t in texts), {}, TokenCounter())


def annotate(recording: Recording, signals: Signals, **kwargs) -> Signals:
    asyncio.run(ClassifierSignal(recording, 60, pii_tokens=510).annotate(signals, **kwargs))
    return signals


STRUCTURED = frozenset({"US_SSN", "CREDIT_CARD"})


def test_texts_without_a_structured_value_need_no_encoder_for_structured_types() -> None:
    recording = Recording()
    signals = annotate(
        recording, signals_for("hello there", "what is 2 + 2?"), pii=True, topic=False, pii_types=STRUCTURED
    )
    assert recording.calls == [] and signals.pii == () and signals.pii_unchecked == frozenset()


def test_a_structured_value_is_read_by_the_tagger_within_the_budget() -> None:
    recording = Recording()
    annotate(recording, signals_for(f"my ssn is {SSN}"), pii=True, topic=False, pii_types=STRUCTURED)
    assert recording.calls == [(21, 510, False)]


def test_past_the_budget_a_validated_value_counts_on_its_own() -> None:
    long = "word " * 2000 + f"ssn {SSN}"
    recording = Recording()
    signals = annotate(recording, signals_for(long), pii=True, topic=False, pii_types=STRUCTURED)
    [hit] = signals.pii
    assert (hit.type, long[hit.start : hit.end], hit.score) == ("US_SSN", SSN, 1.0)
    assert signals.pii_unchecked == frozenset()  # structured types were checked everywhere


def test_past_the_budget_names_are_unchecked_and_older_messages_wait_their_turn() -> None:
    texts = [f"older message {i} " * 50 for i in range(20)] + ["the latest message"]
    recording = Recording()
    signals = annotate(recording, signals_for(*texts), pii=True, topic=True, pii_types=frozenset({"PERSON"}))
    assert recording.calls[0] == (len(texts[-1]), 510, True)  # the latest user message first
    assert len(recording.calls) < len(texts)  # the rest only while the budget lasted
    assert signals.pii_unchecked == frozenset({"PERSON", "STREET_ADDRESS"})
    assert signals.classifier_read["skipped_chars"] > 0


def test_a_hundred_thousand_messages_cost_a_bounded_number_of_encoder_calls() -> None:
    recording = Recording()
    texts = ["ok"] * 100_000
    annotate(recording, signals_for(*texts), pii=True, topic=True, pii_types=None)
    assert len(recording.calls) <= 510 // 32 + 2


def test_scan_reads_the_conversation_as_the_model_will_and_maps_back() -> None:
    body = {
        "model": "auto",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "ssn 078-05"}, {"type": "text", "text": "-1120 ok"}]},
            {"role": "user", "content": "card 4111\u200b 1111 1111 1111"},
        ],
    }
    messages = parse(Api.CHAT, orjson.dumps(body)).messages
    found = scan_conversation(messages, frozenset({"US_SSN", "CREDIT_CARD"}))
    [crossing] = found.crossing[0]
    assert messages[0].text[crossing.start : crossing.end] == "078-05\n-1120"
    [card] = found.found[1]
    assert messages[1].text[card.start : card.end] == "4111\u200b 1111 1111 1111"


def test_redaction_of_a_value_split_across_parts_replaces_it_in_each_part() -> None:
    from extproc.request import redact

    body = {"model": "auto", "messages": [{"role": "user", "content": [{"type": "text", "text": "ssn 078-05"}, {"type": "text", "text": "-1120 ok"}]}]}  # fmt: skip
    parsed = parse(Api.CHAT, orjson.dumps(body))
    [c] = scan_conversation(parsed.messages, frozenset({"US_SSN"})).crossing[0]
    out = orjson.loads(redact(parsed, {0: [(c.start, c.end, "<US_SSN>")]}, "m"))
    assert [p["text"] for p in out["messages"][0]["content"]] == ["ssn <US_SSN>", "<US_SSN> ok"]


# --- the router's answer when part of the text could not be checked ----------------------------

POLICY = """
version: 1
default_model: small
models:
  small: {}
  private: {}
pii: {action: %s, types: [PERSON, US_SSN]%s}
"""


def route(action: str, text: str, recording: Recording) -> tuple[str, str]:
    extra = ", model: private" if action == "reroute" else ""
    policy = parse_policy(POLICY % (action, extra))
    router = Router(RouterState(policy, Pools.build(policy, Discovery())), classifier=ClassifierSignal(recording, 60))
    body = orjson.dumps({"model": "small", "messages": [{"role": "user", "content": text}]})
    routed = asyncio.run(router.route(Call("POST", "/v1/chat/completions", {}, body)))
    return routed.model, routed.pii_action


LONG = "plain words " * 3000


def test_unchecked_names_fail_closed_reroute_reroutes_and_block_is_a_clear_413() -> None:
    assert route("reroute", LONG, Recording()) == ("private", "reroute-unchecked")
    with pytest.raises(errors.PayloadTooLarge) as raised:
        route("block", LONG, Recording())
    assert raised.value.code == "pii_check_incomplete" and "classifier.pii_tokens" in str(raised.value)


def test_what_was_found_decides_where_the_unread_rest_could_not_change_it() -> None:
    with pytest.raises(errors.Forbidden):  # an SSN past the budget: blocked for it, not 413
        route("block", LONG + SSN, Recording())


def test_a_short_prompt_is_checked_whole() -> None:
    assert route("block", "hello there", Recording()) == ("small", "")


# --- policy settings ---------------------------------------------------------------------------


def test_classifier_defaults_are_the_schemas() -> None:
    props = schema()["properties"]["classifier"]["properties"]
    defaults = ClassifierSettings()
    for name in ("threads", "max_batch", "cache_size", "timeout_ms", "pii_tokens", "topic_tokens"):
        assert props[name]["default"] == getattr(defaults, name), name


def test_the_policys_pii_budget_default_is_the_classifiers() -> None:
    from extproc.classifier.text import DEFAULT_PII_TOKENS

    assert ClassifierSettings().pii_tokens == DEFAULT_PII_TOKENS


def test_the_policys_topic_budget_default_is_the_classifiers_and_reaches_every_ask() -> None:
    from extproc.classifier.text import WINDOW

    assert ClassifierSettings().topic_tokens == WINDOW
    recording = Recording()
    signals = signals_for("an earlier question", "the latest question")
    asyncio.run(ClassifierSignal(recording, 60, pii_tokens=510, topic_tokens=64).annotate(signals, pii=False))
    assert recording.topic_tokens == [64] and recording.calls == [(len("the latest question"), 0, True)]


def test_loading_a_policy_does_not_import_onnxruntime() -> None:
    # The policy (and the router's signals) must load where the encoder never runs: check-config,
    # a rules-only sidecar. onnxruntime is imported only when a classifier is built.
    code = (
        "import sys\n"
        "from extproc.policy import load_policy\n"
        "import extproc.router, extproc.signals.classifier\n"
        "from extproc.classifier import DOMAINS\n"
        "print('onnxruntime' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_policy_knows_which_pii_types_it_asks_for() -> None:
    assert parse_policy(POLICY % ("block", "")).pii_types == frozenset({"PERSON", "US_SSN"})
    allow = "version: 1\ndefault_model: a\nmodels: {a: {}}\npii: {action: allow, types: [EMAIL_ADDRESS]}\n"
    assert parse_policy(allow).pii_types is None  # an allow-list must see every type


@pytest.mark.parametrize("pattern", [r"(?<=x)y", r"(a)\1", r"a++", r"(?>a)"])
def test_check_config_rejects_patterns_re2_cannot_run_in_linear_time(pattern: str) -> None:
    text = f"version: 1\ndefault_model: a\nmodels: {{a: {{}}}}\ndecisions:\n  - name: d\n    model: a\n    when: {{regex: '{pattern}'}}\n"
    with pytest.raises(ConfigError) as raised:
        parse_policy(text)
    assert "RE2 syntax" in str(raised.value) and "line 7" in str(raised.value)


def test_a_catastrophic_pattern_runs_in_linear_time_on_hostile_text() -> None:
    # Python's backtracking engine would need ~2**100000 steps here; RE2 one pass.
    condition = conditions.build({"regex": "^(a+)+$"})
    assert condition.evaluate(signals_for("a" * 100_000 + "b")) is False
    header = conditions.build({"header": {"name": "x-tier", "matches": "^(a|aa)+$"}})
    assert header.evaluate(Signals((), {"x-tier": "a" * 60_000 + "b"}, TokenCounter())) is False


def test_whole_word_keywords_on_a_megabyte_of_one_letter() -> None:
    condition = conditions.build({"keyword": {"any": ["a"], "whole_word": True}})
    assert condition.evaluate(signals_for("a" * 1_000_000)) is False
    assert condition.evaluate(signals_for("a" * 1_000_000 + " a")) is True


# --- token counts: exact up to a bound, estimated beyond -----------------------------------------


def test_token_counts_are_exact_up_to_the_bound_and_estimated_beyond(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = TokenCounter()
    seen: list[int] = []
    real = counter.count
    monkeypatch.setattr(counter, "count", lambda t: seen.append(len(t)) or real(t))
    prose = "The committee reviewed the quarterly figures and the hiring plan in detail. " * 8000  # 600 KB
    estimate, estimated = counter.count_all([prose])
    assert estimated and sum(seen) <= EXACT_CHARS
    exact = len(TokenCounter()._tokenizer.encode(prose, add_special_tokens=False).ids)
    assert abs(estimate - exact) / exact < 0.05
    short, estimated = TokenCounter().count_all(["hello there", "how are you?"])
    assert not estimated and short == 6


def test_a_hundred_thousand_messages_are_counted_in_bounded_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = TokenCounter()
    calls = []
    real = counter.count
    monkeypatch.setattr(counter, "count", lambda t: calls.append(1) or real(t))
    total, estimated = counter.count_all(["ok"] * 100_000)
    assert estimated and len(calls) <= 256 and 50_000 < total < 200_000


def test_a_reload_sets_the_budgets_the_running_classifier_signal_reads() -> None:
    from pathlib import Path

    from extproc.app import Runtime, Settings
    from extproc.policy.load import parse_policy

    bundled = (Path(__file__).parents[2] / "extproc" / "policy" / "default.yaml").read_text()
    runtime = Runtime(Settings(config=Path(), reload=False, metrics_port=None))

    async def run():
        await runtime.apply(parse_policy(bundled))
        signal = runtime._classifier_signal
        assert signal is not None
        before = (signal.topic_tokens, signal.pii_tokens)
        await runtime.apply(parse_policy(bundled + "\nclassifier: {topic_tokens: 64, pii_tokens: 128}\n"))
        assert runtime._classifier_signal is signal  # the encoder is not reloaded
        return before, (signal.topic_tokens, signal.pii_tokens)

    assert asyncio.run(run()) == ((510, 510), (64, 128))
