"""The chart's values reach Envoy: its init step (`extproc envoy-config` on the rendered routing
ConfigMap, with the init container's arguments) resolves the configuration the pod's Envoy runs,
Envoy accepts it, and it is the one extproc/envoy/render/ renders for the same settings. The chart
holds no Envoy configuration of its own; these tests check what it passes along."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.envoy.options import LIVE_SETTINGS, EnvoyOptions
from extproc.envoy.process import validate
from extproc.envoy.render.bootstrap import render
from extproc.policy.load import parse_policy
from tests.helm.chart import CHART_DIR, MANY_MODELS, Rendered, chart, merge
from tests.helm.chart import render as render_chart

EXAMPLE_POLICY = yaml.safe_load((CHART_DIR / "files" / "routing-example.yaml").read_text())

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
            "readinessPort": 18081,
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
                        "base_ejection_time": "600.0s",
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
    """EnvoyOptions for the same values, mapped here by hand: what the chart must pass along."""
    v = chart().merge_values(values)
    envoy, sidecar = v["envoy"], v["sidecar"]
    tcp = sidecar["transport"] == "tcp"
    return EnvoyOptions(
        listen_address=envoy["listenAddress"],
        listen_port=envoy["port"],
        admin_address="127.0.0.1",
        admin_port=envoy["adminPort"],
        readiness_port=envoy["readinessPort"],
        stats_port=envoy["statsPort"],
        extproc_uds=sidecar["socketDir"].rstrip("/") + "/extproc.sock",
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


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def rendered(request: pytest.FixtureRequest) -> tuple[dict[str, Any], Rendered]:
    values = CASES[request.param]
    return values, render_chart(values)


def test_the_values_reach_envoys_configuration(rendered) -> None:
    values, chart_output = rendered
    expected = render(parse_policy(chart_output.policy_text, "chart routing"), python_options(values))
    expected = yaml.safe_load(yaml.safe_dump(expected))  # tuples as lists, as printed
    assert chart_output.envoy_config == expected


def test_the_chart_configuration_passes_envoy_validate(rendered, tmp_path: Path) -> None:
    _, chart_output = rendered
    ok, output = validate(chart_output.envoy_config, str(tmp_path))
    assert ok, output


def test_the_sidecar_publishes_for_the_listener_the_init_step_wrote(rendered) -> None:
    """The init step and `serve` must render the same listener, or the first update would move it."""
    _, chart_output = rendered
    init = chart_output.container("envoy-config")["args"]
    serve = chart_output.container("extproc")["args"]
    value = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in (*init, *serve) if "=" in a}
    assert f"--envoy-listen={value['--listen-address']}:{value['--listen-port']}" in serve
    assert f"--envoy-admin=127.0.0.1:{value['--admin-port']}" in serve
    for flag in ("--xds-dir", "--envoy-settings", "--config"):
        assert [a for a in init if a.startswith(flag + "=")] == [a for a in serve if a.startswith(flag + "=")], flag


def test_the_envoy_values_default_to_the_sidecars_defaults() -> None:
    """values.yaml documents each live Envoy setting's default; extproc/envoy/options.py owns it."""
    defaults = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["envoy"]
    names = {
        "message_timeout": "messageTimeout",
        "max_message_timeout": "maxMessageTimeout",
        "upstream_timeout": "upstreamTimeout",
        "max_request_bytes": "maxRequestBytes",
        "usage": "usage",
        "access_log_flush": "accessLogFlushInterval",
        "two_round_trips": "twoRoundTrips",
        "forward_headers": "forwardHeaders",
        "cluster_endpoints": "clusterEndpoints",
        "default_cluster": "defaultCluster",
        "forward_paths": "forwardPaths",
    }
    assert set(names) == set(LIVE_SETTINGS) - {"cluster_domain"}  # the chart's cluster domain is the default
    code = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(EnvoyOptions)
    }
    for setting, value in names.items():
        expected = code[setting]
        expected = list(expected) if isinstance(expected, tuple) else expected
        assert (defaults[value] or None if setting == "default_cluster" else defaults[value]) == expected, value
    assert (defaults["listenAddress"], defaults["port"], defaults["adminPort"]) == (
        code["listen_address"],
        code["listen_port"],
        code["admin_port"],
    )


def test_readiness_listener_routes_only_get_ready_to_the_admin() -> None:
    config = render_chart({}).envoy_config
    (listener,) = [x for x in config["static_resources"]["listeners"] if x["name"] == "readiness"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    forwarded = [r for r in routes if "route" in r]
    assert [(r["match"]["path"], r["route"]["cluster"]) for r in forwarded] == [("/ready", "envoy_admin")]
    assert forwarded[0]["match"]["headers"] == [{"name": ":method", "string_match": {"exact": "GET"}}]
    assert routes[-1] == {"name": "nothing-else", "match": {"prefix": "/"}, "direct_response": {"status": 404}}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"routing": {**EXAMPLE_POLICY, "limits": {"max_body_bytes": 16777216}}},
            "max_request_bytes (8388608) is below the policy's limits.max_body_bytes (16777216)",
        ),
        (
            {"routing": {**EXAMPLE_POLICY, "models": {**EXAMPLE_POLICY["models"], "extra": {}}}},
            "model 'extra': Envoy needs endpoints for cluster 'extra'",
        ),
        (
            {"routing": {**EXAMPLE_POLICY, "unknown_models": "passthrough", "passthrough_cluster": "other"}},
            "passthrough_cluster 'other': Envoy needs its endpoints (the Envoy setting cluster_endpoints.other",
        ),
        (
            {"routing": {"version": 1, "default_model": "large", "models": {"large": {"cluster": "extproc"}}}},
            "cluster 'extproc' is reserved",
        ),
        ({"envoy": {"clusterEndpoints": {"large": ["10.0.0.1:70000"]}}}, "port from 1 to 65535"),
    ],
    ids=[
        "buffer-below-body-limit",
        "model-without-endpoints",
        "passthrough-without-endpoints",
        "reserved-cluster",
        "bad-port",
    ],
)
def test_values_envoy_cannot_run_stop_the_init_step_with_what_to_change(values, message) -> None:
    """Helm renders them (only the policy's renderer knows what Envoy needs); the pod's init step
    refuses them with the message below, and a running sidecar refuses such a reload."""
    code, _, err = render_chart(values).init_step()
    assert code == 1 and message in err, err
