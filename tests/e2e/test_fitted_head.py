"""`extproc fit` end to end: fit a head on labelled prompts, reference it from the policy, route
requests on it through a real Envoy, then refit it and watch the sidecar reload it."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from extproc.evaluation.fit import main as fit_main
from extproc.standin import StandIn
from tests.harness import Stack, chat, wait_for

pytestmark = pytest.mark.e2e

pytest.importorskip("extproc.classifier")

SHORT = [
    "what's the capital of peru",
    "hi, how are you today?",
    "translate 'thank you' into french",
    "who wrote hamlet",
    "what time zone is tokyo in",
    "spell necessary",
    "is a tomato a fruit",
    "what does http stand for",
]
LONG = [
    "Prove, step by step, that the square root of {n} is irrational, then write a Python function that checks it "
    "numerically and explain why floating point cannot settle the question. At least three paragraphs.",
    "Design a database schema for a library with {n} branches: list every table, its keys and constraints, then write "
    "the SQL to find overdue books per branch and explain how you would index it for speed.",
    "Derive the closed form of the sum of the first {n} cubes, prove it by induction with every step justified, and "
    "compare the proof with a combinatorial argument. Must include a worked example.",
]
POLICY = """
version: 1
default_model: small
classifier: {timeout_ms: 60000}
debug: {explain: true}
models:
  small: {replicas: {static: ["$s1"], envoy: original_dst}}
  large: {replicas: {static: ["$l1"], envoy: original_dst}}
heads:
  pair: {file: pair.json}
decisions:
  - name: hard
    when: {complexity: {head: pair, above: $threshold}}
    model: large
"""


def _write_data(path: Path, strong_wins_on_long: bool) -> None:
    with path.open("w") as f:
        for i in range(6):
            for text in SHORT:
                prompt = f"{text} ({i})"
                gain = not strong_wins_on_long
                f.write(json.dumps({"prompt": prompt, "quality": {"small": 0 if gain else 1, "large": 1}}) + "\n")
            for text in LONG:
                prompt = text.format(n=i + 2)
                gain = strong_wins_on_long
                f.write(json.dumps({"prompt": prompt, "quality": {"small": 0 if gain else 1, "large": 1}}) + "\n")


def _fit(tmp_path: Path, strong_wins_on_long: bool) -> tuple[str, float]:
    data = tmp_path / "evals.jsonl"
    _write_data(data, strong_wins_on_long)
    out = io.StringIO()
    with redirect_stdout(out):
        code = fit_main(
            [
                "--data",
                str(data),
                "--weak",
                "small",
                "--strong",
                "large",
                "--name",
                "pair",
                "--out",
                str(tmp_path / "pair.new.json"),
                "--target-quality",
                "100%",
            ]
        )
    assert code == 0
    (tmp_path / "pair.new.json").replace(tmp_path / "pair.json")  # atomic, as a ConfigMap update is
    text = out.getvalue()
    return text, float(re.search(r"APGR (\d\.\d+)", text).group(1))


def test_fit_route_through_envoy_and_reload_a_refitted_head(tmp_path: Path) -> None:
    report, apgr = _fit(tmp_path, strong_wins_on_long=True)
    assert apgr > 0.75, report  # cross-validated: the head separates the two kinds of prompt
    head = json.loads((tmp_path / "pair.json").read_text())
    assert head["meta"]["weak"] == "small" and head["meta"]["prompts"] == 66
    long_prompt = LONG[0].format(n=17)
    short_prompt = "what's the capital of chile"
    with Stack(
        tmp_path,
        POLICY,
        [StandIn(name="s1"), StandIn(name="l1")],
        substitutions={"threshold": "0.5"},
        sidecar_settings={"reload": True, "reload_debounce": 0.1},
        envoy_options={"message_timeout": "90s"},
    ) as s:

        def routed(prompt: str) -> str:
            response = s.post(chat(prompt), headers={"x-router-debug": "true"})
            assert response.status == 200
            return response.headers["x-router-model"]

        assert routed(long_prompt) == "large"
        assert routed(short_prompt) == "small"
        explain = json.loads(s.post(chat(long_prompt), headers={"x-router-debug": "true"}).headers["x-router-explain"])
        assert '"head": "pair"' in json.dumps(explain)

        # Refit on traffic where the large model pays off on the short prompts instead.
        _fit(tmp_path, strong_wins_on_long=False)
        wait_for(lambda: routed(short_prompt) == "large", timeout=30)
        assert routed(long_prompt) == "small"
        assert re.search(r'extproc_config_reloads_total\{result="success"\} [1-9]', s.metrics_text())
