"""A policy's xDS resources: the client listener (LDS), its routes (RDS) and the clusters (CDS),
rendered together so each is checked against the others (every routed cluster exists, no name
is reserved, Envoy's buffer holds the policy's largest body)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from extproc import headers as h
from extproc.envoy.names import RESERVED_CLUSTERS
from extproc.envoy.options import EnvoyOptions
from extproc.envoy.render.chains import chain_key, chain_timeouts, provider_cluster, secret_resource, with_chain_filters
from extproc.envoy.render.clusters import endpoint_cluster, has_hostname, model_endpoints
from extproc.envoy.render.listener import client_listener
from extproc.envoy.render.routes import route_config
from extproc.policy.config import Policy


@dataclass(frozen=True)
class Resources:
    """What the sidecar serves Envoy, by xDS resource type: the client listener (LDS), its route
    configuration (RDS) and the clusters requests are routed to (CDS). Everything else Envoy
    runs is in the bootstrap and never changes while the pod lives."""

    listener: dict[str, Any]
    routes: dict[str, Any]
    clusters: tuple[dict[str, Any], ...]
    # SDS resources of providers' keys by provider name: where Envoy reads each key, written
    # beside the other files (before the clusters that name them), never the key itself.
    secrets: tuple[tuple[str, dict[str, Any]], ...] = ()


def render_resources(policy: Policy, options: EnvoyOptions | None = None) -> Resources:
    """The listener, routes and clusters Envoy needs for a policy. Raises ValueError, naming what
    to change, for a policy Envoy could not be configured for (a cluster without endpoints, a
    reserved cluster name, an address Envoy refuses)."""
    o = options or EnvoyOptions()
    clusters: dict[str, dict[str, Any]] = {}
    routed_clusters: list[str] = []
    retries: dict[str, tuple[str, int]] = {}  # cluster: (Envoy's retry_on, attempts)
    hashed: set[str] = set()
    for name, model in policy.models.items():
        if model.backends and all(b.provider is not None for b in model.backends):
            continue  # served by providers only: no cluster of its own
        mode = model.replicas.envoy if model.replicas else None
        if mode == "original_dst":
            routed_clusters.append(policy.original_dst_cluster)
            # The address is fixed: a retry goes to the same replica, on a new connection. Only a
            # reset is worth one (a pooled connection the replica closed as it was reused: vLLM's
            # server closes idle ones after 5 s); a refused connect would be refused again.
            retries[policy.original_dst_cluster] = ("reset", 1)
            continue
        _not_reserved(model.cluster)
        endpoints, dns = model_endpoints(policy, name, o)
        # Envoy's ring hash keeps every request with its key's host, like the picker's later turns,
        # so it gets the bound those have: the sticky one, where set.
        p = policy.picking
        bound = p.sticky_load_bound if p.sticky_load_bound is not None else p.load_bound
        balance = max(100, round(100 * (1 + bound))) if mode == "hash" else None
        clusters[model.cluster] = endpoint_cluster(
            model.cluster,
            endpoints,
            override_host=mode == "override_host",
            dns=dns,
            hash_balance_factor=balance,
            outlier_detection=p.outlier_detection if mode in ("hash", "override_host") else None,
        )
        routed_clusters.append(model.cluster)
        if mode == "hash":
            hashed.add(model.cluster)
        # A reset before any response byte may be sent again too: the client has seen nothing,
        # and an LLM call changes nothing on the server.
        attempts = policy.picking.fallbacks if mode == "override_host" else 1
        retries[model.cluster] = ("connect-failure,refused-stream,reset", attempts)
    if policy.original_dst_cluster in routed_clusters:
        clusters[policy.original_dst_cluster] = {
            "name": policy.original_dst_cluster,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "1s",
            "original_dst_lb_config": {
                "use_http_header": True,
                "http_header_name": h.DESTINATION_ENDPOINT,
                "metadata_key": {"key": h.METADATA_NAMESPACE, "path": [{"key": h.KEY_ENDPOINT}]},
            },
        }
    if policy.passthrough_cluster:
        endpoints = o.cluster_endpoints.get(policy.passthrough_cluster)
        if not endpoints:
            raise ValueError(
                f"passthrough_cluster {policy.passthrough_cluster!r}: Envoy needs its endpoints (the Envoy "
                f"setting cluster_endpoints.{policy.passthrough_cluster}; in the chart: envoy.clusterEndpoints)"
            )
        clusters[policy.passthrough_cluster] = endpoint_cluster(
            policy.passthrough_cluster, endpoints, dns=has_hostname(endpoints)
        )
        routed_clusters.append(policy.passthrough_cluster)
    chains: list[tuple[str, float | None, str]] = []
    secrets: list[tuple[str, dict[str, Any]]] = []
    if policy.chains:
        for cluster in clusters.values():
            if cluster["name"] != policy.passthrough_cluster:
                with_chain_filters(cluster)
        for provider in policy.providers.values():
            if provider.name in clusters:
                raise ValueError(
                    f"provider {provider.name!r} has the name of a model's cluster; name one of them differently"
                )
            clusters[provider.name] = provider_cluster(provider, o)
            secret = secret_resource(provider)
            if secret is not None:
                secrets.append((provider.name, secret))
        # The cluster a chain route names when a request carries no list (never, from the router).
        anchor = next(iter(policy.providers), None) or next(iter(clusters))
        chains = sorted(((chain_key(t), t, anchor) for t in chain_timeouts(policy)), key=lambda kv: kv[0])
    for name in clusters:
        _not_reserved(name)
    if o.max_request_bytes < policy.max_body_bytes:
        raise ValueError(
            f"max_request_bytes ({o.max_request_bytes}) is below the policy's limits.max_body_bytes "
            f"({policy.max_body_bytes}): Envoy would refuse bodies the router accepts; raise max_request_bytes"
        )
    default_cluster: str | None = o.default_cluster or policy.models[policy.default_model].cluster
    if default_cluster not in clusters:
        default_cluster = next((c for c in clusters if c != policy.original_dst_cluster), None)
    return Resources(
        listener=client_listener(policy, o),
        routes=route_config(
            o, dict.fromkeys(routed_clusters), retries, default_cluster, hashed, cache=policy.uses_cache, chains=chains
        ),
        clusters=tuple(clusters.values()),
        secrets=tuple(secrets),
    )


def _not_reserved(cluster: str) -> None:
    if cluster in RESERVED_CLUSTERS:
        raise ValueError(f"cluster {cluster!r} is reserved for Envoy's own static clusters; name it differently")
