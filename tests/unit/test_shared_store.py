"""Cooldowns shared through a real redis-server (Debian's): one router's 429 is every router's."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

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
