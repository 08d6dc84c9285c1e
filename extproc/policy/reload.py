"""Hot reload of the policy file.

Kubernetes updates a mounted ConfigMap by writing a new timestamped directory and swapping the
``..data`` symlink to it; editors replace files or write them in place. Polling the resolved
path's identity and content catches all of these on any filesystem. A change is applied once
it has been stable for the debounce period; a file that fails to load leaves the last good
policy in place. Files read with the policy (the live Envoy settings beside it in the same
ConfigMap) are watched too, and a change of any reloads them together.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from extproc.metrics import Metrics
from extproc.policy.config import Policy
from extproc.policy.load import ConfigError, load_policy

log = logging.getLogger("extproc.reload")


class Refused(Exception):
    """The target refused a valid policy (Envoy rejected what it renders to); the last good
    policy stays in effect."""


class Target(Protocol):
    metrics: Metrics

    async def apply(self, policy: Policy) -> None: ...


def _signature(path: Path) -> tuple[str, int, int, int] | None:
    """Identity of what the path points at now (through symlinks), or None if it is gone."""
    try:
        real = os.path.realpath(path)
        stat = os.stat(real)
    except OSError:
        return None
    return real, stat.st_ino, stat.st_mtime_ns, stat.st_size


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class ConfigWatcher:
    """Watches the policy file, the files read with it (``also``: the live Envoy settings; each
    must exist) and the head files it references (`heads: {name: {file: ...}}`): a refitted head
    or an edited setting reloads like an edited policy."""

    def __init__(
        self,
        path: Path,
        target: Target,
        *,
        debounce: float = 0.5,
        interval: float = 0.25,
        head_files: tuple[str, ...] = (),
        also: Sequence[Path] = (),
    ) -> None:
        self.path = Path(path)
        self.paths = (self.path, *map(Path, also))
        self.target = target
        self.debounce = debounce
        self.interval = interval
        self._heads = tuple(Path(f) for f in head_files)
        self._signature = self._signatures()
        self._digest = self._digests()
        self._missing_logged = False

    def _signatures(self) -> tuple | None:
        required = [_signature(p) for p in self.paths]
        return None if None in required else (*required, *(_signature(f) for f in self._heads))

    def _digests(self) -> str | None:
        required = [_digest(p) for p in self.paths]
        return None if None in required else "/".join([*required, *(_digest(f) or "-" for f in self._heads)])

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            signature = self._signatures()
            if signature == self._signature:
                continue
            # Let a burst of writes (or a symlink swap in progress) settle before reading.
            await asyncio.sleep(self.debounce)
            settled = self._signatures()
            if settled != signature:
                continue
            self._signature = signature
            await self.check(signature is None)

    async def check(self, missing: bool) -> None:
        metrics = self.target.metrics
        if missing:
            if not self._missing_logged:
                gone = ", ".join(str(p) for p in self.paths if _signature(p) is None)
                log.warning("policy file %s is gone; keeping the last good policy", gone)
                metrics.reloads.labels("missing").inc()
                metrics.last_reload_ok.set(0)
                self._missing_logged = True
            return
        self._missing_logged = False
        digest = await asyncio.to_thread(self._digests)
        if digest is None or digest == self._digest:
            return
        try:
            policy = await asyncio.to_thread(load_policy, self.path)
            await self.target.apply(policy)
        except ConfigError as exc:
            metrics.reloads.labels("invalid").inc()
            metrics.last_reload_ok.set(0)
            log.error("policy reload rejected; the last good policy stays in effect. %s", exc)
            self._digest = digest  # report a bad file once, not on every poll
            return
        except Refused as exc:
            metrics.reloads.labels("rejected").inc()
            metrics.last_reload_ok.set(0)
            log.error("policy reload refused: %s", exc)
            self._digest = digest
            return
        except Exception:
            metrics.reloads.labels("error").inc()
            metrics.last_reload_ok.set(0)
            log.exception("policy reload failed; the last good policy stays in effect")
            return
        if policy.head_files != tuple(str(f) for f in self._heads):
            self._heads = tuple(Path(f) for f in policy.head_files)  # watch what this policy reads
            self._signature = self._signatures()
            digest = self._digests()
        self._digest = digest
        metrics.reloads.labels("success").inc()
        metrics.last_reload.set_to_current_time()
        metrics.last_reload_ok.set(1)
        log.info("policy reloaded from %s (sha256 %s)", self.path, policy.digest[:16])
