"""The chart renders valid manifests with real Helm for its defaults and a matrix of values."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.helm.chart import (
    CHART_DIR,
    CRD_KINDS,
    FULLNAME,
    GATEWAY_API,
    MANY_MODELS,
    MONITORING_API,
    NAMESPACE,
    OPEN_CHART,
    RELEASE,
    ROOT,
    Rendered,
    RenderError,
    merge,
    render,
)

# The oldest and the newest Kubernetes versions kubernetes-validate bundles that the chart
# supports (Chart.yaml: kubeVersion >=1.25).
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())

EXAMPLE_POLICY = yaml.safe_load((CHART_DIR / "files" / "routing-example.yaml").read_text())
MONITORING_ON = {"monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}

# id -> (values, the API versions the cluster serves)
MATRIX: dict[str, tuple[dict[str, Any], list[str]]] = {
    "defaults": ({}, []),
    "monitoring-on-with-crds": (MONITORING_ON, [MONITORING_API]),
    "monitoring-on-without-crds": (MONITORING_ON, []),
    "monitoring-off-with-crds": ({"monitoring": {"dashboard": {"enabled": False}}}, [MONITORING_API]),
    "cluster-role": ({"rbac": {"scope": "cluster"}}, []),
    "hpa": ({"autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80}}, []),
    "tcp": ({"sidecar": {"transport": "tcp"}}, []),
    "many-models-static-and-discovered": (merge(MANY_MODELS, MONITORING_ON), [MONITORING_API]),
    "many-models-cluster-role-tcp-hpa": (
        merge(
            MANY_MODELS,
            {"rbac": {"scope": "cluster"}, "sidecar": {"transport": "tcp"}, "autoscaling": {"enabled": True}},
        ),
        [],
    ),
    "static-only-no-rbac-needed": (
        {
            "routing": {
                "version": 1,
                "default_model": "a",
                "models": {"a": {"replicas": {"static": ["10.0.0.1:8000"], "envoy": "override_host"}}},
            },
            "serviceAccount": {"automount": False},
            "podDisruptionBudget": {"minAvailable": "50%"},
        },
        [],
    ),
    "existing-service-account-no-rbac": (
        {"serviceAccount": {"create": False, "name": "router"}, "rbac": {"create": False}},
        [],
    ),
    "open-chart-every-extension": (merge(MANY_MODELS, OPEN_CHART), [GATEWAY_API]),
    "digests-and-two-round-trips": (
        {
            "image": {"digest": "sha256:" + "a" * 64},
            "envoy": {"image": {"digest": "sha256:" + "b" * 64}, "twoRoundTrips": True, "usage": False},
            "podDisruptionBudget": {"enabled": False},
            "preStopSleepSeconds": 0,
        },
        [],
    ),
}


@pytest.fixture(scope="module", params=list(MATRIX), ids=list(MATRIX))
def case(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], Rendered]:
    values, api_versions = MATRIX[request.param]
    return request.param, values, render(values, api_versions=api_versions)


def test_every_manifest_passes_kubernetes_validate_strict_on_oldest_and_newest(case) -> None:
    _, _, rendered = case
    for manifest in rendered.manifests:
        if manifest["kind"] in CRD_KINDS:
            continue  # no bundled schema; checked below and by promtool in tests/observability
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(
                    f"{manifest['kind']}/{manifest['metadata']['name']} on {version}: {error.message} at {list(error.path)}"
                )


def test_every_object_carries_the_standard_labels(case) -> None:
    _, _, rendered = case
    for manifest in rendered.manifests:
        labels = manifest["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "extproc"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"].startswith("extproc-")
        assert "app.kubernetes.io/version" in labels


def test_rendered_routing_config_passes_check_config(case, tmp_path: Path) -> None:
    _, _, rendered = case
    path = tmp_path / "policy.yaml"
    path.write_text(rendered.policy_text)
    result = subprocess.run(
        [sys.executable, "-m", "extproc.cli", "check-config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


def test_helm_lint_strict_passes(case) -> None:
    name, values, _ = case
    for kube_version in (f"v{v}" for v in KUBE_VERSIONS):
        report = helm_python.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version=kube_version)
        problems = [m for m in report["messages"] if m["severity"] >= 2] + [{"error": e} for e in report["errors"]]
        assert not problems, f"{name} on {kube_version}: {problems}"


# --- what the values change -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "api_versions", "expected"),
    [
        (MONITORING_ON, [MONITORING_API], {"ServiceMonitor", "PrometheusRule"}),
        (MONITORING_ON, [], set()),
        ({}, [MONITORING_API], set()),
        ({}, [], set()),
        ({"monitoring": {"serviceMonitor": {"enabled": True}}}, [MONITORING_API], {"ServiceMonitor"}),
    ],
    ids=[
        "enabled-with-crds",
        "enabled-without-crds",
        "disabled-with-crds",
        "disabled-without-crds",
        "only-servicemonitor",
    ],
)
def test_monitoring_objects_render_only_when_enabled_and_the_crds_exist(values, api_versions, expected) -> None:
    rendered = render(values, api_versions=api_versions)
    assert rendered.kinds() & CRD_KINDS == expected
    if values and not api_versions:
        assert "does not serve\nmonitoring.coreos.com/v1" in rendered.notes


def test_servicemonitor_scrapes_the_metrics_port_of_this_release_only() -> None:
    rendered = render(
        merge(MONITORING_ON, {"monitoring": {"serviceMonitor": {"labels": {"release": "kps"}}}}),
        api_versions=[MONITORING_API],
    )
    monitor = rendered.one("ServiceMonitor")
    service = rendered.one("Service")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    endpoints = {e["port"]: e["path"] for e in monitor["spec"]["endpoints"]}
    assert endpoints == {"metrics": "/metrics", "envoy-stats": "/stats/prometheus"}
    targets = {p["name"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert targets["metrics"] == "metrics" and targets["envoy-stats"] == "envoy-stats"
    metrics_port = next(p for p in rendered.container("extproc")["ports"] if p["name"] == "metrics")
    assert f"--metrics-port={metrics_port['containerPort']}" in rendered.container("extproc")["args"]
    # Envoy's stats listener is where the port points, and it serves Prometheus's path only.
    stats_port = next(p for p in rendered.container("envoy")["ports"] if p["name"] == "envoy-stats")
    assert f"--stats-port={stats_port['containerPort']}" in rendered.container("envoy-config")["args"]
    (stats,) = [x for x in rendered.envoy_config["static_resources"]["listeners"] if x["name"] == "stats"]
    assert stats["address"]["socket_address"]["port_value"] == stats_port["containerPort"]
    routes = stats["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    assert [r["match"].get("path") for r in routes if "route" in r] == ["/stats/prometheus"]


def test_prometheus_rules_select_this_release_and_name_the_expensive_model() -> None:
    rendered = render(merge(MONITORING_ON, {"monitoring": {"expensiveModel": "small"}}), api_versions=[MONITORING_API])
    rules = {r["alert"]: r for g in rendered.rules()["groups"] for r in g["rules"]}
    assert set(rules) == {
        "ExtprocSidecarDown",
        "ExtprocEnvoyDown",
        "ExtprocRouterUnavailable",
        "ExtprocEnvoyServerErrors",
        "ExtprocRouterErrorRate",
        "ExtprocDecisionLatencyHigh",
        "ExtprocConfigReloadFailed",
        "ExtprocStalePolicy",
        "ExtprocNoReadyReplica",
        "ExtprocReplicaEjected",
        "ExtprocKvEventsApproximate",
        "ExtprocAdmissionRejecting",
        "ExtprocSustainedFallback",
        "ExtprocExpensiveModelShareJump",
        "ExtprocUpstreamErrorRate",
        "ExtprocSignalFailures",
        "ExtprocPiiFailClosed",
    }
    for rule in rules.values():
        assert f'namespace="{NAMESPACE}", job="{FULLNAME}"' in rule["expr"]
    assert 'model="small"' in rules["ExtprocExpensiveModelShareJump"]["expr"]
    dashboard = render({"monitoring": {"expensiveModel": "small"}}).dashboard()
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "expensive_model"]
    assert variable["current"]["value"] == "small"


def test_alerts_can_be_switched_off_one_by_one() -> None:
    values = merge(
        MONITORING_ON, {"monitoring": {"prometheusRule": {"alerts": {"signalFailures": {"enabled": False}}}}}
    )
    rules = render(values, api_versions=[MONITORING_API]).rules()
    assert "ExtprocSignalFailures" not in {r["alert"] for g in rules["groups"] for r in g["rules"]}


def test_dashboard_configmap_is_labelled_for_the_grafana_sidecar() -> None:
    rendered = render({"monitoring": {"dashboard": {"namespace": "grafana", "annotations": {"grafana_folder": "LLM"}}}})
    configmap = rendered.one("ConfigMap", f"{FULLNAME}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["namespace"] == "grafana"
    dashboard = rendered.dashboard()
    assert dashboard["uid"] == "extproc-routing"
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "expensive_model"]
    assert variable["current"]["value"] == "large"  # routing.cost.baseline_model by default
    # Apart from that preselection, the ConfigMap holds the generated file as it is.
    shipped = json.loads((CHART_DIR / "files" / "dashboard.json").read_text())
    for v in shipped["templating"]["list"]:
        if v["name"] == "expensive_model":
            v["current"] = variable["current"]
    assert dashboard == shipped


def test_the_shipped_dashboard_imports_by_hand_with_no_placeholder_left() -> None:
    """files/dashboard.json imported directly (Grafana's Import, no chart): every variable a query
    uses is defined by the dashboard itself or built into Grafana, and no value waits for a
    substitution that only the chart would make."""
    text = (CHART_DIR / "files" / "dashboard.json").read_text()
    shipped = json.loads(text)
    assert not re.search(r'"__[A-Z_]+__"', text)
    defined = {v["name"] for v in shipped["templating"]["list"]}
    assert all(v["type"] in ("datasource", "query") for v in shipped["templating"]["list"])
    used = set()
    for panel in shipped["panels"]:
        for target in panel.get("targets", []):
            used |= set(re.findall(r"\$(\w+)", target["expr"]))
        used |= set(re.findall(r"\$(\w+)", panel.get("description", "")))
    builtin = {"__rate_interval", "__range", "__interval"}
    assert used - builtin <= defined, used - builtin - defined


def test_roles_are_created_in_each_namespace_the_policy_watches() -> None:
    rendered = render(merge(MANY_MODELS, {"rbac": {"extraNamespaces": ["staging"]}}))
    roles = rendered.all("Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["llm", "models", "staging", "vision"]
    for role in roles:
        assert role["rules"] == [
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]}
        ]
    bindings = rendered.all("RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["llm", "models", "staging", "vision"]
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]
    assert not rendered.all("ClusterRole")


def test_cluster_scope_grants_one_cluster_role_instead() -> None:
    rendered = render(merge(MANY_MODELS, {"rbac": {"scope": "cluster"}}))
    assert not rendered.all("Role") and not rendered.all("RoleBinding")
    role = rendered.one("ClusterRole")
    binding = rendered.one("ClusterRoleBinding")
    assert role["rules"][0]["verbs"] == ["get", "list", "watch"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"][0]["namespace"] == NAMESPACE


def test_a_static_only_policy_needs_no_role() -> None:
    values, _ = MATRIX["static-only-no-rbac-needed"]
    rendered = render(values)
    assert not rendered.all("Role") and not rendered.all("ClusterRole")
    assert rendered.pod["automountServiceAccountToken"] is False


def test_kubernetes_sources_without_a_namespace_get_the_release_namespace() -> None:
    policy = yaml.safe_load(render(MANY_MODELS).policy_text)
    assert policy["models"]["mini"]["replicas"]["kubernetes"]["namespace"] == NAMESPACE
    assert policy["models"]["coder"]["replicas"]["kubernetes"]["namespace"] == "models"
    default_policy = yaml.safe_load(render({}, namespace="serving").policy_text)
    assert default_policy["models"]["small"]["replicas"]["kubernetes"] == {
        "namespace": "serving",
        "service": "vllm-small",
        "port": 8000,
    }


# Values whose change rolls the pods (a new pod template): the images and the Envoy container's
# own settings (its ports, which its pod spec names too, its command line and resources). Every
# other envoy value is a live setting the sidecar applies (the chart README's "What needs a
# rollout" table lists the same).
ENVOY_ROLLS = {
    "image.repository",
    "image.tag",
    "image.digest",
    "listenAddress",
    "port",
    "readinessPort",
    "statsPort",
    "adminPort",
    "concurrency",
    "logLevel",
    "quietLoggers",
    "extraArgs",
    "extraEnv",
    "extraVolumeMounts",
    "resources",
    "readinessProbe",
    "livenessProbe",
}
ENVOY_CHANGES: dict[str, Any] = {
    "image.repository": "mirror/envoy",
    "image.tag": "v1.40.1",
    "image.digest": "sha256:" + "c" * 64,
    "listenAddress": "127.0.0.1",
    "port": 8000,
    "readinessPort": 8001,
    "statsPort": 8002,
    "adminPort": 9905,
    "concurrency": 4,
    "logLevel": "debug",
    "quietLoggers": ["ext_proc"],
    "messageTimeout": "2s",
    "maxMessageTimeout": "60s",
    "upstreamTimeout": "120s",
    "maxRequestBytes": 16777216,
    "usage": False,
    "accessLogFlushInterval": "0.1s",
    "twoRoundTrips": True,
    "forwardHeaders": ["x-org"],
    "clusterEndpoints": {"large": ["10.0.0.9:8000"]},
    "defaultCluster": "large",
    "forwardPaths": ["/v1/models", "/health"],
    "extraArgs": ["--drain-time-s", "600"],
    "extraEnv": [{"name": "X", "value": "1"}],
    "extraVolumeMounts": [{"name": "tmp", "mountPath": "/scratch"}],
    "resources": {"requests": {"cpu": "200m"}},
    "readinessProbe": {"periodSeconds": 9},
    "livenessProbe": {"periodSeconds": 19},
}


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _leaves(values: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for key, value in values.items():
        if isinstance(value, dict) and value and key not in ("resources", "readinessProbe", "livenessProbe"):
            out |= _leaves(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


def test_every_envoy_value_is_either_live_or_rolls_the_pods_as_documented() -> None:
    envoy_values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["envoy"]
    assert _leaves(envoy_values) == set(ENVOY_CHANGES)  # a new value must be classified here
    for key, value in ENVOY_CHANGES.items():
        context = {"logLevel": "debug"} if key == "quietLoggers" else {}  # they matter at debug only
        base = render({"envoy": context})
        changed = render({"envoy": merge(context, _nested(key, value))})
        template_changed = changed.deployment["spec"]["template"] != base.deployment["spec"]["template"]
        routing_changed = changed.envoy_settings_text != base.envoy_settings_text
        if key in ENVOY_ROLLS:
            assert template_changed and not routing_changed, key
        else:  # only the routing ConfigMap, which the sidecar applies live
            assert not template_changed and routing_changed, key


@pytest.mark.parametrize(
    "change",
    [
        {"decisions": [{"name": "code", "when": {"keyword": ["segfault"]}, "model": "large"}]},
        {"limits": {"max_body_bytes": 1048576}},
        {"pii": {"action": "block"}},
        {"models": {**EXAMPLE_POLICY["models"], "extra": {"replicas": {"static": ["10.0.0.9:8000"]}}}},
        {"headers": {"session": "x-conversation"}},
        {"default_model": "large"},
        {"picking": {"fallbacks": 4, "load_bound": 0.5}},
    ],
    ids=["decisions", "limits", "pii", "a-new-model", "headers", "default-model", "picking"],
)
def test_no_change_of_the_routing_policy_rolls_the_pods(change: dict[str, Any]) -> None:
    base = render({})
    changed = render({"routing": {**EXAMPLE_POLICY, **change}})
    assert changed.policy_text != base.policy_text
    assert changed.deployment == base.deployment
    assert not any("checksum" in key for key in base.deployment["spec"]["template"]["metadata"]["annotations"])


def test_both_containers_and_the_pod_are_locked_down() -> None:
    rendered = render({})
    pod = rendered.pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["enableServiceLinks"] is False
    for container in (*pod["initContainers"], *pod["containers"]):
        security = container["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "resources" in container and container["resources"]["requests"]


def test_routing_config_is_mounted_as_a_directory_never_subpath() -> None:
    rendered = render({})
    for container in (*rendered.pod["initContainers"], *rendered.pod["containers"]):
        assert all("subPath" not in m for m in container["volumeMounts"])
    mounts = {m["name"]: m["mountPath"] for m in rendered.container("extproc")["volumeMounts"]}
    assert f"--config={mounts['routing']}/policy.yaml" in rendered.container("extproc")["args"]


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


def test_probes_point_at_the_sidecar_health_port_and_envoys_readiness_listener() -> None:
    rendered = render({"sidecar": {"healthPort": 7001}, "envoy": {"readinessPort": 7002, "adminPort": 7003}})
    sidecar, envoy = rendered.container("extproc"), rendered.container("envoy")
    assert "--health-listen=0.0.0.0:7001" in sidecar["args"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["grpc"]["port"] == 7001
    assert sidecar["readinessProbe"]["grpc"]["service"] == "envoy.service.ext_proc.v3.ExternalProcessor"
    assert envoy["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert _ports(envoy)[envoy["readinessProbe"]["httpGet"]["port"]] == 7002
    config = rendered.envoy_config
    (readiness,) = [listener for listener in config["static_resources"]["listeners"] if listener["name"] == "readiness"]
    assert readiness["address"]["socket_address"]["port_value"] == 7002
    # The admin interface stays on loopback; the readiness listener reaches it through a cluster.
    assert config["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 7003}
    (admin,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "envoy_admin"]
    address = admin["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert address == {"address": "127.0.0.1", "port_value": 7003}


def test_uds_transport_shares_the_socket_directory_and_tcp_stays_on_loopback() -> None:
    uds = render({"sidecar": {"socketDir": "/run/x"}})
    (cluster,) = [c for c in uds.envoy_config["static_resources"]["clusters"] if c["name"] == "extproc"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert endpoint == {"pipe": {"path": "/run/x/extproc.sock"}}
    assert "--uds=/run/x/extproc.sock" in uds.container("extproc")["args"]
    for name in ("extproc", "envoy"):
        assert {"name": "socket", "mountPath": "/run/x"} in uds.container(name)["volumeMounts"]
    assert any(v["name"] == "socket" and "emptyDir" in v for v in uds.pod["volumes"])

    tcp = render({"sidecar": {"transport": "tcp", "tcpPort": 50123}})
    (cluster,) = [c for c in tcp.envoy_config["static_resources"]["clusters"] if c["name"] == "extproc"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert endpoint == {"socket_address": {"address": "127.0.0.1", "port_value": 50123}}
    args = tcp.container("extproc")["args"]
    assert "--listen=127.0.0.1:50123" in args and "--uds=" in args
    assert not any(v["name"] == "socket" for v in tcp.pod["volumes"])


def test_hpa_replaces_the_replica_count() -> None:
    with_hpa = render({"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 7}})
    hpa = with_hpa.one("HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 7)
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert "replicas" not in with_hpa.deployment["spec"]
    without = render({"replicaCount": 4})
    assert not without.all("HorizontalPodAutoscaler")
    assert without.deployment["spec"]["replicas"] == 4


def test_topology_spread_and_pdb_select_this_releases_pods() -> None:
    rendered = render({})
    selector = rendered.deployment["spec"]["selector"]["matchLabels"]
    constraints = rendered.pod["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert all(c["labelSelector"] == {"matchLabels": selector} for c in constraints)
    pdb = rendered.one("PodDisruptionBudget")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}
    assert rendered.one("Service")["spec"]["selector"] == selector


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"sidecar": {"metricsPort": 8080}},
            "envoy.port and sidecar.metricsPort are both 8080",
        ),
        (
            {"monitoring": {"expensiveModel": "gpt-9"}},
            'monitoring.expensiveModel "gpt-9" is not a model in routing.models (large, small)',
        ),
        (
            {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
            "autoscaling.minReplicas (5) is above autoscaling.maxReplicas (2)",
        ),
        (
            {"terminationGracePeriodSeconds": 300},
            "terminationGracePeriodSeconds (300) must be above preStopSleepSeconds + drainTimeoutSeconds (605), or "
            "the kubelet kills the pod while requests still drain; lower drainTimeoutSeconds instead",
        ),
        (
            {"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": "25%"}},
            'podDisruptionBudget sets both minAvailable (1) and maxUnavailable (25%); keep one and set the other to ""',
        ),
    ],
    ids=[
        "port-clash",
        "unknown-expensive-model",
        "hpa-min-above-max",
        "grace-below-prestop",
        "pdb-both",
    ],
)
def test_inconsistent_values_fail_with_a_message_that_says_what_to_change(values, message) -> None:
    with pytest.raises(RenderError) as error:
        render(values)
    assert message in str(error.value)


def test_generated_chart_files_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "helm" / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_the_readme_alert_table_lists_exactly_the_alerts_the_chart_ships() -> None:
    rules = render(MONITORING_ON, api_versions=[MONITORING_API]).rules()
    shipped = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    readme = (CHART_DIR / "README.md").read_text()
    table = readme[readme.index("| alert | fires when |") :].split("\n\n")[0]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    assert documented == shipped, {"undocumented": shipped - documented, "not shipped": documented - shipped}


def _github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_links_its_runbook_section_in_the_chart_readme() -> None:
    rendered = render(MONITORING_ON, api_versions=[MONITORING_API])
    base = yaml.safe_load((CHART_DIR / "values.yaml").read_text())["monitoring"]["prometheusRule"]["runbookUrl"]
    readme = (CHART_DIR / "README.md").read_text()
    runbooks = readme[readme.index("### Runbooks") :]
    anchors = {_github_anchor(h) for h in re.findall(r"^#### (.+)$", runbooks, re.M)}
    for group in rendered.rules()["groups"]:
        for rule in group["rules"]:
            url = rule["annotations"]["runbook_url"]
            assert url == f"{base}#{rule['alert'].lower()}", url
            assert rule["alert"].lower() in anchors, f"no runbook section for {rule['alert']} in the chart README"


# --- stopping a pod -------------------------------------------------------------------------------


def test_the_grace_period_follows_the_drain_bound() -> None:
    default = render({})
    assert default.pod["terminationGracePeriodSeconds"] == 5 + 600 + 25
    assert "--wait-for-envoy=615" in default.container("extproc")["args"]
    quick = render({"preStopSleepSeconds": 2, "drainTimeoutSeconds": 60})
    assert quick.pod["terminationGracePeriodSeconds"] == 2 + 60 + 25
    assert "--wait-for-envoy=72" in quick.container("extproc")["args"]
    assert render({"terminationGracePeriodSeconds": 900}).pod["terminationGracePeriodSeconds"] == 900


def test_envoys_prestop_hook_runs_the_drain_script_with_the_values() -> None:
    rendered = render({"envoy": {"adminPort": 9911}, "preStopSleepSeconds": 3, "drainTimeoutSeconds": 120})
    command = rendered.container("envoy")["lifecycle"]["preStop"]["exec"]["command"]
    script = (CHART_DIR / "files" / "envoy-drain.sh").read_text()
    assert command == ["/bin/bash", "-c", script, "envoy-drain", "9911", "3", "120"]
    # The stat it waits on is the client listener's, whatever names.py calls it.
    from extproc.envoy.names import LISTENER

    assert f'"http.{LISTENER}.downstream_rq_active:"' in script
    # The sidecar has no hook: it serves until Envoy has exited (serve --wait-for-envoy).
    assert "lifecycle" not in rendered.container("extproc")


# --- extending the chart without forking it ------------------------------------------------------


def test_extra_volumes_mounts_containers_env_and_pod_metadata_land_where_asked() -> None:
    rendered = render(OPEN_CHART, api_versions=[GATEWAY_API])
    pod = rendered.pod
    assert {"name": "ca-bundle", "configMap": {"name": "corp-ca"}} in pod["volumes"]
    for name in ("extproc", "envoy"):
        assert {"name": "ca-bundle", "mountPath": "/etc/ssl/corp", "readOnly": True} in rendered.container(name)[
            "volumeMounts"
        ]
    sidecar, envoy = rendered.container("extproc"), rendered.container("envoy")
    assert {"name": "SSL_CERT_FILE", "value": "/etc/ssl/corp/ca.crt"} in sidecar["env"]
    assert sidecar["envFrom"] == [{"configMapRef": {"name": "extproc-env"}}]
    assert sidecar["args"][-1] == "--metrics-address=0.0.0.0"
    assert envoy["env"] == [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://127.0.0.1:4317"}]
    collector = rendered.container("otel-collector")
    assert collector["args"] == [f"--config=/etc/otel/{RELEASE}.yaml"]  # templated
    assert [c["name"] for c in pod["initContainers"]] == ["envoy-config", "wait"]
    template = rendered.deployment["spec"]["template"]["metadata"]
    assert template["annotations"]["sidecar.opentelemetry.io/inject"] == "false"
    assert template["labels"]["team"] == "platform"
    assert rendered.one("ConfigMap", f"{RELEASE}-otel")["data"] == {"x": "y"}
    # Without them, nothing of it appears.
    plain = render({})
    assert [c["name"] for c in plain.pod["initContainers"]] == ["envoy-config"]
    assert "env" not in plain.container("envoy")
    assert [c["name"] for c in plain.pod["containers"]] == ["extproc", "envoy"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"sidecar": {"extraVolumeMounts": [{"name": "ca", "mountPath": "/ca"}]}},
            'sidecar.extraVolumeMounts: "ca" is not a volume of the pod; add it to extraVolumes',
        ),
        (
            {"extraVolumes": [{"name": "tmp", "emptyDir": {}}]},
            'extraVolumes: a volume is named "tmp", as one of the chart\'s',
        ),
        (
            {"gateway": {"httpRoute": {"enabled": True}}},
            "gateway.httpRoute.enabled needs gateway.httpRoute.parentRefs",
        ),
    ],
    ids=["mount-of-unknown-volume", "volume-name-clash", "route-without-gateway"],
)
def test_extensions_that_cannot_work_fail_with_what_to_change(values: dict[str, Any], message: str) -> None:
    with pytest.raises(RenderError) as error:
        render(values)
    assert message in str(error.value)


def _egress(rendered: Rendered) -> list[dict[str, Any]]:
    return rendered.one("NetworkPolicy")["spec"]["egress"]


def test_network_policy_is_off_by_default() -> None:
    assert not render({}).all("NetworkPolicy")


def test_network_policy_allows_exactly_the_pods_traffic() -> None:
    rendered = render(merge(MANY_MODELS, OPEN_CHART), api_versions=[GATEWAY_API])
    policy = rendered.one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == rendered.deployment["spec"]["selector"]["matchLabels"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    # In: clients to Envoy's listener, Prometheus to the metrics port, each from the given peers only.
    ports = {p["name"]: p["containerPort"] for c in rendered.pod["containers"] for p in c.get("ports", [])}
    (clients, metrics) = policy["ingress"]
    assert clients["ports"] == [{"port": "http", "protocol": "TCP"}] and ports["http"] == 8080
    assert clients["from"] == OPEN_CHART["networkPolicy"]["clients"]
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}, {"port": "envoy-stats", "protocol": "TCP"}]
    assert ports["metrics"] == 9090 and ports["envoy-stats"] == 9902
    assert metrics["from"] == OPEN_CHART["networkPolicy"]["metrics"]
    # Out: DNS, the API server, and every replica source of the policy on its port.
    egress = _egress(rendered)
    assert egress[0]["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    assert egress[1] == {
        "ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "172.20.0.1/32"}}],
    }
    rules = egress[2:]
    for address in ("10.0.0.5", "10.0.0.6", "10.0.1.5", "10.0.1.6", "10.9.9.9"):  # static, clusterEndpoints
        assert {"ports": [{"port": 8000, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": f"{address}/32"}}]} in rules
    for namespace, port in (("models", 8000), ("vision", "http"), (NAMESPACE, 8000)):  # discovered
        peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}
        assert {"ports": [{"port": port, "protocol": "TCP"}], "to": [peer]} in rules
    # A DNS name (envoy.clusterEndpoints.private) can only be allowed by its port.
    assert {"ports": [{"port": 8000, "protocol": "TCP"}]} in rules
    assert len(rules) == 9


def test_network_policy_of_a_static_policy_opens_no_api_server_access() -> None:
    values = {
        "networkPolicy": {"enabled": True},
        "routing": {"version": 1, "default_model": "a", "models": {"a": {"replicas": {"static": ["[fd00::7]:8000"]}}}},
    }
    egress = _egress(render(values))
    assert egress == [
        {"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]},
        {"ports": [{"port": 8000, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "fd00::7/128"}}]},
    ]


def test_httproute_sends_the_gateways_requests_to_the_routers_service() -> None:
    rendered = render(OPEN_CHART, api_versions=[GATEWAY_API])
    route = rendered.one("HTTPRoute")
    assert route["apiVersion"] == GATEWAY_API
    assert route["spec"]["parentRefs"] == [{"name": "inference", "namespace": "gateway-system"}]
    assert route["spec"]["hostnames"] == ["llm.example.com"]
    (rule,) = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/v1"}}]
    assert rule["timeouts"] == {"request": "660s"}
    service = rendered.one("Service")
    (http,) = [p for p in service["spec"]["ports"] if p["name"] == "http"]
    assert rule["backendRefs"] == [{"name": service["metadata"]["name"], "port": http["port"]}]
    without_crds = render(OPEN_CHART)
    assert not without_crds.all("HTTPRoute")
    assert "does not serve\ngateway.networking.k8s.io/v1" in without_crds.notes


def test_network_policy_lets_the_sidecar_reach_the_replicas_kv_event_publishers() -> None:
    from extproc.policy.config import KvEvents

    assert KvEvents(tokenizer="t").endpoint == "tcp://{host}:5557"  # the template's default
    kv = {"tokenizer": "/models/tokenizer.json", "replay_endpoint": "tcp://{host}:5558"}
    models = {
        "a": {"replicas": {"static": ["10.0.0.5:8000"], "kv_events": kv}},
        "b": {"replicas": {"kubernetes": {"namespace": "models", "service": "vllm", "port": 8000}, "kv_events": kv}},
        "c": {
            "replicas": {
                "static": ["10.0.0.7:8000"],
                "kv_events": {"tokenizer": "/t.json", "endpoints": {"10.0.0.7:8000": "tcp://10.0.3.3:6000"}},
            }
        },
    }
    values = {"networkPolicy": {"enabled": True}, "routing": {"version": 1, "default_model": "a", "models": models}}
    rules = _egress(render(values))
    zmq = [{"port": 5557, "protocol": "TCP"}, {"port": 5558, "protocol": "TCP"}]
    assert {"ports": zmq, "to": [{"ipBlock": {"cidr": "10.0.0.5/32"}}]} in rules
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "models"}}}
    assert {"ports": zmq, "to": [peer]} in rules
    assert {"ports": [{"port": 6000, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": "10.0.3.3/32"}}]} in rules
