"""The Envoy bootstrap the chart renders is the one extproc/envoy.py defines, and Envoy accepts it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from extproc.envoy import EnvoyOptions, validate
from extproc.envoy import render as render_envoy
from extproc.policy.load import parse_policy
from tests.helm.chart import MANY_MODELS, Rendered, chart, merge, render

# What only the chart adds to the bootstrap: the kubelet's readiness listener and its route to
# the admin interface on loopback.
CHART_ONLY_LISTENERS = {"readiness"}
CHART_ONLY_CLUSTERS = {"envoy_admin"}

CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "many-models": MANY_MODELS,
    "tcp-two-round-trips-no-usage": merge(
        MANY_MODELS,
        {"sidecar": {"transport": "tcp", "tcpPort": 50100}, "envoy": {"twoRoundTrips": True, "usage": False}},
    ),
    "ports-timeouts-headers": {
        "envoy": {
            "port": 18080,
            "adminPort": 19901,
            "listenAddress": "127.0.0.1",
            "messageTimeout": "0.5s",
            "accessLogFlushInterval": "0.1s",
            "upstreamTimeout": "120s",
            "maxRequestBytes": 16777216,
            "forwardHeaders": ["x-org"],
            "defaultCluster": "large",
            "forwardPaths": ["/v1/models", "/health"],
        },
        "sidecar": {"socketDir": "/run/extproc/"},
    },
    "outlier-detection-tuned": merge(
        MANY_MODELS,
        {
            "routing": {
                "picking": {
                    "outlier_detection": {
                        "consecutive_5xx": 2,
                        "max_ejection_percent": 34,
                        "interval": "0.5s",
                        "base_ejection_time": "600.0s",  # no cap given: the cap becomes the base, as in Envoy
                    }
                }
            }
        },
    ),
    "outlier-detection-off": merge(MANY_MODELS, {"routing": {"picking": {"outlier_detection": {"enabled": False}}}}),
    "static-ips-envoy-balanced-default": {
        "routing": {
            "version": 1,
            "default_model": "b",
            "original_dst_cluster": "picked",
            "models": {
                "a": {"replicas": {"static": ["10.0.0.1:8000", "[fd00::1]:8000"], "envoy": "hash"}},
                "b": {"cluster": "pool-b"},
                "c": {"replicas": {"static": ["10.0.0.3:8000"]}},
            },
        },
        "envoy": {"clusterEndpoints": {"pool-b": ["10.0.0.9:8000", "10.0.0.10:8000"]}},
    },
}


def python_options(values: dict[str, Any]) -> EnvoyOptions:
    """EnvoyOptions for the same settings, from the values Helm would use."""
    v = chart().merge_values(values)
    envoy, sidecar = v["envoy"], v["sidecar"]
    tcp = sidecar["transport"] == "tcp"
    return EnvoyOptions(
        listen_address=envoy["listenAddress"],
        listen_port=envoy["port"],
        admin_address="127.0.0.1",
        admin_port=envoy["adminPort"],
        extproc_uds=None if tcp else sidecar["socketDir"].rstrip("/") + "/extproc.sock",
        extproc_address=("127.0.0.1", sidecar["tcpPort"]) if tcp else None,
        forward_headers=tuple(envoy["forwardHeaders"]),
        message_timeout=envoy["messageTimeout"],
        upstream_timeout=envoy["upstreamTimeout"],
        max_request_bytes=envoy["maxRequestBytes"],
        usage=envoy["usage"],
        access_log_flush=envoy["accessLogFlushInterval"],
        two_round_trips=envoy["twoRoundTrips"],
        cluster_endpoints=envoy["clusterEndpoints"],
        default_cluster=envoy["defaultCluster"] or None,
        forward_paths=tuple(envoy["forwardPaths"]),
    )


def without_chart_additions(config: dict[str, Any]) -> dict[str, Any]:
    resources = config["static_resources"]
    return {
        **config,
        "static_resources": {
            "listeners": [x for x in resources["listeners"] if x["name"] not in CHART_ONLY_LISTENERS],
            "clusters": [x for x in resources["clusters"] if x["name"] not in CHART_ONLY_CLUSTERS],
        },
    }


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def rendered(request: pytest.FixtureRequest) -> tuple[dict[str, Any], Rendered]:
    values = CASES[request.param]
    return values, render(values)


def test_chart_bootstrap_matches_extproc_envoy_config(rendered) -> None:
    values, chart_output = rendered
    policy = parse_policy(chart_output.policy_text, "chart routing")
    expected = render_envoy(policy, python_options(values))
    actual = without_chart_additions(chart_output.envoy_config)
    # Section by section first, so a failure names the part that drifted.
    for key in ("admin", "overload_manager"):
        assert actual[key] == expected[key], key
    expected_clusters = {c["name"]: c for c in expected["static_resources"]["clusters"]}
    actual_clusters = {c["name"]: c for c in actual["static_resources"]["clusters"]}
    assert list(actual_clusters) == list(expected_clusters)
    for name, cluster in expected_clusters.items():
        assert actual_clusters[name] == cluster, f"cluster {name}"
    (expected_listener,) = expected["static_resources"]["listeners"]
    (actual_listener,) = actual["static_resources"]["listeners"]
    expected_hcm = expected_listener["filter_chains"][0]["filters"][0]["typed_config"]
    actual_hcm = actual_listener["filter_chains"][0]["filters"][0]["typed_config"]
    expected_routes = expected_hcm["route_config"]["virtual_hosts"][0]["routes"]
    actual_routes = actual_hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["name"] for r in actual_routes] == [r["name"] for r in expected_routes]
    for expected_route, actual_route in zip(expected_routes, actual_routes, strict=True):
        assert actual_route == expected_route, f"route {expected_route['name']}"
    assert actual_hcm["http_filters"] == expected_hcm["http_filters"]
    assert actual == expected


def test_chart_bootstrap_passes_envoy_validate(rendered, tmp_path: Path) -> None:
    _, chart_output = rendered
    ok, output = validate(chart_output.envoy_config, str(tmp_path))
    assert ok, output


def test_readiness_listener_routes_only_get_ready_to_the_admin() -> None:
    config = render({}).envoy_config
    (listener,) = [x for x in config["static_resources"]["listeners"] if x["name"] == "readiness"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    forwarded = [r for r in routes if "route" in r]
    assert [(r["match"]["path"], r["route"]["cluster"]) for r in forwarded] == [("/ready", "envoy_admin")]
    assert forwarded[0]["match"]["headers"] == [{"name": ":method", "string_match": {"exact": "GET"}}]
    assert routes[-1] == {"name": "nothing-else", "match": {"prefix": "/"}, "direct_response": {"status": 404}}
