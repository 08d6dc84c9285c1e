"""Envoy's bootstrap: what Envoy runs for the pod's whole life (the admin interface, the sidecar's
cluster, the readiness and stats listeners) and its subscriptions to the files the sidecar publishes; and
the same static parts with a policy's resources inlined, as one static configuration for
review (`extproc envoy-config`), for ``envoy --mode validate``, or for an Envoy without the
sidecar's control plane."""

from __future__ import annotations

import copy
from typing import Any

from extproc.envoy.names import (
    ADMIN_CLUSTER,
    EXT_PROC_CLUSTER,
    NODE,
    READINESS_LISTENER,
    STATS_LISTENER,
    config_source,
)
from extproc.envoy.options import EnvoyOptions
from extproc.envoy.render.listener import admin_proxy
from extproc.envoy.render.resources import Resources, render_resources
from extproc.policy.config import Policy


def render_bootstrap(options: EnvoyOptions | None = None) -> dict[str, Any]:
    """Envoy's static bootstrap: the admin interface, the sidecar's cluster, the readiness
    listener, and filesystem subscriptions to the listener and clusters the sidecar publishes in
    ``options.xds_dir``. It holds nothing the policy or the live settings change."""
    o = options or EnvoyOptions()
    return {
        "node": NODE,
        "admin": _admin(o),
        "dynamic_resources": {
            "lds_config": config_source(o.xds_dir, "lds"),
            "cds_config": config_source(o.xds_dir, "cds"),
        },
        "static_resources": {"listeners": _static_listeners(o), "clusters": _static_clusters(o)},
        "overload_manager": _OVERLOAD_MANAGER,
    }


def render(policy: Policy, options: EnvoyOptions | None = None) -> dict[str, Any]:
    """The whole resolved configuration as one static Envoy config: the bootstrap's static parts
    with the listener, routes and clusters inlined. For review (`extproc envoy-config`), for
    checking with ``envoy --mode validate`` (which never reads dynamic resources), and for
    running an Envoy without the sidecar's control plane."""
    o = options or EnvoyOptions()
    return inline(render_resources(policy, o), o)


def inline(resources: Resources, options: EnvoyOptions) -> dict[str, Any]:
    """Resources as static resources of one config (see render)."""
    listener = copy.deepcopy(resources.listener)
    filters = listener["filter_chains"][0]["filters"]
    hcm = filters[0]["typed_config"]
    # route_config where rds was, so the two forms read alike
    filters[0]["typed_config"] = {
        ("route_config" if k == "rds" else k): (copy.deepcopy(resources.routes) if k == "rds" else v)
        for k, v in hcm.items()
    }
    return {
        "node": NODE,
        "admin": _admin(options),
        "static_resources": {
            "listeners": [listener, *_static_listeners(options)],
            "clusters": [*copy.deepcopy(resources.clusters), *_static_clusters(options)],
        },
        "overload_manager": _OVERLOAD_MANAGER,
    }


def _admin(o: EnvoyOptions) -> dict[str, Any]:
    # Loopback only in the chart: the admin interface can stop Envoy and change its state.
    return {"address": {"socket_address": {"address": o.admin_address, "port_value": o.admin_port}}}


_OVERLOAD_MANAGER = {
    "resource_monitors": [
        {
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors."
                "downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": 50000,
            },
        }
    ],
}


def _static_clusters(o: EnvoyOptions) -> list[dict[str, Any]]:
    clusters = [_extproc_cluster(o)]
    if o.readiness_port is not None or o.stats_port is not None:
        clusters.append(
            {
                "name": ADMIN_CLUSTER,
                "type": "STATIC",
                "connect_timeout": "0.25s",
                "load_assignment": {
                    "cluster_name": ADMIN_CLUSTER,
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {"address": "127.0.0.1", "port_value": o.admin_port}
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                },
            }
        )
    return clusters


def _static_listeners(o: EnvoyOptions) -> list[dict[str, Any]]:
    """Listeners of the bootstrap, each serving one admin path on its own port (the admin itself
    stays on loopback: it can stop Envoy, drain it or change its state): the readiness probe's
    GET /ready, and Prometheus's GET /stats/prometheus. Neither is drained when the pod stops
    (only the client listener is inbound), so the probe sees 503 and Prometheus keeps scraping."""
    listeners = []
    if o.readiness_port is not None:
        listeners.append(admin_proxy(READINESS_LISTENER, o.listen_address, o.readiness_port, ("/ready",)))
    if o.stats_port is not None:
        # A scrape of every stat can take longer than a probe's answer.
        listeners.append(
            admin_proxy(STATS_LISTENER, o.listen_address, o.stats_port, ("/stats/prometheus",), timeout="10s")
        )
    return listeners


def _extproc_cluster(o: EnvoyOptions) -> dict[str, Any]:
    if o.extproc_address is not None:
        address: dict[str, Any] = {
            "socket_address": {"address": o.extproc_address[0], "port_value": o.extproc_address[1]}
        }
    else:
        address = {"pipe": {"path": o.extproc_uds}}
    return {
        "name": EXT_PROC_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "0.25s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        # Many ext_proc streams share one connection per Envoy worker.
                        "max_concurrent_streams": 10000,
                        "initial_stream_window_size": 1048576,
                        "initial_connection_window_size": 16777216,
                    }
                },
            }
        },
        "load_assignment": {
            "cluster_name": EXT_PROC_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }
