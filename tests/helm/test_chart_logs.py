"""The chart's Envoy at debug level keeps prompts, PII and header values out of its log (issue 15,
item 9): its ext_proc, http, router and sse loggers stay at info (envoy.quietLoggers). Run as the
kubelet would run the rendered pod (tests/helm/pod.py); with the loggers unpinned, the same
request does land in the log, so the check can fail."""

from __future__ import annotations

import http.client

import orjson
import pytest

from extproc.standin import StandIn, StandInFleet
from tests.harness import chat, free_port
from tests.helm.chart import render
from tests.helm.pod import Pod

pytestmark = pytest.mark.e2e

SECRETS = ("078-05-1120", "PROMPT-ZEBRA", "HEADER-ZEBRA", "sk-KEY-ZEBRA")


@pytest.mark.parametrize(
    ("level", "quiet"), [("debug", None), ("trace", None), ("debug", [])], ids=["debug", "trace", "debug-unpinned"]
)
def test_envoy_at_debug_logs_no_prompt_or_header_value(tmp_path, level: str, quiet: list | None) -> None:
    with StandInFleet([StandIn(name="s1")]) as fleet:
        envoy = {"port": free_port(), "readinessPort": free_port(), "adminPort": free_port(), "logLevel": level}
        if quiet is not None:
            envoy["quietLoggers"] = quiet
        values = {
            "routing": {
                "version": 1,
                "default_model": "small",
                "models": {"small": {"replicas": {"static": [fleet["s1"].address], "envoy": "original_dst"}}},
            },
            "envoy": {**envoy, "concurrency": 1},
            "sidecar": {
                "socketDir": str(tmp_path / "run"),
                "healthPort": free_port(),
                "metricsPort": free_port(),
            },
        }
        pod = Pod(render(values), tmp_path)
        try:
            pod.init()
            pod.start("extproc")
            pod.wait_ready("extproc", "readinessProbe", pod.grpc_probe)
            pod.start("envoy")
            pod.wait_ready("envoy", "readinessProbe", pod.http_probe)
            connection = http.client.HTTPConnection("127.0.0.1", pod.port("envoy", "http"), timeout=30)
            body = chat("my SSN is 078-05-1120, PROMPT-ZEBRA", stream=True)
            headers = {"content-type": "application/json", "x-user-tier": "HEADER-ZEBRA"}
            connection.request(
                "POST", "/v1/chat/completions", orjson.dumps(body), headers | {"authorization": "Bearer sk-KEY-ZEBRA"}
            )
            answer = connection.getresponse()
            assert answer.status == 200 and answer.read()
            connection.close()
        finally:
            pod.stop()
        log = (tmp_path / "envoy.log").read_text(errors="replace")
    assert "debug" in log  # Envoy did log at the level asked for
    leaked = [s for s in SECRETS if s in log]
    assert leaked == ([] if quiet is None else list(SECRETS))
