"""The sidecar as its own Envoy's control plane.

Envoy starts from a static bootstrap (extproc/envoy/render/bootstrap.py) whose listener and
cluster subscriptions read files in one directory; the sidecar renders the listener (LDS), its
routes (RDS) and the clusters (CDS) from the live policy and publishes each as a
DiscoveryResponse file, replaced by an atomic rename in its own watched directory, as Envoy's
``path_config_source`` asks. A resource type whose rendering did not change is not rewritten.

Filesystem subscriptions have no ACK or NACK beyond Envoy's stats and log (Envoy's xDS protocol
docs, "Filesystem subscriptions"): each file's ``version_info`` is a hash of its content, and the
admin interface's ``version_text`` and ``update_rejected`` stats say whether Envoy took it. Updates
follow the protocol's "make before break" order (xDS docs, "Eventual consistency
considerations"): clusters, then the listener, then routes, each confirmed before the next; the
router switches to the new policy only once Envoy can route everything it may decide; clusters
and routes only the old policy used go last, after a grace period for decisions already made.
When Envoy rejects a step, every file written for the update is put back, so Envoy (even after a
restart) runs what it ran before, and the update is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import orjson

from extproc.envoy.names import BOOTSTRAP_FILE, LISTENER, XDS_FILES
from extproc.envoy.render.chains import SDS_DIR
from extproc.envoy.render.resources import Resources
from extproc.metrics import Metrics
from extproc.policy.reload import Refused

log = logging.getLogger("extproc.xds")

_TYPES = {
    "lds": "type.googleapis.com/envoy.config.listener.v3.Listener",
    "cds": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "rds": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
}
# The admin stats that report each subscription (Envoy's subscription statistics).
_STATS = {
    "lds": "listener_manager.lds.",
    "cds": "cluster_manager.cds.",
    "rds": f"http.{LISTENER}.rds.{LISTENER}.",
}
_WARMING = {"lds": "listener_manager.total_listeners_warming", "cds": "cluster_manager.warming_clusters"}
MAKE_ORDER = ("cds", "lds", "rds")  # a route must never name a cluster Envoy does not have yet
BREAK_ORDER = ("rds", "lds", "cds")  # routes stop naming a cluster before it goes
NAMES = {"lds": "listener", "cds": "clusters", "rds": "routes"}


class EnvoyRejected(Refused):
    """Envoy refused a rendered update; what it ran before is back in place."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        super().__init__(
            f"Envoy rejected the new {NAMES[kind]} ({kind}); its log says why (look for 'config update "
            "rejected'); the previous Envoy configuration and policy stay in effect"
        )


def documents(resources: Resources) -> dict[str, dict[str, Any]]:
    """The DiscoveryResponse of each resource type, versioned by its content."""
    listed = {"lds": [resources.listener], "cds": list(resources.clusters), "rds": [resources.routes]}
    out = {}
    for kind, items in listed.items():
        typed = [{"@type": _TYPES[kind], **item} for item in items]
        version = hashlib.sha256(orjson.dumps(typed, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]
        out[kind] = {"version_info": version, "type_url": _TYPES[kind], "resources": typed}
    return out


def resources_of(docs: Mapping[str, Mapping[str, Any]]) -> Resources:
    def plain(item: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in item.items() if k != "@type"}

    (listener,) = docs["lds"]["resources"]
    (routes,) = docs["rds"]["resources"]
    return Resources(plain(listener), plain(routes), tuple(plain(c) for c in docs["cds"]["resources"]))


def _is_cluster_route(route: Mapping[str, Any]) -> bool:
    return "dynamic_metadata" in route.get("match", {}) and "cluster" in route.get("route", {})


def merged(old: Resources, new: Resources) -> Resources:
    """The new resources plus the clusters only the old ones have and their routes: what Envoy
    needs while decisions made on either policy are in flight."""
    names = {c["name"] for c in new.clusters}
    kept = tuple(c for c in old.clusters if c["name"] not in names)
    if not kept:
        return new
    kept_names = {c["name"] for c in kept}
    (old_host,) = old.routes["virtual_hosts"]
    (new_host,) = new.routes["virtual_hosts"]
    old_routes = [r for r in old_host["routes"] if _is_cluster_route(r) and r["route"]["cluster"] in kept_names]
    routes = list(new_host["routes"])
    last = max((i for i, r in enumerate(routes) if _is_cluster_route(r)), default=None)
    at = last + 1 if last is not None else next(i for i, r in enumerate(routes) if r["name"] == "llm-no-decision")
    routes[at:at] = old_routes
    route_config = {**new.routes, "virtual_hosts": [{**new_host, "routes": routes}]}
    return Resources(new.listener, route_config, new.clusters + kept)


def write_json(path: Path, document: Any) -> None:
    """Replace path's content with one rename: Envoy (and a reader) sees the old file or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    os.replace(tmp, path)


def write_secrets(directory: Path, resources: Resources) -> None:
    """The SDS file of each provider's key (where Envoy reads the key, not the key), rewritten
    only when it changed. Kept when a provider goes: a cluster in its grace period may name it."""
    for name, secret in resources.secrets:
        path = Path(directory) / SDS_DIR / f"{name}.json"
        document = {"version_info": hashlib.sha256(orjson.dumps(secret)).hexdigest()[:16], "resources": [secret]}
        try:
            if orjson.loads(path.read_bytes()) == document:
                continue
        except (OSError, orjson.JSONDecodeError):
            pass
        write_json(path, document)


def write_bootstrap(directory: Path, bootstrap: Mapping[str, Any]) -> Path:
    path = Path(directory) / BOOTSTRAP_FILE
    write_json(path, bootstrap)
    return path


class EnvoyAdmin:
    """The few admin stats that say whether Envoy took an update, and Envoy's state, over plain
    HTTP on loopback."""

    def __init__(self, address: str, timeout: float = 1.0) -> None:
        host, _, port = address.rpartition(":")
        self.timeout = timeout
        self.ready_url = f"http://{host or '127.0.0.1'}:{int(port)}/ready"
        stats = ("version_text", "update_attempt", "update_rejected")
        names = [f"{prefix}{stat}" for prefix in _STATS.values() for stat in stats]
        pattern = "^(" + "|".join(n.replace(".", r"\.") for n in (*names, *_WARMING.values())) + ")$"
        self.url = f"http://{host or '127.0.0.1'}:{int(port)}/stats?format=json&filter=" + urllib.parse.quote(
            pattern, safe=""
        )

    async def stats(self) -> dict[str, Any] | None:
        """The stats by name, or None if Envoy's admin does not answer."""
        try:
            return await asyncio.to_thread(self._get)
        except (OSError, ValueError):
            return None

    async def state(self) -> str | None:
        """Envoy's server state (LIVE, DRAINING, PRE_INITIALIZING, INITIALIZING), or None if its
        admin does not answer (Envoy is gone)."""
        try:
            return await asyncio.to_thread(self._state)
        except (OSError, ValueError):
            return None

    def _state(self) -> str:
        try:
            with urllib.request.urlopen(self.ready_url, timeout=self.timeout) as response:
                return response.read().decode().strip()
        except urllib.error.HTTPError as error:  # 503 for every state but LIVE, naming it
            return error.read().decode().strip()

    def _get(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url, timeout=self.timeout) as response:
            body = response.read()
        return {s["name"]: s.get("value") for s in orjson.loads(body).get("stats", []) if "name" in s}


class Publisher:
    """Publishes resources to Envoy through files in ``directory`` (see the module docstring).

    ``admin`` (Envoy's admin address) makes every step confirmed; without it steps are spaced by
    ``settle`` seconds and nothing can be confirmed or rolled back on a rejection."""

    def __init__(
        self,
        directory: Path,
        *,
        admin: str | None = None,
        metrics: Metrics | None = None,
        timeout: float = 10.0,
        settle: float = 0.2,
        propagate: float = 0.05,
    ) -> None:
        self.directory = Path(directory)
        self.admin = EnvoyAdmin(admin) if admin else None
        self.metrics = metrics
        self.timeout = timeout
        self.settle = settle
        self.propagate = propagate
        self._lock = asyncio.Lock()
        self.files = {kind: self.directory / name for kind, name in XDS_FILES.items()}
        self.published = self._read()  # what the files hold now: a restarted sidecar starts from it

    def _read(self) -> dict[str, dict[str, Any]] | None:
        try:
            docs = {kind: orjson.loads(path.read_bytes()) for kind, path in self.files.items()}
            resources_of(docs)
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        return docs

    async def publish(
        self, resources: Resources, *, switch: Callable[[], None] = lambda: None, grace: float = 1.0
    ) -> None:
        """Bring Envoy to ``resources``, calling ``switch`` (the router's move to the new policy)
        once Envoy can route both the old and the new policy's decisions. Raises EnvoyRejected,
        before switching, when Envoy refuses the update."""
        async with self._lock:
            write_secrets(self.directory, resources)  # before the clusters that name them
            target = documents(resources)
            make = target
            if self.published is not None:
                make = documents(merged(resources_of(self.published), resources))
            if await self._apply(make, MAKE_ORDER):
                # Envoy's main thread has taken the update; its workers get it a moment later.
                await asyncio.sleep(self.propagate)
            switch()
            if make != target:
                await asyncio.sleep(grace)
                try:
                    await self._apply(target, BREAK_ORDER)
                except EnvoyRejected as exc:  # a subset of what Envoy just took: not expected
                    log.error("%s; the unused clusters stay until the next update", exc)

    async def _apply(self, docs: Mapping[str, dict[str, Any]], order: tuple[str, ...]) -> bool:
        """Write what differs from the files, in order; True if anything was written."""
        previous = self.published
        written: list[str] = []
        for kind in order:
            if previous is not None and previous[kind] == docs[kind] and self.files[kind].exists():
                continue
            result = await self._write(kind, docs[kind])
            written.append(kind)
            if result == "rejected":
                await self._restore(previous, written)
                raise EnvoyRejected(kind)
        self.published = {**(previous or {}), **docs}
        return bool(written)

    async def _restore(self, previous: Mapping[str, dict[str, Any]] | None, written: list[str]) -> None:
        for kind in reversed(written):
            if previous is None:
                self.files[kind].unlink(missing_ok=True)  # Envoy keeps what it has; a restart finds nothing
                continue
            if await self._write(kind, previous[kind]) == "rejected":
                log.error("Envoy also rejected the previous %s (%s); it keeps what it runs now", NAMES[kind], kind)

    async def _write(self, kind: str, doc: dict[str, Any]) -> str:
        """Write one resource type and wait for Envoy's verdict: applied, rejected or unconfirmed."""
        before = await self.admin.stats() if self.admin is not None else None
        write_json(self.files[kind], doc)
        what = f"the {NAMES[kind]} ({kind} version {doc['version_info']})"
        if before is None:
            # No Envoy to ask (not started yet, restarting, or no admin given): it reads the files
            # as they are when it starts.
            if self.admin is None:
                await asyncio.sleep(self.settle)
            result = "unconfirmed"
            log.info("published %s; Envoy's admin is not answering, so it is not confirmed", what)
        else:
            result = await self._verdict(kind, doc["version_info"], before)
            if result == "rejected":
                log.error("Envoy rejected %s", what)
            elif result == "unconfirmed":
                log.warning("Envoy did not confirm %s within %ss", what, self.timeout)
            else:
                log.info("Envoy applied %s", what)
        if self.metrics is not None:
            self.metrics.envoy_updates.labels(kind, result).inc()
        return result

    async def _verdict(self, kind: str, version: str, before: Mapping[str, Any]) -> str:
        """Envoy's verdict once it has read the file (its update_attempt counter moved): the
        version it reports, or a rejection. Without waiting for the attempt, a file whose version
        Envoy already reports (a rollback after a partly applied rejection) would pass at once."""
        assert self.admin is not None
        prefix = _STATS[kind]
        attempts = before.get(prefix + "update_attempt") or 0
        rejected = before.get(prefix + "update_rejected") or 0
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:
            stats = await self.admin.stats()
            if stats is None:
                return "unconfirmed"  # Envoy is gone: a restarted one reads the files as they are
            if (stats.get(prefix + "update_attempt") or 0) > attempts:
                if (stats.get(prefix + "update_rejected") or 0) > rejected:
                    return "rejected"
                warming = stats.get(_WARMING[kind], 0) if kind in _WARMING else 0
                if stats.get(prefix + "version_text") == version and not warming:
                    return "applied"
            if asyncio.get_running_loop().time() > deadline:
                return "unconfirmed"
            await asyncio.sleep(0.02)
