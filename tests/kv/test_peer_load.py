"""The other routers' load, from real stand-ins' KV events (ZMQ, msgpack) into a real router: the
requests another sidecar sent to a replica count into its load, this router's own do not."""

from __future__ import annotations

import asyncio
import textwrap

import orjson
import pytest

from extproc.policy import load_policy
from extproc.replicas.pool import Discovery, Pools
from extproc.router import Call, Router, RouterState
from extproc.standin import KvCache
from tests.harness import wait_for
from tests.kv.common import TEMPLATE, TOKENIZER, conversation, tokenizer

ADDRESSES = ["127.0.0.1:18001", "127.0.0.1:18002", "127.0.0.1:18003"]


@pytest.fixture
def caches():
    kv = {a: KvCache(tokenizer(), capacity=2000, block_size=16) for a in ADDRESSES}
    yield kv
    for cache in kv.values():
        cache.close()


def router_for(tmp_path, caches: dict[str, KvCache], peer_load: bool = True) -> Router:
    endpoints = ", ".join(f'"{a}": "{caches[a].endpoint}"' for a in ADDRESSES)
    replays = ", ".join(f'"{a}": "{caches[a].replay_endpoint}"' for a in ADDRESSES)
    path = tmp_path / "policy.yaml"
    path.write_text(
        textwrap.dedent(f"""
        version: 1
        default_model: chat
        picking: {{peer_load: {str(peer_load).lower()}}}
        models:
          chat:
            replicas:
              static: [{", ".join(f'"{a}"' for a in ADDRESSES)}]
              kv_events:
                tokenizer: {TOKENIZER}
                chat_template: {TEMPLATE}
                endpoints: {{{endpoints}}}
                replay_endpoints: {{{replays}}}
                warm_seconds: 0
        """)
    )
    policy = load_policy(str(path))
    router = Router(RouterState(policy, Pools.build(policy, Discovery())))
    for _ in range(16):  # the router has timed requests of its own (peer load counts from then on)
        router.tracker.release(router.tracker.acquire(ADDRESSES[2], "chat"))
    router.tracker.mean_seconds = 600.0  # (so the inferred counts hold still while the test looks)
    router.follow_kv_events()
    return router


def synced(router: Router, caches: dict[str, KvCache]) -> bool:
    for cache in caches.values():
        cache.publisher.flush()
    return all(router.kv.index.size(a) == len(caches[a].blocks) for a in ADDRESSES)


def route(router: Router, messages: list[dict]) -> str:
    body = orjson.dumps({"model": "auto", "messages": messages})
    routed = asyncio.run(router.route(Call("POST", "/v1/chat/completions", {}, body)))
    return routed.endpoints[0]


@pytest.mark.parametrize("peer_load", [True, False])
def test_requests_another_router_sent_count_into_the_replicas_load(tmp_path, caches, peer_load) -> None:
    router = router_for(tmp_path, caches, peer_load)
    try:
        busy = ADDRESSES[0]
        # Another sidecar sends four new conversations to the first replica (it prefills them).
        for i in range(4):
            caches[busy].serve(conversation(f"elsewhere{i}", 1))
        wait_for(lambda: synced(router, caches) and router.kv.peers.foreign >= 4, timeout=10)
        assert router.kv.peers.load(busy) == pytest.approx(4.0, abs=0.1)
        assert router.kv.peers.foreign == 4

        # This router's own new conversations: the load bound keeps them off the busy replica
        # (with peer_load off it only sees its own counts, so its turns reach the busy one too).
        picks = []
        for i in range(4):
            messages = conversation(f"mine{i}", 1)
            picked = route(router, messages)
            picks.append(picked)
            caches[picked].serve(messages)  # the replica prefills it, publishing its blocks
        wait_for(lambda: synced(router, caches) and router.kv.peers.started >= 8, timeout=10)
        assert router.kv.peers.foreign == 4  # its own four were recognised as its own
        assert (busy in picks) is not peer_load
    finally:
        router.kv.close()
