"""Polling for conditions that other threads make true: never sleep-and-hope."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    predicate: Callable[[], bool],
    *,
    timeout: float = 15.0,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition",
) -> None:
    """Poll ``predicate`` until it holds; fail with ``message`` after a generous ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for: {text}")
        time.sleep(interval)
