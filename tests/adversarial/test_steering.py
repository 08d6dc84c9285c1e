"""A client trying to choose its own replica, cluster or Envoy behaviour, through the real Envoy:
the router's headers in any spelling, Envoy's own x-envoy-* controls, a spoofed forwarding
chain, the host or an absolute URI naming a replica, trailers. The request still goes where the
router sends it, the replica sees the router's values only, and the next request is served."""

from __future__ import annotations

import orjson
import pytest

from tests.adversarial.hostile import BODY, check, request
from tests.harness import Stack, chat

pytestmark = pytest.mark.e2e


def l1(stack: Stack) -> str:
    return stack.fleet["l1"].address


# (case, headers naming l1 (the large model's replica) or the large cluster). None of them may
# move the request off s1, the replica the router picks for the default model.
STEERING = [
    ("destination endpoint", [("x-gateway-destination-endpoint", "{l1}")]),
    ("destination endpoint, upper case", [("X-Gateway-Destination-Endpoint", "{l1}")]),
    ("destination endpoint, underscores", [("x_gateway_destination_endpoint", "{l1}")]),
    ("destination endpoint, twice", [("x-gateway-destination-endpoint", "{l1}")] * 2),
    ("Envoy's original-destination header", [("x-envoy-original-dst-host", "{l1}")]),
    ("cluster header", [("x-extproc-cluster", "large")]),
    ("cluster header, underscores", [("x_extproc_cluster", "large")]),
    ("selected model", [("x-selected-model", "large-70b")]),
    ("selected model, underscores", [("x_selected_model", "large-70b")]),
    ("affinity key", [("x-extproc-affinity", "0123456789abcdef")]),
    ("decision", [("x-router-decision", "code")]),
    ("host naming the replica", [("host", "{l1}")]),
    ("forwarded host", [("x-forwarded-host", "{l1}")]),
    (
        "Envoy's internal flag and a spoofed local forwarding chain",
        [("x-envoy-internal", "true"), ("x-forwarded-for", "127.0.0.1")],
    ),
]


@pytest.mark.parametrize(("case", "headers"), STEERING, ids=[c[0] for c in STEERING])
def test_a_client_cannot_steer_the_request_off_the_routers_pick(
    hostile_stack: Stack, case: str, headers: list[tuple[str, str]]
) -> None:
    sent = [(name, value.format(l1=l1(hostile_stack))) for name, value in headers]
    answer = check(
        hostile_stack, request(headers=sent, host=case != "host naming the replica"), status=200, upstream="s1"
    )
    seen = answer.received[0][1].headers
    assert answer.headers["x-router-model"] == "small" and answer.headers["x-router-decision"] == "default"
    assert orjson.loads(answer.received[0][1].body)["model"] == "small-8b"
    assert seen["x-selected-model"] == "small-8b"
    for name in ("x-gateway-destination-endpoint", "x-extproc-cluster", "x-extproc-affinity", "x-envoy-internal"):
        assert name not in seen, (name, seen)
    assert not [name for name in seen if "_" in name], seen  # dropped: some servers read _ as -


def test_an_absolute_uri_naming_a_replica_is_routed_by_the_router(hostile_stack: Stack) -> None:
    target = f"http://{l1(hostile_stack)}/v1/chat/completions"
    answer = check(hostile_stack, request(target), status=200, upstream="s1", path="/v1/chat/completions")
    assert answer.headers["x-router-model"] == "small"


def test_a_trailer_carrying_the_routers_headers_changes_nothing(hostile_stack: Stack) -> None:
    chunked = b"%x\r\n" % len(BODY) + BODY + b"\r\n0\r\n"
    trailer = f"x-gateway-destination-endpoint: {l1(hostile_stack)}\r\nx-extproc-cluster: large\r\n\r\n".encode()
    head = (
        request(body=None).removesuffix(b"\r\n")
        + b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    answer = check(hostile_stack, head + chunked + trailer, status=200, upstream="s1")
    assert "x-gateway-destination-endpoint" not in answer.received[0][1].headers


@pytest.mark.parametrize(
    ("name", "value"),
    [("x-envoy-retry-on", "5xx,reset"), ("x-envoy-max-retries", "5"), ("x-envoy-upstream-rq-timeout-ms", "1")],
)
def test_envoys_own_request_controls_are_not_taken_from_a_client(hostile_stack: Stack, name: str, value: str) -> None:
    # With a failing replica a client-set retry policy would multiply the model's work, and a
    # 1 ms timeout would cut every answer; Envoy strips both from external requests.
    replica = hostile_stack.fleet["s1"]
    replica.status = 500
    try:
        headers = [
            (name, value),
            ("x-envoy-retry-on", "5xx"),
            ("x-envoy-max-retries", "5"),
            ("x-forwarded-for", "127.0.0.1"),
        ]
        answer = check(hostile_stack, request(headers=headers), status=500, upstream="s1", follow_up=False)
        assert not [
            h
            for h in answer.received[0][1].headers
            if h.startswith("x-envoy-") and h != "x-envoy-expected-rq-timeout-ms"
        ]
    finally:
        replica.status = 200
    check(hostile_stack, request(headers=[("x-envoy-upstream-rq-timeout-ms", "1")]), status=200, upstream="s1")


def test_asking_for_an_explanation_gets_none_when_the_policy_does_not_allow_it(hostile_stack: Stack) -> None:
    answer = check(hostile_stack, request(headers=[("x-router-debug", "true")]), status=200, upstream="s1")
    assert not answer.headers.get("x-router-explain")


def test_an_explicit_model_the_policy_serves_elsewhere_cannot_pick_its_replica(hostile_stack: Stack) -> None:
    body = orjson.dumps(chat("hi", model="small"))
    headers = [("x-gateway-destination-endpoint", l1(hostile_stack)), ("x-extproc-cluster", "large")]
    answer = check(hostile_stack, request(body=body, headers=headers), status=200, upstream="s1")
    assert answer.headers["x-router-decision"] == "explicit"
