"""Rendering deploy/helm/extproc with real Helm (helm-python-sdk: Helm 4 as a library)."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from helm_python import Chart, _native

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "deploy" / "helm" / "extproc"
RELEASE = "demo"
NAMESPACE = "llm"
FULLNAME = f"{RELEASE}-extproc"
MONITORING_API = "monitoring.coreos.com/v1"
GATEWAY_API = "gateway.networking.k8s.io/v1"
# Kinds kubernetes-validate has no schema for: the Prometheus Operator's and Gateway API's CRDs.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "HTTPRoute"}


@functools.cache
def chart() -> Chart:
    return Chart.load(CHART_DIR)


class RenderError(Exception):
    """Helm refused the values (schema) or a template failed (the chart's own checks)."""


@dataclass
class Rendered:
    manifests: list[dict[str, Any]]
    notes: str

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [m for m in self.all(kind) if name is None or m["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[m['metadata']['name'] for m in found]}"
        return found[0]

    def kinds(self) -> set[str]:
        return {m["kind"] for m in self.manifests}

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    def container(self, name: str) -> dict[str, Any]:
        (found,) = [c for c in (*self.pod.get("initContainers", []), *self.pod["containers"]) if c["name"] == name]
        return found

    @property
    def policy_text(self) -> str:
        return self.one("ConfigMap", f"{FULLNAME}-routing")["data"]["policy.yaml"]

    @property
    def envoy_settings_text(self) -> str:
        return self.one("ConfigMap", f"{FULLNAME}-routing")["data"]["envoy.yaml"]

    def init_step(self, *extra: str) -> tuple[int, str, str]:
        """Run the chart's init step (`extproc envoy-config` with the init container's arguments)
        on the rendered routing ConfigMap, printing instead of writing files: (exit code, stdout,
        stderr)."""
        import contextlib
        import io
        import tempfile

        from extproc.cli import main

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "policy.yaml").write_text(self.policy_text)
            (Path(tmp) / "envoy.yaml").write_text(self.envoy_settings_text)
            args = [
                a.replace("/etc/extproc/", f"{tmp}/")
                for a in self.container("envoy-config")["args"]
                if not a.startswith("--xds-dir=")
            ]
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(["envoy-config", *args, *extra])
        return code, out.getvalue(), err.getvalue()

    @property
    def envoy_config(self) -> dict[str, Any]:
        """The whole configuration the pod's Envoy runs (bootstrap and what the init step and the
        sidecar publish), resolved into one static config, as `extproc envoy-config` prints it."""
        code, out, err = self.init_step()
        assert code == 0, err
        return yaml.safe_load(out)

    def rules(self) -> dict[str, Any]:
        """The PrometheusRule's spec as a Prometheus rule file."""
        return self.one("PrometheusRule")["spec"]

    def dashboard(self) -> dict[str, Any]:
        return json.loads(self.one("ConfigMap", f"{FULLNAME}-dashboard")["data"]["extproc.json"])


def render(
    values: dict[str, Any] | None = None,
    *,
    api_versions: Iterable[str] = (),
    kube_version: str | None = None,
    namespace: str = NAMESPACE,
) -> Rendered:
    """`helm template` with the capabilities a cluster would report.

    Chart.render() does not pass the API versions and Kubernetes version the library accepts
    (`helm template --api-versions/--kube-version`), so this calls the same native entry point
    with them: the chart's monitoring objects depend on `.Capabilities.APIVersions`.
    """
    options: dict[str, Any] = {"name": RELEASE, "namespace": namespace, "is_install": True}
    if api_versions:
        options["api_versions"] = list(api_versions)
    if kube_version:
        options["kube_version"] = kube_version
    try:
        out = _native.call_string("helm_render", chart()._raw(), json.dumps(values or {}), json.dumps(options))
    except Exception as exc:  # HelmValuesError, HelmRenderError
        raise RenderError(str(exc)) from exc
    manifests: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(json.loads(out).items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(manifests, notes)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm-style deep merge of values (override wins; maps merge, everything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def walk(node: Any) -> Iterator[Any]:
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# --- values used by several tests ------------------------------------------------------------------

# Several models: static replicas (two Envoy modes), Kubernetes-discovered replicas by service and
# by selector in other namespaces (one through Envoy's ring hash), a model Envoy balances itself
# through a DNS name, and a passthrough cluster.
MANY_MODELS: dict[str, Any] = {
    "routing": {
        "version": 1,
        "default_model": "small",
        "unknown_models": "passthrough",
        "passthrough_cluster": "other",
        "cost": {"baseline_model": "large"},
        "picking": {"fallbacks": 3, "load_bound": 0.5},
        "headers": {"cluster": "x-target-cluster", "session": "x-conversation"},
        "models": {
            "small": {"replicas": {"static": ["10.0.0.5:8000", "10.0.0.6:8000"], "envoy": "original_dst"}},
            "large": {
                "upstream_model": "llama-70b",
                "replicas": {"static": ["10.0.1.5:8000", "10.0.1.6:8000"], "envoy": "override_host"},
            },
            "coder": {
                "cluster": "coder-pool",
                "replicas": {
                    "kubernetes": {"namespace": "models", "service": "vllm-coder", "port": 8000},
                    "envoy": "hash",
                },
            },
            "vision": {
                "replicas": {"kubernetes": {"namespace": "vision", "selector": "app=vllm-vision", "port": "http"}}
            },
            "mini": {"replicas": {"kubernetes": {"service": "vllm-mini", "port": 8000}, "envoy": "override_host"}},
            "private": {"upstream_model": "onprem-8b"},
        },
        "decisions": [
            {"name": "code", "when": {"keyword": ["traceback"]}, "model": "coder", "fallbacks": ["large"]},
            {"name": "tier", "when": {"header": {"name": "x-user-tier", "equals": "premium"}}, "model": "large"},
        ],
    },
    "envoy": {
        "clusterEndpoints": {"private": ["vllm-private.llm.svc.cluster.local:8000"], "other": ["10.9.9.9:8000"]},
        "forwardHeaders": ["x-user-tier", "x-team"],
    },
}

# Everything a platform team adds without forking: a CA bundle mounted in both containers, an
# OpenTelemetry collector beside them, an init container, environment, pod metadata, a
# NetworkPolicy, an HTTPRoute from a Gateway, and an extra manifest.
OPEN_CHART: dict[str, Any] = {
    "extraVolumes": [{"name": "ca-bundle", "configMap": {"name": "corp-ca"}}],
    "sidecar": {
        "extraVolumeMounts": [{"name": "ca-bundle", "mountPath": "/etc/ssl/corp", "readOnly": True}],
        "extraEnv": [{"name": "SSL_CERT_FILE", "value": "/etc/ssl/corp/ca.crt"}],
        "extraEnvFrom": [{"configMapRef": {"name": "extproc-env"}}],
        "extraArgs": ["--metrics-address=0.0.0.0"],
    },
    "envoy": {
        "extraVolumeMounts": [{"name": "ca-bundle", "mountPath": "/etc/ssl/corp", "readOnly": True}],
        "extraEnv": [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://127.0.0.1:4317"}],
    },
    "extraContainers": [
        {
            "name": "otel-collector",
            "image": "otel/opentelemetry-collector:0.100.0",
            "args": ["--config=/etc/otel/{{ .Release.Name }}.yaml"],
            "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
        }
    ],
    "extraInitContainers": [{"name": "wait", "image": "busybox:1.36", "command": ["true"]}],
    "podAnnotations": {"sidecar.opentelemetry.io/inject": "false"},
    "podLabels": {"team": "platform"},
    "networkPolicy": {
        "enabled": True,
        "clients": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}],
        "metrics": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "apiServer": [{"ipBlock": {"cidr": "172.20.0.1/32"}}],
    },
    "gateway": {
        "httpRoute": {
            "enabled": True,
            "parentRefs": [{"name": "inference", "namespace": "gateway-system"}],
            "hostnames": ["llm.example.com"],
            "timeouts": {"request": "660s"},
        }
    },
    "extraObjects": [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "{{ .Release.Name }}-otel"}, "data": {"x": "y"}}
    ],
}
