"""The PII check under load through the real Envoy: 64 clients at once, a reroute policy over
the structured types, explicit-model requests (so only the PII check needs the encoder). Texts
that cannot hold a structured value never wait for the encoder, so none misses the classifier
deadline and none is sent to the private model for it (fail-closed is right, but only when the
check really could not run)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

from extproc.standin import StandIn
from tests.harness import Stack, chat

pytestmark = pytest.mark.e2e

classifier_module = pytest.importorskip("extproc.classifier")

POLICY = """
version: 1
default_model: small
models:
  small: {replicas: {static: ["$s1"], envoy: original_dst}}
  private: {replicas: {static: ["$p1"], envoy: original_dst}}
pii: {action: reroute, model: private, types: [US_SSN, CREDIT_CARD, IBAN_CODE, EMAIL_ADDRESS, PHONE_NUMBER, IP_ADDRESS]}
"""
PROMPTS = [
    "Write a short poem about the sea at dawn, in the style of a sailor's song.",
    "Explain how a hash map handles collisions, with an example in Python.",
    "What are the main causes of inflation, and how do central banks respond?",
    "Summarise the plot of a detective story set in a small mountain village.",
    "Give me three ideas for a vegetarian dinner that takes 30 minutes.",  # digits, but no value shape
]


def unchecked(s: Stack) -> float:
    found = re.findall(r'extproc_pii_detections_total\{action="[^"]+",type="unchecked"\} (\S+)', s.metrics_text())
    return sum(map(float, found))


def test_64_concurrent_clients_are_not_failed_closed_to_the_private_model(tmp_path) -> None:
    with Stack(tmp_path, POLICY, [StandIn(name="s1"), StandIn(name="p1")]) as s:
        texts = [
            f"{PROMPTS[i % len(PROMPTS)]} (variant {chr(65 + i % 26)}{chr(65 + i // 26 % 26)})" for i in range(500)
        ]
        with ThreadPoolExecutor(64) as pool:
            responses = list(pool.map(lambda t: s.post(chat(t, model="small")), texts))
        assert [r.status for r in responses] == [200] * len(texts)
        models = [r.headers["x-router-model"] for r in responses]
        assert models.count("private") == 0, f"{models.count('private')} of {len(texts)} failed closed"
        assert unchecked(s) == 0
        # A value that does need the check still gets it, under the same policy.
        assert s.post(chat("My SSN is 078-05-1120.", model="small")).headers["x-router-model"] == "private"
