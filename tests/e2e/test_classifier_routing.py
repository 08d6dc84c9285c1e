"""Routing on the encoder's signals end to end, with the shipped model in the sidecar and a real
Envoy: domain, complexity, and the PII policies (block, redact, reroute, allow-listed types)."""

from __future__ import annotations

import orjson
import pytest

from extproc.standin import StandIn
from tests.harness import Stack, chat

pytestmark = pytest.mark.e2e

classifier_module = pytest.importorskip("extproc.classifier")
try:
    MODEL = classifier_module.Classifier.load()
except Exception as exc:  # the model ships with the package; without it these tests cannot run
    pytest.skip(f"classifier model not available: {exc}", allow_module_level=True)

MATH = "Solve for x: 3x + 7 = 22. Show each step."
ROME = "Who was the first emperor of Rome and how did he come to power?"
SSN = "My SSN is 078-05-1120, please fill in the W-4 form for me."
CARD = "Please charge my card 4111 1111 1111 1111, expiry 12/28."
HARD = "What is the derivative of x^3 * sin(x)?"
EASY = "Solve for x: 3x + 7 = 22. Show each step."

POLICY = """
version: 1
default_model: general
classifier: {timeout_ms: 60000}  # these tests are about what the model finds, not about deadlines
models:
  general: {replicas: {static: ["$g1"], envoy: original_dst}}
  mathematics: {replicas: {static: ["$m1"], envoy: original_dst}}
  large: {replicas: {static: ["$l1"], envoy: original_dst}}
  onprem: {replicas: {static: ["$p1"], envoy: original_dst}}
  external:
    replicas: {static: ["$e1"], envoy: original_dst}
    pii: {action: block, types: [US_SSN, CREDIT_CARD]}
decisions:
  - name: to-external
    when: {header: {name: x-route, equals: external}}
    model: external
  - name: redacting
    when: {header: {name: x-route, equals: redact}}
    model: general
    pii: {action: redact, types: [US_SSN, CREDIT_CARD]}
  - name: private-data
    when: {header: {name: x-route, equals: reroute}}
    model: large
    pii: {action: reroute, model: onprem, types: [US_SSN, CREDIT_CARD]}
  - name: cards-allowed
    when: {header: {name: x-route, equals: allow-cards}}
    model: general
    pii: {action: allow, types: [CREDIT_CARD]}
  - name: hard
    when: {all: [{header: {name: x-route, equals: complexity}}, {complexity: {above: $threshold}}]}
    model: large
  - name: math
    when: {domain: [math]}
    model: mathematics
"""
REPLICAS = ["g1", "m1", "l1", "p1", "e1"]


@pytest.fixture(scope="module")
def envoy_stack(tmp_path_factory: pytest.TempPathFactory):
    hard, easy = (r.complexity for r in MODEL.classify([HARD, EASY]))
    assert hard != easy
    threshold = f"{(hard + easy) / 2:.6f}"
    forwarded = {"forward_headers": ("x-route",), "message_timeout": "90s"}
    with Stack(
        tmp_path_factory.mktemp("classified"),
        POLICY,
        [StandIn(name=n) for n in REPLICAS],
        substitutions={"threshold": threshold},
        envoy_options=forwarded,
    ) as s:
        yield s, max(hard, easy) == hard


def test_domain_routes_math_to_the_math_model(envoy_stack) -> None:
    s, _ = envoy_stack
    math_domain, rome_domain = (r.domain for r in MODEL.classify([MATH, ROME]))
    assert math_domain == "math"  # an unambiguous case the shipped model must get right
    assert s.post(chat(MATH)).headers["x-router-model"] == "mathematics"
    expected = "mathematics" if rome_domain == "math" else "general"
    assert s.post(chat(ROME)).headers["x-router-model"] == expected


def test_complexity_threshold_splits_two_prompts_the_way_the_model_scores_them(envoy_stack) -> None:
    s, hard_is_harder = envoy_stack
    headers = {"x-route": "complexity"}
    high, low = (HARD, EASY) if hard_is_harder else (EASY, HARD)
    assert s.post(chat(high), headers=headers).headers["x-router-model"] == "large"
    assert s.post(chat(low), headers=headers).headers["x-router-model"] != "large"


def test_block_names_the_pii_types_never_the_values(envoy_stack) -> None:
    s, _ = envoy_stack
    response = s.post(chat(SSN), headers={"x-route": "external"})
    assert response.status == 403
    error = response.json()["error"]
    assert error["code"] == "pii_blocked" and "US_SSN" in error["message"]
    assert "078-05-1120" not in response.body.decode()
    assert s.post(chat("What is the capital of Portugal?"), headers={"x-route": "external"}).status == 200


def test_redact_replaces_the_spans_and_fixes_content_length(envoy_stack) -> None:
    s, _ = envoy_stack
    response = s.post(chat(SSN), headers={"x-route": "redact"})
    assert response.status == 200
    received = s.fleet["g1"].received[-1]
    forwarded = orjson.loads(received.body)["messages"][0]["content"]
    assert "078-05-1120" not in forwarded and "<US_SSN>" in forwarded
    assert forwarded == SSN.replace("078-05-1120", "<US_SSN>")
    assert int(received.headers["content-length"]) == len(received.body)


def test_reroute_sends_private_data_to_the_onprem_model(envoy_stack) -> None:
    s, _ = envoy_stack
    response = s.post(chat(CARD), headers={"x-route": "reroute"})
    assert response.headers["x-router-model"] == "onprem"
    assert response.headers["x-router-decision"] == "private-data+pii-reroute"
    assert (
        s.post(chat("Tell me a fun fact about owls."), headers={"x-route": "reroute"}).headers["x-router-model"]
        == "large"
    )


def test_allow_lets_listed_types_through_and_blocks_the_rest(envoy_stack) -> None:
    s, _ = envoy_stack
    assert s.post(chat(CARD), headers={"x-route": "allow-cards"}).status == 200
    blocked = s.post(chat(SSN), headers={"x-route": "allow-cards"})
    assert blocked.status == 403 and "US_SSN" in blocked.json()["error"]["message"]


def test_pii_found_late_in_a_long_conversation(envoy_stack) -> None:
    s, _ = envoy_stack
    filler = "The committee reviewed the quarterly figures and the hiring plan in detail. " * 120
    body = {"model": "auto", "messages": [{"role": "user", "content": filler + " " + SSN}]}
    response = s.post(body, headers={"x-route": "external"})
    assert response.status == 403
