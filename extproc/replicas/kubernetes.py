"""Replica discovery from Kubernetes EndpointSlices (``discovery.k8s.io/v1``).

An :class:`EndpointSliceWatcher` lists the slices of one service (or label selector),
then watches them from the list's ``resourceVersion`` in a daemon thread, and keeps the
ready ``ip:port`` set that the picker reads. The API being unreachable never empties the
pool: the last known endpoints stay until the watch is back. Objects are the API's JSON
(camelCase dicts), read through the small client in :mod:`extproc.replicas.kubeapi`.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from extproc.replicas.kubeapi import ApiClient, ApiError, KubernetesConfigError, WatchStream, load_api_client

__all__ = ["ApiClient", "EndpointSliceWatcher", "KubernetesConfigError", "KubernetesSource", "load_api_client"]

logger = logging.getLogger("extproc.replicas")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"

_GONE = 410
# Bounds on one request, so that a dead connection is noticed and stop() is not held up.
_CONNECT_TIMEOUT = 5.0
_LIST_READ_TIMEOUT = 30.0
# The server ends a watch after timeoutSeconds; a read that outlasts it by this much
# means the connection died silently (no FIN, e.g. a network partition).
_WATCH_READ_GRACE = 30.0
_STOP_JOIN_TIMEOUT = 10.0

OnChange = Callable[[tuple[str, ...]], None]
Json = dict[str, Any]


class KubernetesSourceError(ValueError):
    """A :class:`KubernetesSource` that cannot select EndpointSlices."""


class WatchEndedEarly(RuntimeError):
    """A watch stream closed cleanly long before its timeout, with nothing in it."""


@dataclass(frozen=True, slots=True)
class KubernetesSource:
    """Which EndpointSlices make up a replica pool, and which of their ports to use."""

    namespace: str
    service: str | None = None  # slices labelled kubernetes.io/service-name=<service>
    selector: str | None = None  # or any label selector on EndpointSlices
    port: int | str | None = None  # number or name in the slice; None = the slice's first port

    def __post_init__(self) -> None:
        if not self.namespace:
            raise KubernetesSourceError("kubernetes source: namespace must not be empty")
        if (self.service is None) == (self.selector is None):
            raise KubernetesSourceError(
                f"kubernetes source in namespace {self.namespace!r}: set exactly one of "
                "'service' (a Service name) or 'selector' (a label selector on EndpointSlices)"
            )
        if isinstance(self.port, int) and not 0 < self.port < 65536:
            raise KubernetesSourceError(f"kubernetes source: port {self.port} is out of range")

    @property
    def label_selector(self) -> str:
        if self.service is not None:
            return f"{SERVICE_NAME_LABEL}={self.service}"
        assert self.selector is not None
        return self.selector

    def describe(self) -> str:
        """A short name for logs: ``namespace/service`` or ``namespace{selector}``."""
        if self.service is not None:
            return f"{self.namespace}/{self.service}"
        return f"{self.namespace}{{{self.selector}}}"


# --- reading EndpointSlices ----------------------------------------------------------------


def is_ready(item: Json) -> bool:
    """Ready per the API: a nil ``ready`` means ready; a terminating endpoint never is."""
    conditions = item.get("conditions")
    if not conditions:
        return True
    if conditions.get("terminating"):
        # ready=true with terminating=true happens with publishNotReadyAddresses;
        # a replica on its way out should not get new requests either way.
        return False
    return conditions.get("ready") is not False


def format_endpoint(address: str, port: int) -> str:
    """``ip:port``, with IPv6 addresses in brackets as in a URL."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def resolve_port(ports: Iterable[Json] | None, wanted: int | str | None) -> int | None:
    """The port number that ``wanted`` designates in one slice, or None if it has none.

    Resolved per slice because slices of one service may disagree, e.g. while a
    rollout changes the target port behind a port name.
    """
    listed = list(ports or [])
    if wanted is None:
        return listed[0].get("port") if listed else None
    if isinstance(wanted, str):
        return next((p.get("port") for p in listed if p.get("name") == wanted), None)
    # A number is used as is when the slice lists none, or lists the "all ports" entry
    # (port nil), as headless services without ports do.
    if not listed or any(p.get("port") is None for p in listed) or any(p.get("port") == wanted for p in listed):
        return wanted
    return None


def ready_endpoints(endpoint_slice: Json, wanted_port: int | str | None) -> tuple[frozenset[str], str | None]:
    """The ready ``ip:port`` strings of one slice, and why it contributes none, if so."""
    address_type = endpoint_slice.get("addressType")
    if address_type not in ("IPv4", "IPv6"):
        # Envoy's original-destination cluster needs an IP; FQDN slices are deprecated.
        return frozenset(), f"address type {address_type} is not an IP"
    ports = endpoint_slice.get("ports")
    port = resolve_port(ports, wanted_port)
    if port is None:
        listed = ", ".join(f"{p.get('name') or '-'}={p.get('port')}" for p in ports or [])
        wanted = "any port" if wanted_port is None else f"port {wanted_port!r}"
        return frozenset(), f"it has no {wanted} (ports: {listed or 'none'})"
    # The API defines no meaning for addresses beyond the first (the EndpointSlice
    # controller writes exactly one, and kube-proxy reads only that one).
    found = frozenset(
        format_endpoint(item["addresses"][0], port)
        for item in endpoint_slice.get("endpoints") or []
        if item.get("addresses") and is_ready(item)
    )
    return found, None


# --- the watcher ---------------------------------------------------------------------------


class EndpointSliceWatcher:
    """Keeps the ready endpoints of one :class:`KubernetesSource` current.

    List, then watch from the list's resourceVersion. A clean end of the watch (the
    server's timeout) resumes from the last version seen; 410 Gone relists at once; a
    cut watch relists at once, quietly; further failures mark the watcher disconnected
    and retry with exponential backoff. The endpoints are kept through all of it, so an
    API outage never empties the pool.

    ``on_change`` runs on the watcher thread with the new ready set: keep it quick.
    """

    def __init__(
        self,
        source: KubernetesSource,
        *,
        api_client: ApiClient,
        on_change: OnChange | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        watch_timeout_seconds: int = 300,
    ) -> None:
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("backoff: need 0 < backoff_initial <= backoff_max")
        if watch_timeout_seconds < 1:
            raise ValueError("watch_timeout_seconds must be at least 1")
        self.source = source
        self._api = api_client
        self._path = f"/apis/discovery.k8s.io/v1/namespaces/{quote(source.namespace, safe='')}/endpointslices"
        self._on_change = on_change
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._watch_timeout = watch_timeout_seconds
        self._lock = threading.Lock()
        self._slices: dict[str, frozenset[str]] = {}  # slice name -> its ready endpoints
        self._endpoints: tuple[str, ...] = ()
        self._connected = False
        self._synced = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: WatchStream | None = None
        self._failures = 0  # consecutive; only the watcher thread touches it
        self._skipped: dict[str, str] = {}  # slice name -> reason it contributes nothing

    # -- public API --

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("EndpointSliceWatcher.start() called twice")
        self._thread = threading.Thread(target=self._run, name=f"extproc-k8s-{self.source.describe()}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the watch and join the thread; returns promptly."""
        self._stopping.set()
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + _STOP_JOIN_TIMEOUT
        while thread.is_alive() and time.monotonic() < deadline:
            # Repeated because the thread may open a new stream just after a first
            # stop(): closing the socket is what unblocks a read in progress.
            watch = self._watch
            if watch is not None:
                watch.close()
            thread.join(0.05)
        if thread.is_alive():
            logger.warning(
                "kubernetes discovery %s: watcher thread did not stop within %.0fs",
                self.source.describe(),
                _STOP_JOIN_TIMEOUT,
            )

    @property
    def endpoints(self) -> tuple[str, ...]:
        """Sorted, deduplicated ``ip:port`` of the ready endpoints across all slices."""
        return self._endpoints

    @property
    def connected(self) -> bool:
        """True while the last list or watch succeeded; False while the API is unreachable."""
        return self._connected

    def wait_synced(self, timeout: float) -> bool:
        """True once the first list has completed (possibly with no endpoints)."""
        return self._synced.wait(timeout)

    # -- the loop --

    def _run(self) -> None:
        version: str | None = None
        while not self._stopping.is_set():
            try:
                if version is None:
                    version = self._list()
                version = self._watch_from(version)
            except Exception as exc:
                if self._stopping.is_set():
                    break
                version = None  # every failure ends in a relist: cheap, and never stale
                self._failures += 1
                self._report_failure(exc)
                # The first failure after a healthy watch is retried at once; repeated
                # failures back off, so a struggling API server is not hammered.
                if self._failures > 1:
                    self._stopping.wait(self._backoff_delay(self._failures - 1))
        logger.debug("kubernetes discovery %s: stopped", self.source.describe())

    def _report_failure(self, exc: Exception) -> None:
        if isinstance(exc, ApiError) and exc.status == _GONE:
            logger.info(
                "kubernetes discovery %s: watch expired (410 Gone), relisting",
                self.source.describe(),
            )
        elif self._failures == 1 and self._connected:
            # Load balancers and API server restarts cut long watches routinely: that is
            # not an outage until the relist fails too.
            logger.debug(
                "kubernetes discovery %s: watch interrupted (%s), relisting",
                self.source.describe(),
                _describe_error(exc),
            )
        else:
            self._mark_disconnected(exc)

    def _backoff_delay(self, attempt: int) -> float:
        """Exponential backoff with jitter in [d/2, d]: spreads the reconnects of many
        router replicas after a shared outage, while keeping a floor."""
        ceiling = min(self._backoff_max, self._backoff_initial * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    def _list(self) -> str:
        result = self._api.get(
            self._path,
            {"labelSelector": self.source.label_selector},
            timeout=(_CONNECT_TIMEOUT, _LIST_READ_TIMEOUT),
        )
        version = (result.get("metadata") or {}).get("resourceVersion")
        if not version:
            raise ValueError("the API server returned a list without a resourceVersion")
        self._skipped.clear()
        slices = {_name_of(item): self._read_slice(item) for item in result.get("items") or []}
        with self._lock:
            self._slices = slices
        self._publish()
        self._mark_connected(len(slices))
        self._synced.set()
        return version

    def _watch_from(self, version: str) -> str:
        """Apply watch events until the server ends the stream; returns the last version."""
        if self._stopping.is_set():
            return version
        stream = self._api.watch(
            self._path,
            {
                "labelSelector": self.source.label_selector,
                "resourceVersion": version,
                "allowWatchBookmarks": "true",
                "timeoutSeconds": self._watch_timeout,
            },
            timeout=(_CONNECT_TIMEOUT, self._watch_timeout + _WATCH_READ_GRACE),
        )
        self._watch = stream
        if self._stopping.is_set():  # stop() may have looked for a stream just before this one
            stream.close()
            return version
        started, events = time.monotonic(), 0
        for event in stream:
            if self._stopping.is_set():
                break
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                # 410 Gone (the version was compacted away) ends in a relist, as any failure.
                raise ApiError.from_status(int(obj.get("code") or 500), obj)
            version = (obj.get("metadata") or {}).get("resourceVersion") or version
            self._apply(kind, obj)
            events += 1
            self._failures = 0
        if not events and time.monotonic() - started < self._watch_timeout / 2:
            # Something between us and the API closes watches at once (a misbehaving
            # proxy): treat it as a failure, or resuming would spin without backoff.
            raise WatchEndedEarly("the watch ended at once, without a single event")
        self._failures = 0  # a clean end at the server's timeout is healthy
        logger.debug("kubernetes discovery %s: watch ended, resuming", self.source.describe())
        return version

    def _apply(self, event_type: str | None, obj: Json) -> None:
        if event_type not in ("ADDED", "MODIFIED", "DELETED"):
            return  # BOOKMARK: only its resourceVersion counts, recorded by the caller
        name = _name_of(obj)
        if event_type == "DELETED":
            self._skipped.pop(name, None)
            with self._lock:
                self._slices.pop(name, None)
        else:
            found = self._read_slice(obj)
            with self._lock:
                self._slices[name] = found
        self._publish()

    def _read_slice(self, endpoint_slice: Json) -> frozenset[str]:
        found, skipped = ready_endpoints(endpoint_slice, self.source.port)
        name = _name_of(endpoint_slice)
        # Warn once per slice and reason, not on every event for the same slice.
        if skipped is not None and self._skipped.get(name) != skipped:
            logger.warning(
                "kubernetes discovery %s: ignoring EndpointSlice %s: %s",
                self.source.describe(),
                name,
                skipped,
            )
        if skipped is None:
            self._skipped.pop(name, None)
        else:
            self._skipped[name] = skipped
        return found

    def _publish(self) -> None:
        """Recompute the merged set; tell on_change only when it actually changed."""
        with self._lock:
            merged = tuple(sorted(frozenset().union(*self._slices.values())))
            previous, self._endpoints = self._endpoints, merged
        if merged == previous:
            return
        added, removed = len(set(merged) - set(previous)), len(set(previous) - set(merged))
        logger.info(
            "kubernetes discovery %s: %d ready endpoints (+%d -%d)",
            self.source.describe(),
            len(merged),
            added,
            removed,
        )
        if self._on_change is not None:
            try:
                self._on_change(merged)
            except Exception:
                # A faulty consumer must not kill discovery for everyone else.
                logger.exception("kubernetes discovery %s: on_change callback failed", self.source.describe())

    def _mark_connected(self, slices: int) -> None:
        if self._connected:
            return
        self._connected = True
        if self._synced.is_set():
            logger.info(
                "kubernetes discovery %s: API reachable again, relisted %d slices",
                self.source.describe(),
                slices,
            )
        else:
            logger.info(
                "kubernetes discovery %s: synced, %d slices, %d ready endpoints",
                self.source.describe(),
                slices,
                len(self._endpoints),
            )

    def _mark_disconnected(self, exc: Exception) -> None:
        was_connected, self._connected = self._connected, False
        # Warn on the transition (or the first failure before any sync); the repeats
        # of an outage go to debug, so a long outage is one line, not thousands.
        first_attempt = not self._synced.is_set() and self._failures == 1
        level = logging.WARNING if was_connected or first_attempt else logging.DEBUG
        logger.log(
            level,
            "kubernetes discovery %s: API unavailable (%s), keeping %d last known endpoints, retrying with backoff",
            self.source.describe(),
            _describe_error(exc),
            len(self._endpoints),
        )


def _name_of(endpoint_slice: Json) -> str:
    return (endpoint_slice.get("metadata") or {}).get("name") or ""


def _describe_error(exc: Exception) -> str:
    if isinstance(exc, ApiError):
        hint = ""
        if exc.status == 403:
            hint = "; grant list and watch on endpointslices.discovery.k8s.io"
        elif exc.status == 401:
            hint = "; the API token or client certificate was refused"
        return f"HTTP {exc.status} {exc.reason}{hint}"
    return f"{type(exc).__name__}: {exc}"
