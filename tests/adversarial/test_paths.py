"""Path tricks through the real Envoy (issue 15, item 3). A path a model server might map to an
LLM handler is either routed by the router, under its canonical name, or refused; no path takes
a request past the router to a model server unrouted, except the forwarded non-LLM paths."""

from __future__ import annotations

import shutil
import subprocess

import orjson
import pytest

from extproc.standin import StandIn
from tests.adversarial.hostile import BODY, NOTHING, check, request
from tests.harness import Stack, chat

pytestmark = pytest.mark.e2e

ROUTED = "routed"

# (raw path, the path the replica gets if routed, else (status, code)).
CASES: list[tuple[str, str | tuple[int, str]]] = [
    # Canonicalised by Envoy, then routed: the replica sees the canonical path, the model rewritten.
    ("/v1/%63hat/completions", "/v1/chat/completions"),
    ("/v1/chat/completion%73", "/v1/chat/completions"),
    ("/v1/%63%68%61%74/completions?stream=0", "/v1/chat/completions?stream=0"),
    ("/v1//chat/completions", "/v1/chat/completions"),
    ("//v1/chat/completions", "/v1/chat/completions"),
    ("/v1/chat///completions", "/v1/chat/completions"),
    ("/v1/./chat/completions", "/v1/chat/completions"),
    ("/v1/x/../chat/completions", "/v1/chat/completions"),
    ("/v1/%2e/chat/completions", "/v1/chat/completions"),
    ("/v1/chat/x/%2E%2E/completions", "/v1/chat/completions"),
    ("/../v1/chat/completions", "/v1/chat/completions"),
    ("/v1/chat\\completions", "/v1/chat/completions"),
    ("/v1/chat/completions?x=1&y=%00", "/v1/chat/completions?x=1&y=%00"),
    # Malformed: refused by Envoy's normaliser.
    ("/v1/chat%2Fcompletions", (400, "invalid_path")),
    ("/v1/chat%2fcompletions", (400, "invalid_path")),
    ("/v1%2Fchat%2Fcompletions", (400, "invalid_path")),
    ("/v1/chat%5Ccompletions", (400, "invalid_path")),
    ("/v1/chat/completions%00", (400, "invalid_path")),
    ("/v1/chat/completions#frag", (400, "invalid_path")),
    # Resembling an LLM path: some servers (case-insensitive routers, ;param strippers, trailing
    # slash redirects) would serve these as the LLM call, so none is forwarded.
    ("/V1/chat/completions", (404, "unknown_path")),
    ("/v1/Chat/Completions", (404, "unknown_path")),
    ("/v1/COMPLETIONS", (404, "unknown_path")),
    ("/v1/chat/completions/", (404, "unknown_path")),
    ("/v1/chat/completions;x=1", (404, "unknown_path")),
    ("/v1/chat;x=1/completions", (404, "not_found")),
    ("/v1/chat/completions%20", (404, "unknown_path")),
    ("/v1/chat/completions.json", (404, "unknown_path")),
    ("/v1/chat/completions/x/..", (404, "unknown_path")),
    ("/v1/responses/resp_123", (404, "unknown_path")),
    ("/v1/%2563hat/completions", (404, "not_found")),  # decoded once by Envoy: still no LLM path
    # Other model-server endpoints that read prompts or change the server: never forwarded.
    ("/v1/embeddings", (404, "not_found")),
    ("/v1/messages", (404, "not_found")),
    ("/invocations", (404, "not_found")),
    ("/generate", (404, "not_found")),
    ("/tokenize", (404, "not_found")),
    ("/v1/load_lora_adapter", (404, "not_found")),
    ("/openai/v1/chat/completions", (404, "not_found")),
    ("/v2/chat/completions", (404, "not_found")),
]


@pytest.mark.parametrize(("path", "expected"), CASES, ids=[c[0] for c in CASES])
def test_path_variant_is_routed_or_refused_never_forwarded_unrouted(
    hostile_stack: Stack, path: str, expected: str | tuple[int, str]
) -> None:
    if isinstance(expected, str):
        answer = check(hostile_stack, request(path), status=200, upstream="s1", path=expected)
        assert answer.headers["x-router-model"] == "small"
        assert orjson.loads(answer.received[0][1].body)["model"] == "small-8b"
    else:
        status, code = expected
        check(hostile_stack, request(path), status=status, code=code, upstream=NOTHING)


def test_get_on_an_encoded_llm_path_is_refused_as_on_the_plain_one(hostile_stack: Stack) -> None:
    check(
        hostile_stack, request("/v1/%63hat/completions", body=None, method="GET"), status=405, code="method_not_allowed"
    )


def test_only_the_forward_paths_reach_the_default_cluster_unrouted(hostile_stack: Stack) -> None:
    answer = check(hostile_stack, request("//v1/./models", body=None, method="GET"), status=200, upstream="l1")
    assert answer.received[0][1].path == "/v1/models" and "x-router-model" not in answer.headers
    check(hostile_stack, request("/v1/models/extra", body=None, method="GET"), status=404, code="not_found")


@pytest.mark.skipif(shutil.which("nghttp") is None, reason="needs nghttp (Debian nghttp2-client)")
@pytest.mark.parametrize(("path", "status"), [("/v1/%63hat/completions", 200), ("/V1/chat/completions", 404)])
def test_http2_paths_are_normalised_the_same_way(hostile_stack: Stack, tmp_path, path: str, status: int) -> None:
    body = tmp_path / "body.json"
    body.write_bytes(BODY)
    for replica in hostile_stack.replicas:
        replica.received.clear()
    url = f"http://127.0.0.1:{hostile_stack.port}{path}"
    out = subprocess.run(
        ["nghttp", "-v", "-d", str(body), "-H", "content-type: application/json", url],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert f":status: {status}" in out, out[-2000:]
    paths = [got.path for replica in hostile_stack.replicas for got in replica.received]
    assert paths == (["/v1/chat/completions"] if status == 200 else [])


# --- the PII policy is not skipped on a path variant -------------------------------------------------

PII_POLICY = """
version: 1
default_model: large
classifier: {timeout_ms: 60000}  # about where the request goes, not about deadlines
models:
  large: {upstream_model: large-70b}
  private: {upstream_model: private-8b}
pii: {action: reroute, model: private, types: [US_SSN]}
"""


def test_an_ssn_on_an_encoded_path_still_goes_to_the_private_model(tmp_path) -> None:
    pytest.importorskip("extproc.classifier")
    with Stack(
        tmp_path,
        PII_POLICY,
        [StandIn(name="l1"), StandIn(name="p1")],
        envoy_options=lambda fleet: {
            "cluster_endpoints": {"large": [fleet["l1"].address], "private": [fleet["p1"].address]}
        },
    ) as stack:
        ssn = orjson.dumps(chat("My SSN is 078-05-1120, please fill in the W-4 form for me."))
        for path in ("/v1/%63hat/completions", "/v1//chat/completions", "/v1/chat/x/../completions"):
            answer = check(stack, request(path, ssn), status=200, upstream="p1", path="/v1/chat/completions")
            assert answer.headers["x-router-decision"].endswith("pii-reroute")
            assert orjson.loads(answer.received[0][1].body)["model"] == "private-8b"
        for path in ("/V1/chat/completions", "/v1/chat/completions/", "/v1/chat/completions;x=1"):
            check(stack, request(path, ssn), status=404, code="unknown_path", upstream=NOTHING)


# --- the router's own check, for gateways that send it every path -------------------------------------


def _gateway(config: dict) -> None:
    """Envoy as a gateway might set it up: no path normalisation, and one catch-all route to the
    default cluster with the router attached, instead of the variant, forward and 404 routes."""
    (listener,) = config["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    for option in ("normalize_path", "merge_slashes", "path_with_escaped_slashes_action"):
        hcm.pop(option)
    host = hcm["route_config"]["virtual_hosts"][0]
    host["routes"] = [r for r in host["routes"] if r["name"].startswith("llm-") and r["name"] != "llm-path-variant"]
    host["routes"].append({"name": "gateway", "match": {"prefix": "/"}, "route": {"cluster": "large"}})


@pytest.mark.parametrize("two_round_trips", [False, True], ids=["attributes", "headers"])
def test_the_router_refuses_lookalike_paths_a_gateway_sends_it(tmp_path, two_round_trips: bool) -> None:
    with Stack(
        tmp_path,
        "version: 1\ndefault_model: small\nmodels:\n"
        "  small: {replicas: {static: ['$s1'], envoy: original_dst}}\n  large: {}\n",
        [StandIn(name="s1"), StandIn(name="l1")],
        envoy_options=lambda fleet: {
            "cluster_endpoints": {"large": [fleet["l1"].address]},
            "two_round_trips": two_round_trips,
        },
        envoy_config_hook=_gateway,
    ) as stack:
        for path in (
            "/v1/%63hat/completions",
            "/V1/chat/completions",
            "/v1//chat/completions",
            "/v1/chat%2Fcompletions",
        ):
            check(stack, request(path), status=404, code="unknown_path", upstream=NOTHING)
        check(stack, request("/v1/chat/completions"), status=200, upstream="s1")
        check(stack, request("/v1/embeddings"), status=200, upstream="l1", path="/v1/embeddings")  # not an LLM call
