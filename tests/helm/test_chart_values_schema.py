"""values.schema.json rejects bad values before anything renders, naming the key and the rule."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from helm_python import HelmValuesError

from tests.helm.chart import CHART_DIR, ROOT, chart

# (values, what the message must say: the JSON pointer of the bad key and the broken rule)
BAD_VALUES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "port-as-string": ({"envoy": {"port": "8080"}}, ["at '/envoy/port'", "got string, want integer"]),
    "port-out-of-range": ({"sidecar": {"metricsPort": 70000}}, ["at '/sidecar/metricsPort'", "maximum"]),
    "unknown-transport": ({"sidecar": {"transport": "udp"}}, ["at '/sidecar/transport'", "'uds', 'tcp'"]),
    "relative-socket-dir": (
        {"sidecar": {"socketDir": "run/extproc"}},
        ["at '/sidecar/socketDir'", "does not match pattern"],
    ),
    "typo-in-a-key": ({"envoy": {"prot": 8080}}, ["at '/envoy'", "additional properties 'prot' not allowed"]),
    "typo-at-top-level": ({"replicas": 3}, ["additional properties 'replicas' not allowed"]),
    "rbac-scope": ({"rbac": {"scope": "global"}}, ["at '/rbac/scope'", "'namespace', 'cluster'"]),
    "image-digest": ({"image": {"digest": "latest"}}, ["at '/image/digest'", "does not match pattern"]),
    "envoy-duration": (
        {"envoy": {"messageTimeout": "1000ms"}},
        ["at '/envoy/messageTimeout'", "does not match pattern"],
    ),
    "endpoint-form": (
        {"envoy": {"clusterEndpoints": {"private": ["vllm-private"]}}},
        ["at '/envoy/clusterEndpoints/private/0'", "does not match pattern"],
    ),
    "forward-header-case": ({"envoy": {"forwardHeaders": ["X-User"]}}, ["at '/envoy/forwardHeaders/0'"]),
    "alert-ratio": (
        {"monitoring": {"prometheusRule": {"alerts": {"routerErrorRate": {"threshold": 5}}}}},
        ["at '/monitoring/prometheusRule/alerts/routerErrorRate/threshold'", "maximum"],
    ),
    "prometheus-duration": (
        {"monitoring": {"serviceMonitor": {"interval": "30 seconds"}}},
        ["at '/monitoring/serviceMonitor/interval'", "does not match pattern"],
    ),
    "hpa-target": (
        {"autoscaling": {"targetCPUUtilizationPercentage": 0}},
        ["at '/autoscaling/targetCPUUtilizationPercentage'", "minimum"],
    ),
    "pdb-value": (
        {"podDisruptionBudget": {"maxUnavailable": "half"}},
        ["at '/podDisruptionBudget/maxUnavailable'", "'half' does not match pattern '^[0-9]+%$'"],
    ),
    "extra-volume-without-name": ({"extraVolumes": [{"emptyDir": {}}]}, ["at '/extraVolumes/0'", "'name'"]),
    "mount-without-path": (
        {"envoy": {"extraVolumeMounts": [{"name": "ca"}]}},
        ["at '/envoy/extraVolumeMounts/0'", "'mountPath'"],
    ),
    "network-policy-typo": (
        {"networkPolicy": {"enabled": True, "client": []}},
        ["at '/networkPolicy'", "additional properties 'client' not allowed"],
    ),
    "route-timeout-form": (
        {"gateway": {"httpRoute": {"timeouts": {"request": "ten minutes"}}}},
        ["at '/gateway/httpRoute/timeouts/request'", "does not match pattern"],
    ),
    "policy-missing-keys": ({"routing": {"models": {"m": {}}}}, ["at '/routing'", "missing property 'default_model'"]),
    "policy-unknown-key": (
        {"routing": {"default_model": "m", "models": {"m": {}}, "decision": []}},
        ["at '/routing'", "additional properties 'decision' not allowed"],
    ),
    "policy-envoy-mode": (
        {
            "routing": {
                "default_model": "m",
                "models": {"m": {"replicas": {"static": ["10.0.0.1:80"], "envoy": "round_robin"}}},
            }
        },
        ["at '/routing/models/m/replicas/envoy'", "'original_dst', 'override_host', 'hash'"],
    ),
    "policy-endpoint": (
        {"routing": {"default_model": "m", "models": {"m": {"replicas": {"static": ["10.0.0.1"]}}}}},
        ["at '/routing/models/m/replicas/static/0'", "does not match pattern"],
    ),
    "policy-domain": (
        {
            "routing": {
                "default_model": "m",
                "models": {"m": {}},
                "decisions": [{"name": "d", "when": {"domain": ["astrology"]}, "model": "m"}],
            }
        },
        ["at '/routing/decisions/0/when/domain/0': value must be one of 'biology'"],
    ),
}


@pytest.mark.parametrize(("values", "expected"), list(BAD_VALUES.values()), ids=list(BAD_VALUES))
def test_bad_values_are_rejected_with_the_key_and_the_rule(values: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(HelmValuesError) as error:
        chart().validate_schema(values)
    message = str(error.value)
    for part in expected:
        assert part in message, message


def test_defaults_and_the_example_policy_pass_the_schema() -> None:
    import yaml

    chart().validate_schema({})
    chart().validate_schema({"routing": yaml.safe_load((CHART_DIR / "files" / "routing-example.yaml").read_text())})


def test_routing_schema_is_the_package_policy_schema() -> None:
    """The chart embeds extproc/policy/schema.json unchanged (generate.py)."""
    policy = json.loads((ROOT / "extproc" / "policy" / "schema.json").read_text())
    embedded = json.loads((CHART_DIR / "values.schema.json").read_text())["properties"]["routing"]
    rebased = json.loads(re.sub(r'"#/properties/routing/\$defs/', '"#/$defs/', json.dumps(embedded)))
    assert rebased["then"]["properties"] == policy["properties"]
    assert rebased["then"]["required"] == policy["required"]
    assert rebased["$defs"] == policy["$defs"]
