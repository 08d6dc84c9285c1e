"""Cooldowns shared through a real redis-server (Debian's): one router's 429 is every router's."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from extproc.cooldown import COOLDOWN, EJECTED, BackendHealth, Outcome
from extproc.policy.backends import FallbackSettings, SecretRef, StoreSettings
from extproc.store import SharedStore, StoreError

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs Debian's redis-server")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    port = _port()
    (tmp_path / "pw").write_text("s3cret-store-pw\n")
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--requirepass", "s3cret-store-pw", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(5)


def test_a_cooldown_one_router_learns_reaches_another_through_redis(redis_url: str, tmp_path: Path) -> None:
    settings = StoreSettings(redis_url, password=SecretRef(file=str(tmp_path / "pw")))

    async def scenario() -> None:
        a, b = BackendHealth(FallbackSettings()), BackendHealth(FallbackSettings())
        a.store, b.store = SharedStore(settings), SharedStore(settings)
        assert await a.store.ping()
        a.observe("groq/m", Outcome.RATE_LIMITED, {"retry-after": "20"})
        for _ in range(3):
            a.observe("together/m", Outcome.FAILURE)
        await asyncio.gather(*a._pending)
        assert b.blocked("groq/m") is None
        await b.sync(["groq/m", "together/m", "openai/m"])
        assert b.blocked("groq/m")[0] == COOLDOWN and b.blocked("groq/m")[1] == pytest.approx(
            a.blocked("groq/m")[1], abs=0.01
        )
        assert b.blocked("together/m")[0] == EJECTED and b.blocked("openai/m") is None
        # A shorter cooldown written later never shortens the shared one.
        b._states.clear()
        b.observe("groq/m", Outcome.RATE_LIMITED, {"retry-after": "1"})
        await asyncio.gather(*b._pending)
        c = BackendHealth(FallbackSettings())
        c.store = SharedStore(settings)
        await c.sync(["groq/m"])
        assert c.blocked("groq/m")[1] == pytest.approx(a.blocked("groq/m")[1], abs=0.01)
        for store in (a.store, b.store, c.store):
            await store.close()

    asyncio.run(scenario())


def test_a_store_that_does_not_answer_leaves_each_router_its_own_state(tmp_path: Path) -> None:
    settings = StoreSettings(f"redis://127.0.0.1:{_port()}/0", timeout=0.2)

    async def scenario() -> None:
        health = BackendHealth(FallbackSettings())
        health.store = SharedStore(settings)
        health.observe("groq/m", Outcome.RATE_LIMITED, {"retry-after": "5"})
        await asyncio.gather(*health._pending)
        await health.sync(["groq/m"])
        assert health.blocked("groq/m")[0] == COOLDOWN  # its own, kept
        assert health.store_errors >= 2
        await health.store.close()

    asyncio.run(scenario())


def test_the_store_password_is_never_in_an_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError) as info:
        SharedStore(StoreSettings("redis://127.0.0.1:1/0", password=SecretRef(file=str(tmp_path / "missing"))))
    assert "missing" in str(info.value)
    with pytest.raises(StoreError) as info:
        SharedStore(StoreSettings("redis://:topsecret@127.0.0.1:1/0"))
    assert "topsecret" not in str(info.value)


def test_a_redis_cache_without_its_own_url_uses_the_store_and_its_password(redis_url: str, tmp_path: Path) -> None:
    """`cache: {backend: redis}` beside a `store` connects where the store does, with its password
    (the server requires one, so a connection without it could neither store nor find)."""
    from extproc.cache import MemoryStore
    from extproc.cache.answers import Answer
    from extproc.cache.semantic import SemanticCache
    from extproc.cache.store import RedisStore
    from extproc.metrics import Metrics
    from extproc.policy import ConfigError, parse_policy

    text = (
        "version: 1\ndefault_model: a\nmodels: {a: {}}\ncache: {backend: redis}\n"
        f"store: {{url: '{redis_url}', password: {{file: '{tmp_path / 'pw'}'}}}}\n"
        "decisions:\n  - {name: faq, model: a, cache: true}\n"
    )
    policy = parse_policy(text)
    assert policy.cache.redis_url is None and policy.store is not None
    vector = np.ones(384, dtype=np.float32) / np.sqrt(384)
    answer = Answer("chat", "a", "stored once", "stop", 1, 2)

    async def scenario() -> None:
        one = SemanticCache(policy.cache, Metrics(), shared=policy.store)
        two = SemanticCache(policy.cache, Metrics(), shared=policy.store)
        assert isinstance(one.store, RedisStore)
        await one.start()
        await two.start()
        await one.store.put("e1", b"scope", "a", vector, (), answer, 60)
        deadline = time.monotonic() + 10
        while len(two.store.index) == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        entry, found, _ = await two.store.get(b"scope", vector, 0.9, ())
        assert entry == "e1" and found is not None and found.content == "stored once"
        # A reload that changes the store's password cannot keep this cache's connections.
        other = StoreSettings(policy.store.url, password=SecretRef(env="ELSEWHERE"))
        assert one.compatible(policy.cache, policy.store) and not one.compatible(policy.cache, other)
        await one.close()
        await two.close()

    asyncio.run(scenario())
    assert isinstance(SemanticCache(parse_policy(POLICY_MEMORY).cache, Metrics()).store, MemoryStore)
    with pytest.raises(ConfigError, match=r"cache\.redis_url.*no `store`"):
        parse_policy("version: 1\ndefault_model: a\nmodels: {a: {}}\ncache: {backend: redis}\n")
    with pytest.raises(ConfigError) as info:
        parse_policy(
            "version: 1\ndefault_model: a\nmodels: {a: {}}\n"
            "cache: {backend: redis, redis_url: 'redis://:hunter2@127.0.0.1:1/0'}\n"
        )
    assert "cache.redis_url" in str(info.value) and "hunter2" not in str(info.value)


POLICY_MEMORY = "version: 1\ndefault_model: a\nmodels: {a: {}}\n"
