"""Conversations keep their model through real Envoy, also on a second sidecar that never saw them."""

from __future__ import annotations

import json
import textwrap

import pytest

from extproc.standin import KvCache, StandIn
from tests.harness import Stack, wait_for
from tests.kv.common import TEMPLATE, TOKENIZER, tokenizer

pytestmark = pytest.mark.e2e


def policy(caches: dict[str, KvCache]) -> str:
    def kv(name: str) -> str:
        return (
            f'{{tokenizer: "{TOKENIZER}", chat_template: "{TEMPLATE}", warm_seconds: 0, '
            f'endpoints: {{"${name}": "{caches[name].endpoint}"}}, '
            f'replay_endpoints: {{"${name}": "{caches[name].replay_endpoint}"}}}}'
        )

    return textwrap.dedent(f"""
        version: 1
        default_model: small
        debug: {{explain: true}}
        models:
          small: {{replicas: {{static: ["$s1"], kv_events: {kv("s1")}}}}}
          large: {{replicas: {{static: ["$l1"], kv_events: {kv("l1")}}}}}
        decisions:
          - {{name: code, when: {{keyword: {{any: [traceback], scope: last_user}}}}, model: large}}
          - name: escalate
            when: {{keyword: {{any: [escalate], scope: last_user}}}}
            model: large
            switch: always
        """)


def explained(response) -> dict:
    return json.loads(response.headers["x-router-explain"])["session_model"]


def test_a_conversation_keeps_its_model_unless_a_decision_may_switch_it(tmp_path) -> None:
    caches = {n: KvCache(tokenizer(), capacity=400) for n in ("s1", "l1")}
    replicas = [StandIn(name=n, kv=caches[n]) for n in ("s1", "l1")]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        with Stack(tmp_path / "a", policy(caches), replicas) as one:
            debug = {"x-router-debug": "true"}
            history = [{"role": "system", "content": "You help with builds. " * 20}]

            def turn(stack: Stack, text: str):
                history.append({"role": "user", "content": text})
                response = stack.post({"model": "auto", "messages": history}, headers=debug)
                assert response.status == 200
                history.append({"role": "assistant", "content": f"about {text}: " + "fine " * 30})
                wait_for(lambda: stack.inflight() == {})
                # The next turn follows the answer: by then the replica's events have arrived.
                for replica in replicas:
                    replica.kv.publisher.flush()
                index = one.sidecar.router.kv.index
                wait_for(lambda: all(index.size(r.address) == len(r.kv.blocks) for r in replicas), timeout=10)
                return response

            assert one.replica(turn(one, "hello")) == "s1"
            kept = turn(one, "here is my traceback")  # the code decision names large
            assert one.replica(kept) == "s1"
            assert explained(kept) | {"source": None} == {
                "outcome": "kept",
                "model": "small",
                "previous": "small",
                "decided": "large",
                "reason": "keep_model",
                "source": None,
            }
            # A second sidecar never saw this conversation: the KV events say which model holds it.
            with Stack(tmp_path / "b", one.config_path.read_text(), []) as two:
                for cache in caches.values():
                    cache.publisher.flush()
                wait_for(lambda: two.sidecar.router.kv.index.size(one.fleet["s1"].address) > 0, timeout=10)
                elsewhere = turn(two, "another traceback")
                assert two.replica(elsewhere) == "s1"
                assert explained(elsewhere)["source"] == "kv_events"
            moved = turn(one, "please escalate")  # a decision that may switch
            assert one.replica(moved) == "l1"
            assert (explained(moved)["outcome"], explained(moved)["reason"]) == ("switched", "switch")
            assert one.replica(turn(one, "thanks")) == "l1"  # it is a large conversation now
            text = one.metrics_text()
            assert 'extproc_session_model_total{model="small",outcome="kept",reason="keep_model"} 1.0' in text
            assert 'extproc_session_model_total{model="large",outcome="switched",reason="switch"} 1.0' in text
    finally:
        for cache in caches.values():
            cache.close()
