"""A conversation keeps the model it started on unless the decision may move it."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from extproc import sessions
from extproc.policy.load import parse_policy
from extproc.replicas.pool import Discovery, Pools
from extproc.router import Call, Router, RouterState

POLICY = """
version: 1
default_model: small
debug: {explain: true}
models:
  small: {}
  large: {}
  private: {}
decisions:
  - name: sensitive
    when: {keyword: {any: ["ssn"], scope: last_user}}
    model: small
    # (no encoder here: the check cannot run, and a reroute fails closed, so this always reroutes)
    pii: {action: reroute, model: private, types: [US_SSN]}
  - name: code
    when: {keyword: {any: ["traceback"], scope: last_user}}
    model: large
  - name: escalate
    when: {keyword: {any: ["urgent"], scope: last_user}}
    model: large
    switch: {when: {keyword: {any: ["very urgent"], scope: last_user}}}
  - name: anything-goes
    when: {keyword: {any: ["whatever"], scope: last_user}}
    model: large
    switch: always
"""


def router(text: str = POLICY) -> Router:
    policy = parse_policy(text, "test")
    return Router(RouterState(policy, Pools.build(policy, Discovery())))


SESSION = {"x-session-id": "conversation-1"}


def turn(r: Router, history: list[dict], text: str, headers: dict | None = SESSION):
    messages = [*history, {"role": "user", "content": text}]
    body = orjson.dumps({"model": "auto", "messages": messages})
    routed = asyncio.run(r.route(Call("POST", "/v1/chat/completions", headers or {}, body, explain=True)))
    history[:] = [*messages, {"role": "assistant", "content": f"answer to {text}"}]
    return routed


def test_a_conversation_stays_on_its_first_model() -> None:
    r, history = router(), []
    assert turn(r, history, "hello").model == "small"
    second = turn(r, history, "here is my traceback")  # the code decision names large
    assert second.model == "small"
    assert second.session.outcome == sessions.KEPT
    assert second.explanation["session_model"] == {
        "outcome": "kept",
        "model": "small",
        "previous": "small",
        "decided": "large",
        "reason": "keep_model",
        "source": "table",
    }
    # Another conversation with the same words goes where the decision says.
    assert turn(r, [], "here is my traceback", {"x-session-id": "conversation-2"}).model == "large"


def test_without_a_session_header_identical_openings_are_not_one_conversation() -> None:
    # (A templated request, sent twice with a history: only a replica's KV events could tell.)
    r = router()
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]
    assert turn(r, list(history), "here is my traceback", None).model == "large"
    other = turn(r, list(history), "thanks", None)
    assert (other.model, other.session.outcome) == ("small", "new")


def test_a_decision_may_switch_when_its_rule_holds() -> None:
    r, history = router(), []
    turn(r, history, "hello")
    assert turn(r, history, "this is urgent").model == "small"  # the rule does not hold
    moved = turn(r, history, "this is very urgent")
    assert (moved.model, moved.session.outcome, moved.session.reason) == ("large", "switched", "switch")
    # From then on it is a large conversation.
    assert turn(r, history, "thanks").model == "large"


def test_switch_always_moves_it_and_pii_always_does() -> None:
    r, history = router(), []
    turn(r, history, "hello")
    assert turn(r, history, "whatever").model == "large"
    private = turn(r, history, "my ssn is 078-05-1120")
    assert (private.model, private.session.reason) == ("private", "pii")


def test_sessions_are_known_by_their_header_across_openings() -> None:
    r = router()
    headers = {"x-session-id": "abc"}
    assert turn(r, [], "here is my traceback", headers).model == "large"
    # Another request of the same session with a different opening stays on large.
    assert turn(r, [], "hello", headers).model == "large"


def test_keep_model_off_routes_every_turn_on_its_own() -> None:
    r, history = router(POLICY.replace("debug:", "sessions: {keep_model: false}\ndebug:")), []
    turn(r, history, "hello")
    assert turn(r, history, "here is my traceback").model == "large"


def test_the_table_is_bounded_and_forgets_idle_conversations() -> None:
    now = [0.0]
    table = sessions.LocalSessions(max_sessions=2, idle_seconds=10, clock=lambda: now[0])
    for key in ("a", "b", "c"):
        table.put(key, "m")
    assert (table.get("a"), len(table)) == (None, 2)
    now[0] = 11
    assert table.get("b") is None


@pytest.mark.parametrize("switch", ["sometimes", {"when": {"keyword": 3}}, {"if": {}}])
def test_a_bad_switch_rule_is_a_config_error(switch) -> None:
    from extproc.policy.load import ConfigError

    text = POLICY.replace("switch: always", f"switch: {orjson.dumps(switch).decode()}")
    with pytest.raises(ConfigError):
        parse_policy(text, "test")


def test_a_reload_applies_new_session_limits() -> None:
    r = router(POLICY)
    assert isinstance(r.sessions, sessions.LocalSessions) and r.sessions.max_sessions == 100_000
    reloaded = parse_policy(POLICY.replace("debug:", "sessions: {max_sessions: 3, idle_seconds: 5}\ndebug:"))
    r.swap(r.build_state(reloaded))
    assert (r.sessions.max_sessions, r.sessions.idle_seconds) == (3, 5)
