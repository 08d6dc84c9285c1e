"""The sidecar as Envoy's control plane: policy changes reach a running Envoy, never restarting it.

Each test runs the real stack (stand-in replicas, the sidecar, Envoy on the bootstrap the chart
uses) and edits the watched policy file (and the live Envoy settings beside it) under light load.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest

from extproc.standin import StandIn
from tests.harness import Stack, chat, wait_for

pytestmark = pytest.mark.e2e

POLICY = """
version: 1
default_model: small
picking: {fallbacks: 1}
models:
  small:
    upstream_model: small-8b
    replicas: {static: ["$s1", "$s2"], envoy: original_dst}
  large:
    upstream_model: large-70b
    replicas: {static: ["$l1", "$l2"], envoy: override_host}
decisions:
  - name: premium
    when: {header: {name: x-user-tier, equals: premium}}
    model: large
"""
NAMES = ["s1", "s2", "l1", "l2", "c1", "m1"]

# A new model with its own cluster (router-picked replicas), a new model Envoy balances itself
# (its endpoints come with the live Envoy settings), a decision with fallbacks, more fallbacks.
ADDED = """
  coder:
    upstream_model: coder-33b
    replicas: {static: ["$c1"], envoy: override_host}
  mini:
    upstream_model: mini-1b
"""
ADDED_DECISIONS = """
  - name: code
    when: {keyword: [traceback]}
    model: coder
    fallbacks: [large]
  - name: tiny
    when: {keyword: [haiku]}
    model: mini
"""


def live_stack(tmp_path: Path) -> Stack:
    return Stack(
        tmp_path,
        POLICY,
        [StandIn(name=n) for n in NAMES],
        sidecar_settings={"reload": True, "reload_debounce": 0.1},
        envoy_concurrency=2,  # as the chart runs it: updates must reach every worker
    )


def reloads(s: Stack, result: str) -> float:
    match = re.search(rf'extproc_config_reloads_total{{result="{result}"}} (\S+)', s.metrics_text())
    return float(match.group(1)) if match else 0.0


def write_config(s: Stack, policy: str, settings: dict[str, Any] | None = None) -> None:
    """Replace the policy (and the live settings) as the kubelet does a ConfigMap: each file by a rename."""
    if settings is not None:
        tmp = s.settings_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(settings))
        tmp.replace(s.settings_path)
    tmp = s.config_path.with_suffix(".tmp")
    tmp.write_text(policy)
    tmp.replace(s.config_path)


def reload_to(s: Stack, policy: str, settings: dict[str, Any] | None = None, result: str = "success") -> None:
    before = reloads(s, result)
    write_config(s, policy, settings)
    wait_for(lambda: reloads(s, result) > before, timeout=30)


def substituted(s: Stack, text: str) -> str:
    for name, replica in s.fleet.replicas.items():
        text = text.replace(f"${name}", replica.address)
    return text


def clusters(s: Stack) -> set[str]:
    dump = admin_json(s, "/config_dump?resource=dynamic_active_clusters")
    return {c["cluster"]["name"] for c in dump["configs"]}


def routes(s: Stack) -> dict[str, dict[str, Any]]:
    dump = admin_json(s, "/config_dump?resource=dynamic_route_configs")
    (config,) = dump["configs"]
    (host,) = config["route_config"]["virtual_hosts"]
    return {r["name"]: r for r in host["routes"]}


def admin_json(s: Stack, path: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{s.envoy.admin_port}{path}", timeout=5) as r:
        return orjson.loads(r.read())


def stat(s: Stack, name: str) -> Any:
    return s.envoy.stats(name).get(name)


@contextmanager
def light_load(s: Stack, texts: tuple[str, ...] = ("hello there",)) -> Iterator[list[tuple[int, str]]]:
    """One client per text, sending it back to back; yields their (status, model) results."""
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def client(text: str) -> None:
        while not stop.is_set():
            response = s.post(chat(text))
            results.append((response.status, response.headers.get("x-router-model", "")))

    workers = [threading.Thread(target=client, args=(text,)) for text in texts]
    for worker in workers:
        worker.start()
    try:
        wait_for(lambda: len(results) > 5)
        yield results
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)


@contextmanager
def held_stream(s: Stack, replicas: list[str], headers: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A streamed answer that pauses after its first event until the block ends."""
    gate = asyncio.Event()
    for name in replicas:
        s.fleet[name].gate = gate
    out: dict[str, Any] = {}

    def stream() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        body = orjson.dumps(chat("tell me a long story", stream=True))
        connection.request("POST", "/v1/chat/completions", body, {"content-type": "application/json", **headers})
        response = connection.getresponse()
        out["status"], out["body"] = response.status, response.read()
        connection.close()

    worker = threading.Thread(target=stream)
    worker.start()
    wait_for(lambda: any(s.fleet[n].inflight for n in replicas))
    try:
        yield out
    finally:

        async def release() -> None:
            gate.set()

        s.fleet.call(release())
        worker.join(30)
        for name in replicas:
            s.fleet[name].gate = None


def test_a_new_model_reaches_envoy_without_a_restart_and_no_request_fails(tmp_path: Path) -> None:
    with live_stack(tmp_path) as s:
        pid, modified = s.envoy.pid, stat(s, "listener_manager.listener_modified")
        assert s.post(chat("a traceback")).headers["x-router-model"] == "small"
        # One client asks what the new decision will route to the new model from the moment the
        # router switches: Envoy must have its cluster and route by then.
        load = light_load(s, ("hello there", "a traceback, please look"))
        with load as results, held_stream(s, ["l1", "l2"], {"x-user-tier": "premium"}) as stream:
            policy = substituted(s, s.config_path.read_text())
            policy = policy.replace("models:\n", "models:\n" + substituted(s, ADDED), 1) + ADDED_DECISIONS
            policy = policy.replace("picking: {fallbacks: 1}", "picking: {fallbacks: 2}")
            reload_to(s, policy, {"cluster_endpoints": {"mini": [s.fleet["m1"].address]}})
            coder = s.post(chat("why this traceback?"))
            assert (coder.status, coder.headers["x-router-model"], s.replica(coder)) == (200, "coder", "c1")
            mini = s.post(chat("write a haiku"))
            assert (mini.status, mini.headers["x-router-model"], s.replica(mini)) == (200, "mini", "m1")
            time.sleep(0.5)  # traffic goes on after the change
        assert stream["status"] == 200 and stream["body"].endswith(b"data: [DONE]\n\n")  # started before, ended after
        assert Counter(status for status, _ in results) == Counter({200: len(results)})
        assert {"small", "coder"} <= {model for _, model in results}
        assert s.envoy.pid == pid and s.envoy.process.poll() is None
        # Only clusters and routes changed: the listener (and its connections) were left alone.
        assert stat(s, "listener_manager.listener_modified") == modified
        assert {"coder", "mini", "large", "original_dst"} <= clusters(s)
        table = routes(s)
        assert table["llm-large"]["route"]["retry_policy"]["num_retries"] == 2  # the new fallbacks
        assert table["llm-coder"]["route"]["cluster"] == "coder"
        # The router's fallback for the code decision is a cluster Envoy routes too.
        explained = s.post(chat("traceback again"), headers={"x-router-debug": "true"})
        assert explained.status == 200


def test_a_removed_model_gets_no_more_traffic(tmp_path: Path) -> None:
    with live_stack(tmp_path) as s:
        pid = s.envoy.pid
        assert s.replica(s.post(chat("hi"), headers={"x-user-tier": "premium"})) in ("l1", "l2")
        policy = s.config_path.read_text()
        without_large = policy.split("  large:")[0] + "decisions: []\n"
        with light_load(s) as results, held_stream(s, ["l1", "l2"], {"x-user-tier": "premium"}) as stream:
            reload_to(s, without_large)
            served = {n: s.fleet[n].served for n in ("l1", "l2")}
            premium = s.post(chat("hi"), headers={"x-user-tier": "premium"})
            assert premium.headers["x-router-model"] == "small"
            explicit = s.post(chat("hi", model="large"))
            assert (explicit.status, explicit.json()["error"]["code"]) == (404, "model_not_found")
            wait_for(lambda: "large" not in clusters(s))  # gone once the grace for old decisions is over
            assert "llm-large" not in routes(s)
            assert {n: s.fleet[n].served for n in ("l1", "l2")} == served
        assert stream["status"] == 200 and stream["body"].endswith(b"data: [DONE]\n\n")  # its cluster went mid-stream
        assert Counter(status for status, _ in results) == Counter({200: len(results)})
        assert s.envoy.pid == pid


def envoy_state(s: Stack) -> tuple[Any, ...]:
    files = tuple(p.read_bytes() for p in sorted((s.xds_dir).rglob("*.json")))
    names = (
        "cluster_manager.cds.update_attempt",
        "listener_manager.lds.update_attempt",
        "http.llm.rds.llm.update_attempt",
    )
    return files, tuple(stat(s, n) for n in names), clusters(s)


def test_an_invalid_policy_or_setting_changes_nothing_in_envoy(tmp_path: Path) -> None:
    with live_stack(tmp_path) as s:
        good = s.config_path.read_text()
        before = envoy_state(s)
        broken = [
            (good + "  - name: x\n    model: gpt5\n", None),  # names no model
            ("models: [unclosed", None),
            # valid for the router, but Envoy cannot be told how to reach the new model's cluster
            (good.replace("models:\n", "models:\n  extra: {}\n", 1), None),
            (good, {"upstream_timeout": "ten minutes"}),  # a live setting Envoy cannot parse
        ]
        for policy, settings in broken:
            reload_to(s, policy, settings, result="invalid")
            assert envoy_state(s) == before
            assert s.post(chat("hi")).headers["x-router-model"] == "small"
            assert s.replica(s.post(chat("hi"), headers={"x-user-tier": "premium"})) in ("l1", "l2")
        reload_to(s, good.replace("default_model: small", "default_model: large"), {})
        assert s.post(chat("hi")).headers["x-router-model"] == "large"


def test_an_update_envoy_rejects_is_undone_and_routing_stays(tmp_path: Path, monkeypatch) -> None:
    import extproc.app
    from extproc.envoy.render.resources import Resources, render_resources

    def with_a_cluster_envoy_refuses(policy, options) -> Resources:
        resources = render_resources(policy, options)
        if "coder" not in policy.models:
            return resources
        bad = {
            "name": "bad",
            "type": "STATIC",
            "load_assignment": {
                "cluster_name": "bad",
                "endpoints": [
                    {
                        "lb_endpoints": [
                            {"endpoint": {"address": {"socket_address": {"address": "vllm.local", "port_value": 80}}}}
                        ]
                    }
                ],
            },
        }
        return Resources(resources.listener, resources.routes, (*resources.clusters, bad))

    with live_stack(tmp_path) as s:
        monkeypatch.setattr(extproc.app, "render_resources", with_a_cluster_envoy_refuses)
        files = {p: p.read_bytes() for p in s.xds_dir.rglob("*.json")}
        rejected = stat(s, "cluster_manager.cds.update_rejected")
        policy = s.config_path.read_text().replace("models:\n", "models:\n" + substituted(s, ADDED), 1)
        reload_to(
            s, policy + ADDED_DECISIONS, {"cluster_endpoints": {"mini": [s.fleet["m1"].address]}}, result="rejected"
        )
        assert stat(s, "cluster_manager.cds.update_rejected") == rejected + 1
        # Envoy had taken the valid new clusters of the update; the previous files took them back.
        assert clusters(s) == {"large", "original_dst"}
        assert {p: p.read_bytes() for p in s.xds_dir.rglob("*.json")} == files
        assert s.post(chat("a traceback")).headers["x-router-model"] == "small"  # the old policy routes
        assert 'extproc_envoy_config_updates_total{result="rejected",type="cds"} 1.0' in s.metrics_text()


def test_live_envoy_settings_update_only_the_resource_they_live_in(tmp_path: Path) -> None:
    with live_stack(tmp_path) as s:
        modified = stat(s, "listener_manager.listener_modified")
        policy = s.config_path.read_text()
        default = s.post(chat("hi")).headers["x-router-model"]
        assert s.request("GET", "/health").status == 404
        # Routes only: a forwarded path and the upstream timeout.
        reload_to(s, policy, {"forward_paths": ["/v1/models", "/health"], "upstream_timeout": "120s"})
        assert s.request("GET", "/health").status == 200
        assert routes(s)["llm-large"]["route"]["timeout"] == "120s"
        assert stat(s, "listener_manager.listener_modified") == modified
        # A header the policy reads is in the listener's ext_proc filter: a listener update.
        tiered = policy.replace("x-user-tier", "x-org")
        reload_to(s, tiered, {"forward_headers": ["x-org"]})
        assert s.post(chat("hi"), headers={"x-org": "premium"}).headers["x-router-model"] == "large"
        assert stat(s, "listener_manager.listener_modified") == modified + 1
        assert s.post(chat("hi")).headers["x-router-model"] == default
