"""Replica picking end to end through real Envoy: affinity, load bound, pool changes, retries."""

from __future__ import annotations

import math
import re
from concurrent.futures import ThreadPoolExecutor

import orjson
import pytest

from extproc.replicas.pool import Discovery
from extproc.standin import StandIn
from tests.harness import Stack, chat, wait_for
from tests.replicas.fake_apiserver import FakeApiServer, endpoint, endpoint_slice, port

pytestmark = pytest.mark.e2e

SYSTEM = "You are a meticulous travel planner. Always answer with a day-by-day itinerary. " * 12


def conversation(topic: str, turns: int, system: str = SYSTEM) -> dict:
    messages = [{"role": "system", "content": system}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"{topic}: question {turn} " * 8})
        messages.append({"role": "assistant", "content": f"answer {turn} about {topic} " * 10})
    messages.append({"role": "user", "content": f"{topic}: and finally? " * 4})
    return {"model": "auto", "messages": messages}


def static_policy(mode: str, names: list[str], **picking: float) -> str:
    endpoints = ", ".join(f'"${n}"' for n in names)
    weights = ""
    if picking:
        weights = "picking: {" + ", ".join(f"{k}: {v}" for k, v in picking.items()) + "}\n"
    return f"""
version: 1
default_model: chat
{weights}models:
  chat:
    replicas: {{static: [{endpoints}], envoy: {mode}}}
"""


def test_a_conversations_turns_land_on_the_same_replica(tmp_path) -> None:
    names = ["r1", "r2", "r3", "r4"]
    with Stack(tmp_path, static_policy("original_dst", names), [StandIn(name=n) for n in names]) as s:
        homes = {}
        for topic in ("lisbon", "kyoto", "oaxaca", "tallinn", "hobart", "cusco"):
            system = f"You plan trips to {topic}. " * 40  # a prompt of its own: nothing cached anywhere yet
            replicas = set()
            for turns in range(6):
                replicas.add(s.replica(s.post(conversation(topic, turns, system))))
                # The next turn follows the answer, by which time Envoy has reported the request
                # finished (its access log flushes every 20 ms).
                wait_for(lambda: s.inflight() == {})
            assert len(replicas) == 1, f"{topic} was served by {replicas}"
            homes[topic] = replicas.pop()
        assert len(set(homes.values())) > 1  # different conversations spread out


def test_a_hot_prefix_sheds_load_within_the_bound(tmp_path) -> None:
    names = ["r1", "r2", "r3", "r4"]
    replicas = [StandIn(name=n, delay=0.4) for n in names]
    with Stack(tmp_path, static_policy("original_dst", names, load_bound=0.25), replicas) as s:
        s.post(conversation("shared", 3))  # warm one replica's cache with the prefix
        requests = 24
        with ThreadPoolExecutor(requests) as pool:
            statuses = list(pool.map(lambda i: s.post(conversation("shared", 3)).status, range(requests)))
        assert statuses == [200] * requests
        bound = math.ceil(1.25 * requests / len(names))
        assert max(r.peak for r in replicas) <= bound
        assert sum(1 for r in replicas if r.served) >= 3  # the hot replica shed work to others
        wait_for(lambda: s.inflight() == {})


def test_envoy_retries_walk_the_fallback_list_past_a_dead_replica(tmp_path) -> None:
    names = ["r1", "r2", "dead"]
    with Stack(tmp_path, static_policy("override_host", names), [StandIn(name=n) for n in names]) as s:
        dead = s.fleet["dead"]
        s.fleet.call(dead.stop())  # still listed in the pool; nothing listens there any more
        responses = [s.post(chat(f"question {i}")) for i in range(12)]
        assert [r.status for r in responses] == [200] * 12
        assert {s.replica(r) for r in responses} <= {"r1", "r2"}
        picks = re.search(
            rf'extproc_replica_picks_total{{model="chat",replica="{dead.address}"}} (\S+)', s.metrics_text()
        )
        assert picks and float(picks.group(1)) >= 1  # the router did pick it; Envoy's retry moved on


def test_envoy_ring_hash_mode_keeps_sessions_together(tmp_path) -> None:
    names = ["r1", "r2", "r3", "r4"]
    with Stack(tmp_path, static_policy("hash", names), [StandIn(name=n) for n in names]) as s:
        homes = {}
        for session in range(8):
            seen = {s.replica(s.post(chat(f"turn {t}"), headers={"x-session-id": f"s-{session}"})) for t in range(4)}
            assert len(seen) == 1
            homes[session] = seen.pop()
        assert len(set(homes.values())) > 1


def test_a_replica_that_leaves_the_pool_gets_no_more_traffic(tmp_path) -> None:
    policy = """
version: 1
default_model: chat
models:
  chat:
    replicas:
      kubernetes: {namespace: llm, service: chat}
      envoy: original_dst
"""
    names = ["r1", "r2", "r3"]
    with FakeApiServer() as api:
        stack = Stack(
            tmp_path,
            policy,
            [StandIn(name=n) for n in names],
            discovery=Discovery(api_client=api.api_client(), sync_timeout=10),
        )
        stack.fleet.start()
        stack.fleet.start = lambda: None  # type: ignore[method-assign]  (ports are needed for the slices)
        for r in stack.replicas:
            api.apply(
                endpoint_slice(
                    f"chat-{r.name}",
                    namespace="llm",
                    service="chat",
                    endpoints=[endpoint("127.0.0.1")],
                    ports=[port(r.port, "http")],
                )
            )
        with stack as s:
            served = {s.replica(s.post(chat(f"hello {i}"))) for i in range(9)}
            assert served == set(names)
            api.delete("chat-r2", namespace="llm")
            wait_for(lambda: s.sidecar.run(lambda: len(s.sidecar.router.state.pools.endpoints("chat"))) == 2)
            before = s.fleet["r2"].served
            served = {s.replica(s.post(chat(f"again {i}"))) for i in range(12)}
            assert served == {"r1", "r3"}
            assert s.fleet["r2"].served == before
            # A not-ready endpoint counts as gone too.
            api.apply(
                endpoint_slice(
                    "chat-r3",
                    namespace="llm",
                    service="chat",
                    endpoints=[endpoint("127.0.0.1", ready=False)],
                    ports=[port(s.fleet["r3"].port)],
                )
            )
            wait_for(lambda: s.sidecar.run(lambda: len(s.sidecar.router.state.pools.endpoints("chat"))) == 1)
            assert {s.replica(s.post(chat(f"last {i}"))) for i in range(5)} == {"r1"}


def test_scraped_queue_length_steers_picks_away_from_a_busy_replica(tmp_path) -> None:
    policy = """
version: 1
default_model: chat
models:
  chat:
    replicas: {static: ["$busy", "$idle"], envoy: original_dst, metrics: true}
"""
    busy, idle = StandIn(name="busy", waiting=40), StandIn(name="idle")
    with Stack(tmp_path, policy, [busy, idle]) as s:
        # The scraper reports once per second; wait until the router has seen both replicas.
        wait_for(
            lambda: s.sidecar.run(
                lambda: (
                    s.sidecar.runtime.scraper is not None
                    and s.sidecar.runtime.scraper.report(busy.address) is not None
                    and s.sidecar.runtime.scraper.report(idle.address) is not None
                )
            )
        )
        served = []
        for i in range(10):
            served.append(s.replica(s.post(chat(f"question {i}"))))
            wait_for(lambda: s.inflight() == {})  # one at a time: only the scraped queue differs
        assert served == ["idle"] * 10
        busy.waiting = 0
        wait_for(lambda: s.sidecar.run(lambda: s.sidecar.runtime.scraper.report(busy.address).waiting == 0))
        assert "busy" in {s.replica(s.post(chat(f"again {i}"))) for i in range(6)}


def test_the_explanation_reports_how_much_of_the_prompt_the_picked_replica_holds(tmp_path) -> None:
    names = ["r1", "r2"]
    policy = static_policy("original_dst", names) + "debug: {explain: true}\n"
    with Stack(tmp_path, policy, [StandIn(name=n) for n in names]) as s:
        body = conversation("reykjavik", 3, "You plan trips to Iceland. " * 40)

        def replicas_explained() -> dict:
            response = s.post(body, headers={"x-router-debug": "true"})
            wait_for(lambda: s.inflight() == {})
            return orjson.loads(response.headers["x-router-explain"])["replicas"]

        first, again = replicas_explained(), replicas_explained()
        assert first["blocks"] > 1 and first["prefix_blocks"] == 0  # nothing sent anywhere yet
        assert again["picked"][0] == first["picked"][0]
        assert again["prefix_blocks"] == again["blocks"] == first["blocks"]  # the same prompt, all held
