"""The chart's pod on this machine: the init step that writes Envoy's bootstrap, the sidecar and
Envoy with the arguments and the routing ConfigMap (policy and live Envoy settings) the chart
renders, run as the kubelet would run them (tests/helm/pod.py), in front of stand-in model
servers. Only ports and the socket directory are changed, through values."""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from extproc.standin import StandIn, StandInFleet
from tests.harness import Response, chat, free_port, wait_for
from tests.helm.chart import render
from tests.helm.pod import Pod

pytestmark = pytest.mark.e2e

REPLICAS = ["s1", "s2", "l1", "l2", "d1", "n1"]


def policy(fleet: StandInFleet, code_model: str = "large") -> dict:
    return {
        "version": 1,
        "default_model": "small",
        "cost": {"baseline_model": "large"},
        "models": {
            "small": {
                "upstream_model": "small-8b",
                "pricing": {"input_per_million": 0.2, "output_per_million": 0.2},
                "replicas": {"static": [fleet["s1"].address, fleet["s2"].address], "envoy": "original_dst"},
            },
            "large": {
                "upstream_model": "large-70b",
                "pricing": {"input_per_million": 1.0, "output_per_million": 2.0},
                "replicas": {"static": [fleet["l1"].address, fleet["l2"].address], "envoy": "override_host"},
            },
            "direct": {"upstream_model": "direct-model"},
        },
        "decisions": [
            {"name": "code", "when": {"keyword": ["segfault"]}, "model": code_model},
            {"name": "long", "when": {"tokens": {"min": 400}}, "model": "direct"},
        ],
    }


class ChartPod:
    def __init__(self, pod: Pod, fleet: StandInFleet, values: dict) -> None:
        self.pod, self.fleet, self.values = pod, fleet, values
        self.port = pod.port("envoy", "http")

    def policy_text(self, code_model: str) -> str:
        """The routing ConfigMap after `helm upgrade` with only the policy changed."""
        return render({**self.values, "routing": policy(self.fleet, code_model)}).policy_text

    def post(self, body: dict, path: str = "/v1/chat/completions") -> Response:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request("POST", path, orjson.dumps(body), {"content-type": "application/json"})
            answer = connection.getresponse()
            return Response(answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read())
        finally:
            connection.close()

    def readiness(self, method: str, path: str) -> int:
        return self.envoy_port("envoy-ready", method, path)[0]

    def envoy_port(self, port: str, method: str, path: str) -> tuple[int, dict[str, str], str]:
        """(status, headers, body) of a request to one of Envoy's named container ports."""
        connection = http.client.HTTPConnection("127.0.0.1", self.pod.port("envoy", port), timeout=10)
        try:
            connection.request(method, path)
            answer = connection.getresponse()
            return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read().decode()
        finally:
            connection.close()

    def metrics(self) -> str:
        connection = http.client.HTTPConnection("127.0.0.1", self.pod.port("extproc", "metrics"), timeout=10)
        try:
            connection.request("GET", "/metrics")
            return connection.getresponse().read().decode()
        finally:
            connection.close()


@pytest.fixture(scope="module", params=["uds", "tcp"])
def chart_pod(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartPod]:
    workdir = tmp_path_factory.mktemp(f"pod-{request.param}")
    with StandInFleet([StandIn(name=n) for n in REPLICAS]) as fleet:
        values = {
            "routing": policy(fleet),
            "envoy": {
                "port": free_port(),
                "readinessPort": free_port(),
                "statsPort": free_port(),
                "adminPort": free_port(),
                "concurrency": 1,
                "clusterEndpoints": {"direct": [fleet["d1"].address]},
            },
            "sidecar": {
                "transport": request.param,
                "socketDir": str(workdir / "run"),
                "tcpPort": free_port(),
                "healthPort": free_port(),
                "metricsPort": free_port(),
            },
        }
        pod = Pod(render(values), workdir)
        try:
            pod.init()
            pod.start("extproc")
            pod.wait_ready("extproc", "readinessProbe", pod.grpc_probe)
            pod.start("envoy")
            pod.wait_ready("envoy", "readinessProbe", pod.http_probe)
            yield ChartPod(pod, fleet, values)
        finally:
            pod.stop()


def test_kubelet_probes_pass_on_the_rendered_ports(chart_pod: ChartPod) -> None:
    pod = chart_pod.pod
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert pod.grpc_probe("extproc", probe), probe
    assert pod.http_probe("envoy", "readinessProbe")


def test_requests_route_through_the_rendered_envoy_to_the_chosen_replicas(chart_pod: ChartPod) -> None:
    code = chart_pod.post(chat("my program segfaults"))
    assert code.status == 200, code.body
    assert (code.headers["x-router-model"], code.headers["x-router-decision"]) == ("large", "code")
    assert code.headers["x-replica"] in {"l1", "l2"}
    assert code.json()["model"] == "large-70b"
    plain = {chart_pod.post(chat(f"hello number {i}")).headers["x-replica"] for i in range(6)}
    assert plain <= {"s1", "s2"} and plain
    long = chart_pod.post(chat("lorem ipsum dolor sit amet " * 120))
    assert (long.headers["x-router-model"], long.headers["x-replica"]) == ("direct", "d1")


def test_errors_are_openai_json_from_the_rendered_envoy(chart_pod: ChartPod) -> None:
    unknown = chart_pod.post(chat("hi", model="gpt-9"))
    assert unknown.status == 404 and unknown.json()["error"]["code"] == "model_not_found"
    connection = http.client.HTTPConnection("127.0.0.1", chart_pod.port, timeout=10)
    connection.request("GET", "/v1/chat/completions")
    answer = connection.getresponse()
    assert answer.status == 405 and orjson.loads(answer.read())["error"]["code"] == "method_not_allowed"


def test_readiness_port_answers_ready_and_exposes_nothing_else_of_the_admin(chart_pod: ChartPod) -> None:
    assert chart_pod.readiness("GET", "/ready") == 200
    assert chart_pod.readiness("GET", "/stats") == 404
    assert chart_pod.readiness("GET", "/config_dump") == 404
    assert chart_pod.readiness("POST", "/ready") == 404
    assert chart_pod.readiness("POST", "/quitquitquit") == 404
    assert chart_pod.readiness("GET", "/ready") == 200  # still running
    assert chart_pod.pod.processes["envoy"].poll() is None


def test_stats_port_serves_envoys_prometheus_stats_and_nothing_else_of_the_admin(chart_pod: ChartPod) -> None:
    assert chart_pod.post(chat("hello, counted")).status == 200
    status, headers, text = chart_pod.envoy_port("envoy-stats", "GET", "/stats/prometheus")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert "# TYPE envoy_http_ext_proc_streams_failed counter" in text
    for line in ("envoy_http_ext_proc_streams_started", "envoy_http_downstream_rq_total"):
        (value,) = [x for x in text.splitlines() if x.startswith(line + '{envoy_http_conn_manager_prefix="llm"}')]
        assert float(value.split()[-1]) >= 1, value
    assert chart_pod.envoy_port("envoy-stats", "GET", "/stats/prometheus?usedonly")[0] == 200
    refused = [
        ("POST", "/quitquitquit"),
        ("POST", "/healthcheck/fail"),
        ("POST", "/drain_listeners"),
        ("POST", "/logging?level=trace"),
        ("POST", "/runtime_modify?x=1"),
        ("POST", "/stats/prometheus"),
        ("GET", "/config_dump"),
        ("GET", "/stats"),
        ("GET", "/stats/prometheus/../../quitquitquit"),
        ("GET", "/ready"),
    ]
    for method, path in refused:
        assert chart_pod.envoy_port("envoy-stats", method, path)[0] == 404, (method, path)
    assert chart_pod.readiness("GET", "/ready") == 200  # nothing above drained or stopped Envoy
    assert chart_pod.post(chat("still routing")).status == 200


def test_usage_read_by_the_rendered_envoy_reaches_the_cost_metrics(chart_pod: ChartPod) -> None:
    response = chart_pod.post(chat("another segfault, with usage"))
    assert response.status == 200

    def large_cost() -> float:
        for line in chart_pod.metrics().splitlines():
            if line.startswith('extproc_cost_usd_total{model="large"}'):
                return float(line.split()[-1])
        return 0.0

    assert wait_for(large_cost, timeout=30) > 0


def test_editing_the_routing_configmap_reroutes_without_a_restart(chart_pod: ChartPod) -> None:
    pod = chart_pod.pod
    sidecar = pod.processes["extproc"]
    before = chart_pod.post(chat("segfault again"))
    assert before.headers["x-router-model"] == "large"
    pod.configmaps["routing"].update({"policy.yaml": chart_pod.policy_text("direct")})
    try:
        wait_for(lambda: chart_pod.post(chat("segfault again")).headers["x-router-model"] == "direct", timeout=60)
        assert pod.processes["extproc"] is sidecar and sidecar.poll() is None
    finally:
        pod.configmaps["routing"].update({"policy.yaml": chart_pod.policy_text("large")})
        wait_for(lambda: chart_pod.post(chat("segfault again")).headers["x-router-model"] == "large", timeout=60)


def test_helm_upgrade_adding_a_model_and_its_endpoints_reaches_envoy_without_a_restart(chart_pod: ChartPod) -> None:
    """A new model Envoy balances itself: a new Envoy cluster, from the policy and the live
    envoy.clusterEndpoints value, both in the routing ConfigMap; no container restarts."""
    pod = chart_pod.pod
    processes = dict(pod.processes)
    assert chart_pod.post(chat("hi", model="newer")).status == 404
    routing = policy(chart_pod.fleet)
    routing["models"]["newer"] = {"upstream_model": "newer-7b"}
    endpoints = {**chart_pod.values["envoy"]["clusterEndpoints"], "newer": [chart_pod.fleet["n1"].address]}
    upgraded = render(
        {**chart_pod.values, "routing": routing, "envoy": {**chart_pod.values["envoy"], "clusterEndpoints": endpoints}}
    )
    # Helm changes only the ConfigMap: the Deployment's pod template is the same, so nothing rolls.
    assert upgraded.deployment["spec"]["template"] == pod.rendered.deployment["spec"]["template"]
    pod.configmaps["routing"].update(upgraded.one("ConfigMap", "demo-extproc-routing")["data"])
    try:
        wait_for(lambda: chart_pod.post(chat("hi", model="newer")).status == 200, timeout=60)
        answer = chart_pod.post(chat("hi", model="newer"))
        assert (answer.headers["x-router-model"], answer.headers["x-replica"]) == ("newer", "n1")
        assert pod.processes == processes
        assert all(processes[c].poll() is None for c in ("extproc", "envoy"))
    finally:
        pod.configmaps["routing"].update(pod.rendered.one("ConfigMap", "demo-extproc-routing")["data"])
        wait_for(lambda: chart_pod.post(chat("hi", model="newer")).status == 404, timeout=60)


def test_the_pod_uses_the_socket_directory_only_with_uds(chart_pod: ChartPod) -> None:
    mounts = {m["name"]: m["mountPath"] for m in chart_pod.pod.rendered.container("extproc")["volumeMounts"]}
    socket = Path(mounts.get("socket", "/nonexistent")) / "extproc.sock"
    transport = (
        "uds" if any(a.startswith("--uds=/") for a in chart_pod.pod.rendered.container("extproc")["args"]) else "tcp"
    )
    assert socket.exists() == (transport == "uds")
