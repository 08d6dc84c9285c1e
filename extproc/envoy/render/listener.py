"""Envoy's listeners: the client listener (LDS), whose HTTP connection manager normalises paths,
owns the request id, strips the router's headers and runs the routing filters, and the small
listeners of the bootstrap that proxy a few GET paths to the admin interface (readiness)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from extproc import headers as h
from extproc.envoy.names import ADMIN_CLUSTER, LISTENER, config_source
from extproc.envoy.options import EnvoyOptions
from extproc.envoy.render.filters import access_log, attempt_log, ext_proc_filters
from extproc.envoy.render.local_replies import local_reply_mappers
from extproc.policy.config import Policy

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _router(upstream_log: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Envoy's router filter, the last of every filter chain (a new dict each time: a shared one
    would come out of yaml.dump as an alias)."""
    config: dict[str, Any] = {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    if upstream_log:
        config["upstream_log"] = upstream_log
    return {"name": "envoy.filters.http.router", "typed_config": config}


def client_listener(policy: Policy, o: EnvoyOptions) -> dict[str, Any]:
    """The client listener (LDS): the HTTP connection manager and its filters. Its routes come
    from RDS, so a change of models or routes never touches the listener (a listener update
    drains its connections; a route update does not)."""
    hcm = {
        "@type": _HCM,
        "stat_prefix": LISTENER,
        "codec_type": "AUTO",
        # Paths are canonical before routing (README "Paths"): dot segments resolved, percent-
        # escapes of unreserved characters decoded, backslashes and repeated slashes made single;
        # an escaped slash or backslash, NUL or a fragment is refused with 400.
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        # The request id is always Envoy's own (a client's x-request-id is removed below), so
        # logs never carry a value the client chose; the client gets it back in the response.
        "generate_request_id": True,
        "preserve_external_request_id": False,
        "always_set_request_id_in_response": True,
        # HTTP/1.0 clients (ab, old SDKs) are served like HTTP/1.1 ones instead of a text 426.
        "http_protocol_options": {"accept_http_10": True, "default_host_for_http_10": "extproc"},
        # x_gateway_destination_endpoint is not stripped as x-gateway-destination-endpoint is,
        # but some servers and gateways read the two as one header.
        "common_http_protocol_options": {"headers_with_underscores_action": "DROP_HEADER"},
        # Envoy's default is 2^31 streams per HTTP/2 connection; its edge guide says 100.
        "http2_protocol_options": {"max_concurrent_streams": 100},
        "request_headers_timeout": o.request_headers_timeout,
        "request_timeout": o.request_timeout,
        "stream_idle_timeout": o.stream_idle_timeout,
        "early_header_mutation_extensions": [
            {
                "name": "strip-router-headers",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                    # A client must not pick a replica or a cluster by sending the router's headers,
                    # nor choose the request id the logs carry.
                    "mutations": [{"remove": name} for name in (*h.ROUTER_OWNED, policy.headers.cluster, h.REQUEST_ID)],
                },
            }
        ],
        "rds": {"route_config_name": LISTENER, "config_source": config_source(o.xds_dir, "rds")},
        "http_filters": [*ext_proc_filters(policy, o), _router(attempt_log(o))],
        "local_reply_config": {"mappers": local_reply_mappers()},
        "access_log": access_log(o),
    }
    return {
        "name": LISTENER,
        "address": {"socket_address": {"address": o.listen_address, "port_value": o.listen_port}},
        # The one inbound listener: a pod's stop drains it alone (drain_listeners?inboundonly),
        # while readiness and stats keep answering (the chart's files/envoy-drain.sh).
        "traffic_direction": "INBOUND",
        "per_connection_buffer_limit_bytes": o.max_request_bytes,
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def admin_proxy(name: str, address: str, port: int, paths: Sequence[str], timeout: str = "2s") -> dict[str, Any]:
    """A listener whose only routes are GET on ``paths`` (any query), proxied to the admin
    interface: the kubelet sees Envoy's own state (503 until initialized and while draining),
    Prometheus its stats, while /quitquitquit, /drain_listeners, /healthcheck/fail,
    /runtime_modify, /config_dump and the rest stay unreachable. Every other path is a 404."""
    routes: list[dict[str, Any]] = [
        {
            "name": path.strip("/") or "root",
            "match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
            "route": {"cluster": ADMIN_CLUSTER, "timeout": timeout},
        }
        for path in paths
    ]
    routes.append({"name": "nothing-else", "match": {"prefix": "/"}, "direct_response": {"status": 404}})
    hcm = {
        "@type": _HCM,
        "stat_prefix": name,
        "route_config": {"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
        "http_filters": [_router()],
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
