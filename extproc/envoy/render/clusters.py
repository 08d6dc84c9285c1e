"""The clusters (CDS) of the models Envoy sends requests to: fixed or DNS endpoints, each with its
load balancing (least request; override_host for the router's pick and fallbacks; ring hash on
the router's affinity key) and outlier detection. The ORIGINAL_DST cluster is in resources.py."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from extproc import headers as h
from extproc.envoy.options import EnvoyOptions, socket_address
from extproc.policy.config import OutlierDetection, Policy


def endpoint_cluster(
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
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(e)}} for e in endpoints]}],
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


def has_hostname(endpoints: Sequence[str]) -> bool:
    """True if some endpoint is a DNS name (Envoy then needs a STRICT_DNS cluster)."""
    for endpoint in endpoints:
        host = endpoint.rpartition(":")[0].strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return True
    return False


def model_endpoints(policy: Policy, name: str, options: EnvoyOptions) -> tuple[list[str], bool]:
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
        return endpoints, has_hostname(endpoints)
    raise ValueError(
        f"model {name!r}: Envoy needs endpoints for cluster {model.cluster!r} (give static replicas, a "
        f"Kubernetes service with a numeric port, or the Envoy setting cluster_endpoints.{model.cluster}; "
        "in the chart: envoy.clusterEndpoints)"
    )
