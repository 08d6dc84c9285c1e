"""PII in every place a model reads, through the real Envoy with the shipped encoder: not only
the turns' content but tool calls and their outputs, a message's name, refusal or replayed
reasoning, tool definitions, a completion's suffix, Responses items of any type. Each is found
(the reroute policy sends it to the private model, never to the public one) and redacted where
it sits; a prompt the router cannot read at all (token ids) fails closed."""

from __future__ import annotations

import orjson
import pytest

from extproc.standin import StandIn
from tests.adversarial.hostile import NOTHING, check, request
from tests.harness import Stack

pytestmark = pytest.mark.e2e

classifier_module = pytest.importorskip("extproc.classifier")

POLICY = """
version: 1
default_model: public
classifier: {timeout_ms: 60000}  # about what is found, not about deadlines
models:
  public: {upstream_model: public-70b, replicas: {static: ["$g1"], envoy: original_dst}}
  private: {upstream_model: private-8b, replicas: {static: ["$p1"], envoy: original_dst}}
pii: {action: reroute, model: private, types: [US_SSN, EMAIL_ADDRESS]}
decisions:
  - name: redacting
    when: {header: {name: x-route, equals: redact}}
    model: public
    pii: {action: redact, types: [US_SSN, EMAIL_ADDRESS]}
  - name: blocking
    when: {header: {name: x-route, equals: block}}
    model: public
    pii: {action: block, types: [US_SSN, EMAIL_ADDRESS]}
"""
SSN = "078-05-1120"
SAID = f"My SSN is {SSN}, please fill in the form."


@pytest.fixture(scope="module")
def s(tmp_path_factory: pytest.TempPathFactory):
    with Stack(
        tmp_path_factory.mktemp("surfaces"),
        POLICY,
        [StandIn(name="g1"), StandIn(name="p1")],
        envoy_options={"forward_headers": ("x-route",), "message_timeout": "90s"},
    ) as stack:
        yield stack


def user(text: str = "Please help me with the form.", **extra: object) -> dict:
    return {"role": "user", "content": text, **extra}


def chat_body(*messages: dict, **extra: object) -> dict:
    return {"model": "auto", "messages": list(messages), **extra}


def tool(description: str = "Look up a record.", **parameters: object) -> dict:
    schema = {"type": "object", "properties": {"id": {"type": "string", **parameters}}}
    return {"type": "function", "function": {"name": "lookup", "description": description, "parameters": schema}}


CALL = {
    "id": "c1",
    "type": "function",
    "function": {"name": "lookup", "arguments": orjson.dumps({"note": SAID}).decode()},
}

# (case, path, body): each carries the SSN in one place only.
SURFACES = [
    (
        "tool call arguments",
        "/v1/chat/completions",
        chat_body(user(), {"role": "assistant", "content": None, "tool_calls": [CALL]}),
    ),
    (
        "custom tool call input",
        "/v1/chat/completions",
        chat_body(
            user(),
            {
                "role": "assistant",
                "tool_calls": [{"id": "c1", "type": "custom", "custom": {"name": "fill", "input": SAID}}],
            },
        ),
    ),
    (
        "legacy function call",
        "/v1/chat/completions",
        chat_body(user(), {"role": "assistant", "function_call": {"name": "f", "arguments": SAID}}),
    ),
    (
        "tool message",
        "/v1/chat/completions",
        chat_body(user(), {"role": "tool", "tool_call_id": "c1", "content": SAID}),
    ),
    (
        "tool message parts",
        "/v1/chat/completions",
        chat_body(user(), {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": SAID}]}),
    ),
    ("a message's name", "/v1/chat/completions", chat_body(user(name=SAID))),
    (
        "an assistant's refusal",
        "/v1/chat/completions",
        chat_body(user(), {"role": "assistant", "content": None, "refusal": SAID}, user("ok")),
    ),
    (
        "replayed reasoning",
        "/v1/chat/completions",
        chat_body(user(), {"role": "assistant", "content": "Sure.", "reasoning_content": SAID}, user("ok")),
    ),
    (
        "an input_text part",
        "/v1/chat/completions",
        chat_body({"role": "user", "content": [{"type": "input_text", "text": SAID}]}),
    ),
    ("a developer message", "/v1/chat/completions", chat_body({"role": "developer", "content": SAID}, user())),
    ("a tool's description", "/v1/chat/completions", chat_body(user(), tools=[tool(SAID)])),
    ("a tool parameter's enum", "/v1/chat/completions", chat_body(user(), tools=[tool(enum=[SAID])])),
    ("a tool parameter's default", "/v1/chat/completions", chat_body(user(), tools=[tool(default=SAID)])),
    ("legacy functions", "/v1/chat/completions", chat_body(user(), functions=[tool(SAID)["function"]])),
    ("a later prompt of a batch", "/v1/completions", {"model": "auto", "prompt": ["Once upon a time", SAID]}),
    ("a completion's suffix", "/v1/completions", {"model": "auto", "prompt": "Dear clerk,", "suffix": SAID}),
    ("instructions", "/v1/responses", {"model": "auto", "instructions": SAID, "input": "Fill in the form."}),
    (
        "a function call output item",
        "/v1/responses",
        {"model": "auto", "input": [{"type": "function_call_output", "call_id": "c", "output": SAID}]},
    ),
    (
        "a custom tool call output item",
        "/v1/responses",
        {"model": "auto", "input": [{"type": "custom_tool_call_output", "call_id": "c", "output": SAID}]},
    ),
    (
        "a reasoning item's summary",
        "/v1/responses",
        {
            "model": "auto",
            "input": [
                {"type": "reasoning", "id": "r", "summary": [{"type": "summary_text", "text": SAID}]},
                {"role": "user", "content": "ok"},
            ],
        },
    ),
    (
        "an MCP call item",
        "/v1/responses",
        {
            "model": "auto",
            "input": [{"type": "mcp_call", "id": "m", "name": "crm", "server_label": "x", "arguments": SAID}],
        },
    ),
    (
        "an item type yet to come",
        "/v1/responses",
        {"model": "auto", "input": [{"type": "hologram_call", "id": "h", "payload": {"caption": SAID}}]},
    ),
    (
        "a Responses tool's description",
        "/v1/responses",
        {
            "model": "auto",
            "input": "Fill it in.",
            "tools": [{"type": "function", "name": "f", "description": SAID, "parameters": {}}],
        },
    ),
]


@pytest.mark.parametrize(("case", "path", "body"), SURFACES, ids=[c[0] for c in SURFACES])
def test_pii_wherever_a_model_reads_goes_to_the_private_model(s: Stack, case: str, path: str, body: dict) -> None:
    answer = check(s, request(path, orjson.dumps(body)), status=200, upstream="p1", path=path)
    assert answer.headers["x-router-decision"].endswith("pii-reroute")
    assert orjson.loads(answer.received[0][1].body)["model"] == "private-8b"


@pytest.mark.parametrize(("case", "path", "body"), SURFACES, ids=[c[0] for c in SURFACES])
def test_pii_wherever_a_model_reads_is_redacted_where_it_sits(s: Stack, case: str, path: str, body: dict) -> None:
    answer = check(s, request(path, orjson.dumps(body), headers=[("x-route", "redact")]), status=200, upstream="g1")
    forwarded = answer.received[0][1].body
    assert SSN.encode() not in forwarded and b"<US_SSN>" in forwarded, forwarded[:600]


def test_a_clean_body_with_tools_and_names_is_forwarded_untouched(s: Stack) -> None:
    body = orjson.dumps(chat_body(user(name="alice"), tools=[tool(enum=["red", "green"])]))
    answer = check(s, request(body=body, headers=[("x-route", "redact")]), status=200, upstream="g1")
    assert orjson.loads(answer.received[0][1].body) == {**orjson.loads(body), "model": "public-70b"}


def test_a_bare_ssn_in_tool_call_arguments_is_found(s: Stack) -> None:
    """No words around it, but its key names it: the validator and the label decide (the tagger
    alone scored it 0.47, under min_score)."""
    call = {**CALL, "function": {"name": "lookup", "arguments": orjson.dumps({"ssn": SSN}).decode()}}
    body = chat_body(user(), {"role": "assistant", "content": None, "tool_calls": [call]})
    check(s, request(body=orjson.dumps(body)), status=200, upstream="p1")


# A prompt of token ids is text the check cannot read: a policy that must know fails closed.
TOKEN_IDS = {"model": "auto", "prompt": [[1, 2, 3, 4]]}


def test_token_ids_under_a_reroute_policy_go_to_the_private_model(s: Stack) -> None:
    check(s, request("/v1/completions", orjson.dumps(TOKEN_IDS)), status=200, upstream="p1")


@pytest.mark.parametrize("route", ["block", "redact"])
def test_token_ids_under_a_block_or_redact_policy_are_refused_with_what_to_send(s: Stack, route: str) -> None:
    answer = check(
        s,
        request("/v1/completions", orjson.dumps(TOKEN_IDS), headers=[("x-route", route)]),
        status=400,
        code="pii_unreadable",
        param="prompt",
        upstream=NOTHING,
    )
    assert "token ids" in answer.error["message"]
