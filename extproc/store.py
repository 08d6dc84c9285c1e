"""The shared store: state every router replica should see, in Redis (policy ``store``).

One small interface over PyPI ``redis`` (redis-py's asyncio client: the maintained, protocol-
complete client, with connection pooling, TLS (``rediss://``), timeouts and scripting; its C
parser is optional). Its users: backend cooldowns and ejections (extproc/cooldown.py) and, as
issue 21 plans, the semantic cache, which takes ``SharedStore.redis`` for its own commands.

The hot path never waits for it: readers keep a local copy that a background task refreshes,
writers fire and forget, and a store that does not answer only makes each router keep its own
state (logged once, counted in ``extproc_store_errors_total``) until it answers again. The
password is read from a file or an environment variable, never from the URL or the logs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from extproc.policy.backends import SecretRef, StoreSettings

log = logging.getLogger("extproc.store")

# SET key value only if value is greater than the stored one (values are "until" times in ms,
# so concurrent writers keep the latest end), with the key expiring at that time.
_SET_MAX = """
local current = redis.call('GET', KEYS[1])
if current and tonumber(string.match(current, '^[0-9]+')) >= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
return 1
"""


class StoreError(Exception):
    """The store's settings cannot be used (a bad URL, an unreadable password)."""


def read_secret(ref: SecretRef) -> str:
    """The value a SecretRef names. The value is never logged; errors name only the reference."""
    if ref.file is not None:
        try:
            return Path(ref.file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise StoreError(f"cannot read the store password from {ref.describe()}: {exc.strerror}") from None
    value = os.environ.get(ref.env or "")
    if value is None:
        raise StoreError(f"the store password's {ref.describe()} is not set")
    return value.strip()


def check_url(url: str) -> str | None:
    """What is wrong with a store URL, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        return f"{url!r} is not a Redis URL; write redis://host:6379/0 (rediss:// for TLS)"
    if parts.password or "@" in parts.netloc:
        return "put no credentials in the URL (it is logged and shown); give password: {file: ...} or {env: ...}"
    return None


class SharedStore:
    """A connection pool to the shared Redis, with the few operations the router needs."""

    def __init__(self, settings: StoreSettings) -> None:
        import redis.asyncio as redis  # only policies with a store need the package loaded

        problem = check_url(settings.url)
        if problem:
            raise StoreError(problem)
        password = read_secret(settings.password) if settings.password is not None else None
        self.settings = settings
        self.prefix = settings.key_prefix
        self.redis: Any = redis.from_url(
            settings.url,
            password=password,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
            health_check_interval=30,
        )
        self._set_max = self.redis.register_script(_SET_MAX)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The values of the keys that exist."""
        if not keys:
            return {}
        values = await self.redis.mget(list(keys))
        return {k: v for k, v in zip(keys, values, strict=True) if v is not None}

    async def set_until(self, key: str, value: str, until_ms: int) -> bool:
        """Store value (which starts with until_ms) until until_ms, unless a later one is there."""
        return bool(await self._set_max(keys=[key], args=[value, until_ms]))

    async def ping(self) -> bool:
        return bool(await self.redis.ping())

    async def close(self) -> None:
        await self.redis.aclose()

    def describe(self) -> Mapping[str, str]:
        """Where the store is, for logs: the URL has no credentials (check_url)."""
        return {"url": self.settings.url}
