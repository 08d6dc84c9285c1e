"""A real Prometheus (Debian's `prometheus` package) for the observability tests, and the chart's
dashboard queries and alert rules to run through it."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import free_port, wait_for
from tests.helm.chart import FULLNAME, MONITORING_API, NAMESPACE, Rendered, render

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="the prometheus and promtool binaries are missing (Debian: apt-get install prometheus; .ci/run does)",
)

# The labels a ServiceMonitor gives the sidecar's series: job is the Service's name.
TARGET_LABELS = {"namespace": NAMESPACE, "job": FULLNAME}
# ... and those that tell its two endpoints of one pod apart: the Service port a target is.
POD = "router-0"
SIDECAR_ENDPOINT = "metrics"
ENVOY_ENDPOINT = "envoy-stats"


def chart_monitoring(alerts: dict[str, Any] | None = None) -> Rendered:
    values = {"monitoring": {"prometheusRule": {"enabled": True, "alerts": alerts or {}}}}
    return render(values, api_versions=[MONITORING_API])


def alert_rules(rendered: Rendered) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in rendered.rules()["groups"] for rule in group["rules"]}


def dashboard_targets(rendered: Rendered) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel, rows included."""
    out = []

    def visit(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            visit(panel.get("panels", []))
            out.extend((panel["title"], target["expr"]) for target in panel.get("targets", []))

    visit(rendered.dashboard()["panels"])
    return out


def grafana_variables(rendered: Rendered, rate_interval: str, dashboard_range: str) -> dict[str, str]:
    """What Grafana substitutes in the queries, for one selected namespace and router."""
    # Single-choice variables take the value the chart preselected.
    constants = {
        v["name"]: v["current"]["value"]
        for v in rendered.dashboard()["templating"]["list"]
        if v["type"] == "query" and not v.get("multi") and v.get("current")
    }
    return {
        "__rate_interval": rate_interval,
        "__range": dashboard_range,
        "namespace": NAMESPACE,
        "job": FULLNAME,
        **constants,
    }


def substitute(expr: str, variables: dict[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in variables, f"the test does not know Grafana variable ${name} in {expr}"
        return variables[name]

    return re.sub(r"\$(\w+)", one, expr)


def write_rules(rendered: Rendered, path: Path, *, annotations: bool = True) -> Path:
    spec = rendered.rules()
    if not annotations:
        spec = {
            "groups": [
                {**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
                for g in spec["groups"]
            ]
        }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=300)


class Prometheus:
    """Prometheus on a loopback port with its own config and storage, stopped on exit. It scrapes
    the sidecar's /metrics and, given its port, Envoy's stats listener, labelled as the chart's
    ServiceMonitor labels them (one job, the endpoint telling them apart)."""

    def __init__(
        self, workdir: Path, scrape_port: int, rule_file: Path | None = None, envoy_stats_port: int | None = None
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        labels = {"namespace": TARGET_LABELS["namespace"], "pod": POD}
        scrape_configs = [
            {
                "job_name": TARGET_LABELS["job"],
                "static_configs": [
                    {"targets": [f"127.0.0.1:{scrape_port}"], "labels": {**labels, "endpoint": SIDECAR_ENDPOINT}}
                ],
            }
        ]
        if envoy_stats_port is not None:
            scrape_configs.append(
                {
                    # Prometheus needs a job name per scrape config; the label is set back to the
                    # Service's name, as a ServiceMonitor's two endpoints share it.
                    "job_name": f"{TARGET_LABELS['job']}-envoy",
                    "metrics_path": "/stats/prometheus",
                    "static_configs": [
                        {
                            "targets": [f"127.0.0.1:{envoy_stats_port}"],
                            "labels": {**labels, "endpoint": ENVOY_ENDPOINT},
                        }
                    ],
                    "relabel_configs": [{"target_label": "job", "replacement": TARGET_LABELS["job"]}],
                }
            )
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rule_file)] if rule_file else [],
            "scrape_configs": scrape_configs,
        }
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Prometheus:
        assert PROMETHEUS is not None
        self._log = open(self.workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as response:
                    return response.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        wait_for(ready, timeout=120, interval=0.2)
        return self

    def log(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-3000:]

    def api(self, path: str, **params: str) -> dict[str, Any]:
        data = urllib.parse.urlencode(params).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/v1/{path}", data=data if params else None)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:  # 400 for a query that does not parse
            return json.loads(error.read())

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def last_scrape(self) -> float:
        """Time by which every target was last scraped (0 before the first scrape of each)."""
        result = self.query(f'timestamp(up{{job="{TARGET_LABELS["job"]}"}})')
        samples = result.get("data", {}).get("result", [])
        expected = len(self.config_targets())
        return min(float(s["value"][1]) for s in samples) if len(samples) == expected else 0.0

    def config_targets(self) -> list[str]:
        config = yaml.safe_load(self.config_path.read_text())
        return [t for c in config["scrape_configs"] for s in c["static_configs"] for t in s["targets"]]

    def firing(self) -> dict[str, list[dict[str, str]]]:
        """Alerts firing now: name -> the label sets it fires with."""
        out: dict[str, list[dict[str, str]]] = {}
        for alert in self.api("alerts")["data"]["alerts"]:
            if alert["state"] == "firing":
                out.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
        return out

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None
            self._log.close()


def finite_samples(result: dict[str, Any]) -> list[float]:
    data = result["data"]
    if data["resultType"] == "scalar":
        values = [float(data["result"][1])]
    else:
        values = [float(sample["value"][1]) for sample in data["result"]]
    return [v for v in values if math.isfinite(v)]
