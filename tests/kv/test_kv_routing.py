"""KV-event-aware picking end to end: stand-ins publishing vLLM's events, real Envoy, two sidecars."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import orjson
import pytest

from extproc.standin import KvCache, StandIn
from tests.harness import Stack, wait_for
from tests.kv.common import TEMPLATE, TOKENIZER, conversation, tokenizer

pytestmark = pytest.mark.e2e

NAMES = ["r1", "r2", "r3"]


def kv_policy(caches: dict[str, KvCache], replay: bool = True) -> str:
    endpoints = ", ".join(f'"${n}": "{caches[n].endpoint}"' for n in NAMES)
    replays = ", ".join(f'"${n}": "{caches[n].replay_endpoint}"' for n in NAMES) if replay else ""
    return textwrap.dedent(f"""
        version: 1
        default_model: chat
        debug: {{explain: true}}
        models:
          chat:
            replicas:
              static: [{", ".join(f'"${n}"' for n in NAMES)}]
              kv_events:
                tokenizer: {TOKENIZER}
                chat_template: {TEMPLATE}
                endpoints: {{{endpoints}}}
                replay_endpoints: {{{replays}}}
                warm_seconds: 0
        """)


@pytest.fixture
def fleet():
    caches = {n: KvCache(tokenizer(), capacity=400, block_size=16) for n in NAMES}
    replicas = [StandIn(name=n, kv=caches[n]) for n in NAMES]
    yield caches, replicas
    for cache in caches.values():
        cache.close()


def synced(stack: Stack, replicas: list[StandIn]) -> bool:
    """The sidecar's index holds what every stand-in's cache holds."""
    for replica in replicas:
        replica.kv.publisher.flush()
    index = stack.sidecar.router.kv.index
    return all(index.size(r.address) == len(r.kv.blocks) for r in replicas)


def explain(response) -> dict:
    return json.loads(response.headers["x-router-explain"])


def test_next_turn_goes_where_the_cache_really_is_even_from_another_sidecar(tmp_path, fleet) -> None:
    caches, replicas = fleet
    (tmp_path / "a").mkdir()
    with Stack(tmp_path / "a", kv_policy(caches), replicas) as one:
        # A second sidecar behind its own Envoy, same policy, same replicas: the chart's second pod.
        policy = one.config_path.read_text()
        (tmp_path / "b").mkdir()
        with Stack(tmp_path / "b", policy, []) as two:
            debug = {"x-router-debug": "true"}
            messages = conversation("lisbon", 0)
            first = one.post({"model": "auto", "messages": messages}, headers=debug)
            home = one.replica(first)
            for turn in range(1, 3):
                # The next turn follows the answer: the lease has ended and the events arrived.
                wait_for(lambda: one.inflight() == {} and synced(one, replicas), timeout=10)
                response = one.post({"model": "auto", "messages": conversation("lisbon", turn)}, headers=debug)
                assert one.replica(response) == home
            wait_for(lambda: one.inflight() == {} and synced(one, replicas) and synced(two, replicas), timeout=10)

            # The second sidecar never saw this conversation; the replica's events tell it where it is.
            turn3 = two.post({"model": "auto", "messages": conversation("lisbon", 3)}, headers=debug)
            assert two.replica(turn3) == home
            detail = explain(turn3)["replicas"]
            assert detail["index"] == "exact"
            assert detail["kv_cache"]["held"][one.fleet[home].address]["fraction"] > 0.5  # all but its newest turn

            # The home replica evicts the conversation; another one has since prefilled it.
            home_cache = one.fleet[home].kv
            home_cache.evict(len(home_cache.blocks))
            other = next(n for n in NAMES if n != home)
            one.fleet[other].kv.serve([*conversation("lisbon", 4)[:-1], {"role": "user", "content": "x"}])
            wait_for(
                lambda: one.inflight() == two.inflight() == {} and synced(one, replicas) and synced(two, replicas),
                timeout=10,
            )
            turn4 = {"model": "auto", "messages": conversation("lisbon", 4)}
            # (The first sidecar's own guess still says `home`: it sent every turn there.)
            assert one.replica(one.post(turn4, headers=debug)) == other
            assert two.replica(two.post(turn4, headers=debug)) == other


def test_two_router_processes_fed_the_same_events_pick_identically(tmp_path, fleet) -> None:
    caches, replicas = fleet
    # Each replica holds other conversations (prefilled directly, as other routers would have sent them).
    for i, name in enumerate(NAMES):
        for topic in (f"city{i}", f"river{i}"):
            caches[name].serve(conversation(topic, 3))
    with Stack(tmp_path, kv_policy(caches), replicas) as stack:
        policy_path = stack.config_path
        requests = [conversation(f"{kind}{i}", 4) for i in range(3) for kind in ("city", "river")]
        (tmp_path / "requests.json").write_bytes(orjson.dumps(requests))
        script = textwrap.dedent(f"""
            import asyncio, json, time, orjson
            from extproc.policy import load_policy
            from extproc.replicas.pool import Discovery, Pools
            from extproc.router import Call, Router, RouterState
            policy = load_policy({str(policy_path)!r})
            router = Router(RouterState(policy, Pools.build(policy, Discovery())))
            router.follow_kv_events()
            pool = router.state.pools.endpoints("chat")
            deadline = time.monotonic() + 20
            while sum(router.kv.index.size(e) > 0 for e in pool) < len(pool) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
            picks = []
            for messages in json.load(open({str(tmp_path / "requests.json")!r})):
                body = orjson.dumps({{"model": "auto", "messages": messages}})
                routed = asyncio.run(router.route(Call("POST", "/v1/chat/completions", {{}}, body)))
                router.tracker.release(routed.lease)
                picks.append(routed.endpoints[0])
            print(json.dumps(picks))
            router.kv.close()
        """)
        outputs = []
        for seed in ("1", "2"):
            done = subprocess.run(
                [sys.executable, "-c", script],
                capture_output=True,
                text=True,
                timeout=120,
                env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"},
            )
            assert done.returncode == 0, done.stderr[-2000:]
            outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        assert outputs[0] == outputs[1]
        # And both picked where each conversation really is.
        expected = [stack.fleet[f"r{i + 1}"].address for i in range(3) for _ in ("city", "river")]
        assert outputs[0] == expected
