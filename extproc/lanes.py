"""Where work proportional to a request's size runs, so that a small request never waits behind
a large one: small work inline on the event loop (a thread hop costs more), larger work in the
shared thread pool, and work on large bodies in a lane of its own, one at a time (their parses
hold the interpreter; taking turns leaves the event loop and every other thread their share).
A large body waits only behind other large bodies, within its own deadline (server.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TypeVar

T = TypeVar("T")

# Larger bodies are large: parsed in their lane, and the stream asks Envoy to wait longer for
# them (parsing 100,000 messages may outlast Envoy's message_timeout on a busy machine).
LARGE_BODY_BYTES = 256 * 1024
# How long routing a large body may take (its lane, parse, signals, pick) before it is answered
# 503 router_timeout: its own deadline, well inside Envoy's max_message_timeout.
LARGE_BODY_SECONDS = 5.0

_large = ThreadPoolExecutor(max_workers=1, thread_name_prefix="large-body")
_medium = ThreadPoolExecutor(max_workers=2, thread_name_prefix="body")


async def run(size: int, inline: int, function: Callable[..., T], *args: object) -> T:
    """function(*args) for work on `size` bytes or characters: inline up to `inline`, in the
    shared pool up to LARGE_BODY_BYTES, past that in the large bodies' lane."""
    if size <= inline:
        return function(*args)
    executor = _large if size > LARGE_BODY_BYTES else _medium
    return await asyncio.get_running_loop().run_in_executor(executor, partial(function, *args))
