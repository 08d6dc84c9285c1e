"""Decision evaluation as pure functions: policy + signals -> decision -> model."""

from __future__ import annotations

from collections import Counter

from extproc.policy import parse_policy
from extproc.policy.config import Split
from extproc.policy.evaluate import NEEDS_CLASSIFIER, choose_model, decide, explain, split_pick
from extproc.request import Message
from extproc.signals import PiiHit, Signals, Topic
from extproc.signals.tokens import TokenCounter

COUNTER = TokenCounter()

POLICY = parse_policy("""
models: {small: {}, large: {}, private: {}, canary: {}}
default_model: small
decisions:
  - name: vip
    priority: 10
    when: {header: {name: x-user-tier, in: [premium, gold]}}
    model: large
  - name: code
    when:
      any:
        - keyword: {any: ["segfault", "stack trace"]}
        - regex: '\\bTraceback \\(most recent call last\\)'
    model: large
    fallbacks: [small, large]
  - name: not-short
    when: {all: [{tokens: {min: 50}}, {not: {keyword: {any: [draft], scope: all}}}]}
    model: large
  - name: hard-math
    when: {all: [{domain: [math]}, {complexity: {above: 0.6}}]}
    model: large
  - name: secrets
    when: {pii: {types: [US_SSN]}}
    model: private
  - name: whole-word
    when: {keyword: {any: [cat], whole_word: true}}
    split:
      - {model: small, weight: 90}
      - {model: canary, weight: 10}
""")


def signals(text: str = "hi", headers: dict[str, str] | None = None, history: list[Message] | None = None) -> Signals:
    return Signals((*(history or []), Message("user", text)), headers or {}, COUNTER)


def classified(s: Signals, domain: str = "other", complexity: float = 0.1, pii: tuple[PiiHit, ...] = ()) -> Signals:
    s.classified(Topic(domain, {domain: 0.9}, complexity), pii)
    return s


def name(outcome: object) -> str | None:
    return getattr(outcome, "name", None)


def test_higher_priority_wins_even_when_listed_first_elsewhere() -> None:
    assert name(decide(POLICY, signals("my code segfaults", {"x-user-tier": "gold"}))) == "vip"


def test_keyword_any_is_case_insensitive_and_regex_is_exact() -> None:
    assert name(decide(POLICY, signals("Here is the STACK TRACE"))) == "code"
    assert name(decide(POLICY, signals("Traceback (most recent call last):\n  File"))) == "code"


def test_keyword_scope_last_user_ignores_earlier_turns() -> None:
    history = [Message("user", "it segfaults"), Message("assistant", "try gdb")]
    assert decide(POLICY, signals("thanks!", history=history)) is NEEDS_CLASSIFIER  # code rule no longer matches


def test_cheap_rules_decide_without_the_classifier() -> None:
    # 'code' matches before any classifier-backed decision is reached: no encoder run needed.
    assert name(decide(POLICY, signals("segfault again"))) == "code"


def test_classifier_is_needed_only_when_the_first_open_decision_depends_on_it() -> None:
    s = signals("prove that there are infinitely many primes")
    assert decide(POLICY, s) is NEEDS_CLASSIFIER
    assert name(decide(POLICY, classified(s, "math", 0.9))) == "hard-math"
    assert decide(POLICY, classified(signals("x"), "math", 0.3)) is None  # falls to the default


def test_failed_classifier_makes_its_conditions_false_and_routing_continues() -> None:
    s = signals("prove it")
    s.classifier_failed("timeout")
    assert decide(POLICY, s) is None
    assert choose_model(POLICY, None, "k").model == "small"


def test_not_and_token_ranges() -> None:
    long_text = "word " * 80
    assert name(decide(POLICY, signals(long_text))) == "not-short"
    assert decide(POLICY, signals(long_text + " draft")) is NEEDS_CLASSIFIER


def test_pii_condition_matches_only_listed_types() -> None:
    ssn = (PiiHit(0, "US_SSN", 0, 11, 0.99),)
    email = (PiiHit(0, "EMAIL_ADDRESS", 0, 5, 0.99),)
    assert name(decide(POLICY, classified(signals("x"), pii=ssn))) == "secrets"
    assert decide(POLICY, classified(signals("x"), pii=email)) is None


def test_whole_word_keyword() -> None:
    assert name(decide(POLICY, classified(signals("my cat sleeps")))) == "whole-word"
    assert decide(POLICY, classified(signals("concatenate strings"))) is None


def test_fallbacks_never_repeat_the_chosen_model() -> None:
    decision = next(d for d in POLICY.decisions if d.name == "code")
    assert choose_model(POLICY, decision, "k").fallbacks == ("small",)


def test_split_is_deterministic_per_key_and_follows_the_weights() -> None:
    decision = next(d for d in POLICY.decisions if d.name == "whole-word")
    picks = [choose_model(POLICY, decision, f"session-{i}").model for i in range(4000)]
    assert all(choose_model(POLICY, decision, f"session-{i}").model == picks[i] for i in range(0, 4000, 97))
    share = Counter(picks)["canary"] / len(picks)
    assert 0.08 < share < 0.12


def test_changing_a_weight_moves_only_the_sessions_it_must() -> None:
    before = (Split("a", 80), Split("b", 20))
    after = (Split("a", 70), Split("b", 30))
    moved = [k for k in map(str, range(5000)) if split_pick(before, k) != split_pick(after, k)]
    assert all(split_pick(before, k) == "a" and split_pick(after, k) == "b" for k in moved)
    assert 0.07 < len(moved) / 5000 < 0.13


def test_explain_lists_decisions_up_to_the_match_without_prompt_text() -> None:
    trace = explain(POLICY, signals("my code segfaults; password hunter2"))
    assert [t["decision"] for t in trace] == ["vip", "code"]
    assert trace[-1]["result"] is True
    assert "hunter2" not in repr(trace)
