"""Tuning through the policy file while traffic flows: hot reload, bad edits, splits, logs."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

from extproc.logs import JsonFormatter
from extproc.standin import StandIn
from tests.harness import Stack, chat, wait_for

pytestmark = pytest.mark.e2e

POLICY = """
version: 1
default_model: $default
models:
  small:
    upstream_model: small-8b
    replicas: {static: ["$s1", "$s2"], envoy: original_dst}
  large:
    upstream_model: large-70b
    replicas: {static: ["$l1"], envoy: override_host}
decisions:
  - name: canary
    when: {header: {name: x-user-tier, equals: beta}}
    split: [{model: small, weight: 50}, {model: large, weight: 50}]
"""
NAMES = ["s1", "s2", "l1"]


def live_stack(tmp_path: Path, default: str = "small") -> Stack:
    return Stack(
        tmp_path,
        POLICY,
        [StandIn(name=n) for n in NAMES],
        substitutions={"default": default},
        sidecar_settings={"reload": True, "reload_debounce": 0.1},
    )


def policy_text(s: Stack, default: str) -> str:
    return s.config_path.read_text().replace(
        f"default_model: {'large' if default == 'small' else 'small'}", f"default_model: {default}"
    )


def reload_count(s: Stack, result: str) -> float:
    match = re.search(rf'extproc_config_reloads_total{{result="{result}"}} (\S+)', s.metrics_text())
    return float(match.group(1)) if match else 0.0


def test_reload_under_continuous_traffic_fails_no_request(tmp_path: Path) -> None:
    with live_stack(tmp_path) as s:
        results: list[tuple[int, str]] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                response = s.post(chat("hello"))
                results.append((response.status, response.headers.get("x-router-model", "")))

        workers = [threading.Thread(target=traffic) for _ in range(3)]
        for worker in workers:
            worker.start()
        try:
            for i in range(6):
                default = "large" if i % 2 == 0 else "small"
                before = reload_count(s, "success")
                s.config_path.write_text(policy_text(s, default))
                wait_for(lambda b=before: reload_count(s, "success") > b)
                wait_for(lambda d=default: len(results) > 5 and results[-1][1] == d)
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        statuses = Counter(status for status, _ in results)
        assert statuses == Counter({200: len(results)}), statuses
        assert {model for _, model in results} == {"small", "large"}
        wait_for(lambda: s.inflight() == {})


def test_a_kubelet_style_symlink_swap_is_picked_up(tmp_path: Path) -> None:
    with live_stack(tmp_path) as s:
        # Lay out the ConfigMap volume the way the kubelet does, then point the sidecar at it.
        volume = tmp_path / "volume"
        first = volume / "..2026_11_24_10_00_00.000000001"
        first.mkdir(parents=True)
        (first / "policy.yaml").write_text(s.config_path.read_text())
        (volume / "..data").symlink_to(first.name)
        (volume / "policy.yaml").symlink_to("..data/policy.yaml")
        s.config_path.unlink()
        s.config_path.symlink_to(volume / "policy.yaml")
        assert s.post(chat("hi")).headers["x-router-model"] == "small"

        second = volume / "..2026_11_24_10_05_00.000000002"
        second.mkdir()
        (second / "policy.yaml").write_text(
            (first / "policy.yaml").read_text().replace("default_model: small", "default_model: large")
        )
        (volume / "..data_tmp").symlink_to(second.name)
        os.replace(volume / "..data_tmp", volume / "..data")  # the atomic swap
        wait_for(lambda: s.post(chat("hi")).headers["x-router-model"] == "large")


def test_an_invalid_edit_is_rejected_and_the_old_policy_keeps_routing(tmp_path: Path) -> None:
    with live_stack(tmp_path) as s:
        good = s.config_path.read_text()
        before = reload_count(s, "invalid")
        s.config_path.write_text(good.replace("default_model: small", "default_model: gpt5"))
        wait_for(lambda: reload_count(s, "invalid") > before)
        assert s.post(chat("hi")).headers["x-router-model"] == "small"
        s.config_path.write_text("models: [unclosed")
        wait_for(lambda: reload_count(s, "invalid") > before + 1)
        s.config_path.unlink()
        wait_for(lambda: reload_count(s, "missing") >= 1)
        assert s.post(chat("hi")).status == 200
        s.config_path.write_text(good.replace("default_model: small", "default_model: large"))
        wait_for(lambda: s.post(chat("hi")).headers["x-router-model"] == "large")


def test_splits_are_sticky_per_session_and_follow_the_weights(tmp_path: Path) -> None:
    with live_stack(tmp_path) as s:
        beta = {"x-user-tier": "beta"}
        per_session = {}
        for session in range(40):
            models = {
                s.post(chat(f"turn {t}"), headers={**beta, "x-session-id": f"u{session}"}).headers["x-router-model"]
                for t in range(3)
            }
            assert len(models) == 1
            per_session[session] = models.pop()
        assert 8 <= Counter(per_session.values())["large"] <= 32  # 50/50 split, 40 sessions


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_decision_lines_are_logged_for_every_request_without_prompt_text(tmp_path: Path) -> None:
    capture = _Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    secrets = [
        "Marguerite Okonkwo-Blanchard",
        "078-05-1120",
        "m.okonkwo@example.org",
        "4111 1111 1111 1111",
        "zebra-quartz-umbrella",
    ]
    # The encoder runs too (a PII policy and a domain rule need it), so its path is searched as well.
    policy_with_encoder = (
        POLICY
        + """  - name: science
    when: {domain: [math, physics]}
    model: large
pii: {action: redact, types: [US_SSN, CREDIT_CARD, EMAIL_ADDRESS, PERSON]}
classifier: {timeout_ms: 60000}
"""
    )
    try:
        with Stack(
            tmp_path,
            policy_with_encoder,
            [StandIn(name=n) for n in NAMES],
            substitutions={"default": "small"},
            envoy_options={"message_timeout": "90s"},
        ) as s:
            for secret in secrets:
                s.post(
                    chat(f"My details: {secret}. Please remember them."), headers={"x-request-id": f"req-{secret[:3]}"}
                )
            s.post(b'{"model": "auto", "messages": [{"role": "user", "content": "zebra-quartz-umbrella"}')  # malformed
            time.sleep(0.2)
            forwarded = b"".join(r.body for replica in s.replicas for r in replica.received)
            assert b"<US_SSN>" in forwarded and b"078-05-1120" not in forwarded  # the encoder did run
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
    decisions = [orjson.loads(line) for line in capture.lines if '"event":"decision"' in line]
    assert len(decisions) == len(secrets) + 1
    ok = [d for d in decisions if d["status"] == 200]
    assert all({"request_id", "model", "decision", "replica", "ms"} <= set(d) for d in ok)
    assert set(ok[0]["ms"]) >= {"parse", "policy", "pick", "total"}
    everything = "\n".join(capture.lines)
    for secret in secrets:
        assert secret not in everything
