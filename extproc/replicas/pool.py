"""Replica pools per model: static lists, or EndpointSlices watched in Kubernetes.

Watchers are long-lived and shared across config reloads: a reload that keeps a model's
Kubernetes source keeps its watcher (and its last known endpoints) instead of relisting.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from extproc.policy.config import KubernetesReplicas, Policy

if TYPE_CHECKING:
    from extproc.replicas.kubeapi import ApiClient
    from extproc.replicas.kubernetes import EndpointSliceWatcher

log = logging.getLogger("extproc.replicas")

EndpointSource = Callable[[], tuple[str, ...]]


class Discovery:
    """Owns the Kubernetes watchers; creates the API client only if some model needs it."""

    def __init__(
        self, kubeconfig: str | None = None, api_client: ApiClient | None = None, sync_timeout: float = 5.0
    ) -> None:
        self._kubeconfig = kubeconfig
        self._api = api_client
        self._sync_timeout = sync_timeout
        self._watchers: dict[KubernetesReplicas, EndpointSliceWatcher] = {}
        self._lock = threading.Lock()
        self.on_change: Callable[[], None] | None = None

    def source(self, spec: KubernetesReplicas) -> EndpointSource:
        """Start (or reuse) the watcher for spec; waits briefly for its first list."""
        from extproc.replicas import kubernetes

        with self._lock:
            watcher = self._watchers.get(spec)
            if watcher is None:
                if self._api is None:
                    self._api = kubernetes.load_api_client(self._kubeconfig)
                # No namespace in the policy: the pod's own (or the kubeconfig context's), as kubectl.
                namespace = spec.namespace or self._api.namespace
                source = kubernetes.KubernetesSource(namespace, spec.service, spec.selector, spec.port)
                watcher = kubernetes.EndpointSliceWatcher(source, api_client=self._api, on_change=self._changed)
                watcher.start()
                self._watchers[spec] = watcher
        if not watcher.wait_synced(self._sync_timeout):
            log.warning(
                "replica discovery %s: no list within %.0fs; routing starts with no replicas for it",
                watcher.source.describe(),
                self._sync_timeout,
            )
        return lambda: watcher.endpoints

    def _changed(self, _endpoints: tuple[str, ...]) -> None:
        if self.on_change is not None:
            self.on_change()

    def retain(self, specs: Iterable[KubernetesReplicas]) -> None:
        """Stop the watchers no model uses any more (after a reload swapped them out)."""
        keep = set(specs)
        with self._lock:
            stale = [(s, w) for s, w in self._watchers.items() if s not in keep]
            for spec, _ in stale:
                del self._watchers[spec]
        for _, watcher in stale:
            watcher.stop()

    def close(self) -> None:
        self.retain(())


class Pools:
    """Endpoints of each model with replicas, for one policy snapshot."""

    def __init__(self, sources: Mapping[str, EndpointSource]) -> None:
        self._sources = dict(sources)

    @classmethod
    def build(cls, policy: Policy, discovery: Discovery) -> Pools:
        sources: dict[str, EndpointSource] = {}
        for name, model in policy.models.items():
            if model.replicas is None:
                continue
            if model.replicas.kubernetes is not None:
                sources[name] = discovery.source(model.replicas.kubernetes)
            else:
                static = model.replicas.static
                sources[name] = lambda static=static: static
        return cls(sources)

    def endpoints(self, model: str) -> tuple[str, ...]:
        source = self._sources.get(model)
        return source() if source is not None else ()

    def models(self) -> Iterable[str]:
        return self._sources.keys()

    def all_endpoints(self) -> set[str]:
        return {e for source in self._sources.values() for e in source()}
