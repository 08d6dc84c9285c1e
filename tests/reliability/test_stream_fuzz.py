"""Property-based fuzzing of the ext_proc stream handler with random message sequences.

Properties: nothing ever escapes the stream; every message Envoy waits on gets exactly one
answer, in order, of the matching kind (or an immediate response); observability messages get
none; every replica lease is returned.
"""

from __future__ import annotations

import asyncio
import math

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc._pb.envoy.config.core.v3 import base_pb2 as core
from extproc._pb.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as mode
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc.policy import parse_policy
from extproc.replicas.pool import Discovery, Pools
from extproc.router import Router, RouterState
from extproc.server import ExternalProcessor

POLICY = parse_policy("""
default_model: small
debug: {explain: true}
limits: {max_body_bytes: 4096}
models:
  small: {replicas: {static: ["10.0.0.1:8000", "10.0.0.2:8000"], envoy: override_host}}
  large: {replicas: {static: ["10.0.1.1:8000"]}}
  direct: {}
decisions:
  - {name: code, when: {keyword: [segfault]}, model: large, fallbacks: [small]}
  - {name: long, when: {tokens: {min: 30}}, model: direct}
  - {name: vip, when: {header: {name: x-user-tier, matches: "^p"}}, split: [{model: small, weight: 1}, {model: large, weight: 1}]}
""")

PATHS = st.sampled_from(
    ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/models", "/", "/v1/chat/completions?x=1", ""]
)
METHODS = st.sampled_from(["POST", "GET", "PUT", "", "post"])
TEXT = st.text(max_size=60)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12,
)
MESSAGES = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "tool", 5]),
            "content": st.one_of(
                TEXT,
                st.none(),
                st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2),
                st.integers(-5, 5),
            ),
        }
    ),
    max_size=4,
)
CHAT = st.fixed_dictionaries(
    {"model": st.sampled_from(["auto", "small", "large", "direct", "nope", 7]), "messages": MESSAGES},
    optional={"stream": st.booleans(), "x": JSON_VALUES},
)
BODIES = st.one_of(
    st.binary(max_size=200),
    CHAT.map(orjson.dumps),
    JSON_VALUES.map(orjson.dumps),
    st.just(b'{"model":"auto","messages":[{"role":"user","content":"it segfaults"}]}'),
    st.just(b"x" * 5000),
)
HEADERS = st.dictionaries(
    st.sampled_from(
        ["x-user-tier", "x-session-id", "x-router-debug", "content-encoding", "x-request-id", "content-type"]
    ),
    TEXT,
    max_size=4,
)


def header_map(values: dict[str, str]) -> core.HeaderMap:
    return core.HeaderMap(
        headers=[core.HeaderValue(key=k, raw_value=v.encode("utf-8", "surrogatepass")) for k, v in values.items()]
    )


@st.composite
def messages(draw: st.DrawFn) -> pb.ProcessingRequest:
    kind = draw(
        st.sampled_from(
            [
                "request_headers",
                "request_body",
                "response_headers",
                "response_body",
                "request_trailers",
                "response_trailers",
            ]
        )
    )
    request = pb.ProcessingRequest(observability_mode=draw(st.booleans()) and draw(st.booleans()))
    if kind in ("request_headers", "response_headers"):
        values = {
            ":path": draw(PATHS),
            ":method": draw(METHODS),
            ":status": draw(st.sampled_from(["200", "503", "x"])),
            **draw(HEADERS),
        }
        getattr(request, kind).CopyFrom(pb.HttpHeaders(headers=header_map(values), end_of_stream=draw(st.booleans())))
    elif kind in ("request_body", "response_body"):
        getattr(request, kind).CopyFrom(
            pb.HttpBody(body=draw(BODIES), end_of_stream=draw(st.booleans()) or draw(st.booleans()))
        )
    else:
        getattr(request, kind).CopyFrom(pb.HttpTrailers(trailers=header_map(draw(HEADERS))))
    if draw(st.booleans()):
        attributes = request.attributes["envoy.filters.http.ext_proc"]
        attributes.update({"request.path": draw(PATHS), "request.method": draw(METHODS)})
        for name, value in draw(HEADERS).items():
            attributes[f"request.headers['{name}']"] = value
    if draw(st.booleans()):
        request.metadata_context.filter_metadata["extproc"].update(
            {
                "lease": draw(st.sampled_from(["1", "2", "999", "x", ""])),
                "model": draw(st.sampled_from(["small", "", "nope"])),
            }
        )
    if draw(st.booleans()):
        request.protocol_config.request_body_mode = draw(
            st.sampled_from([mode.ProcessingMode.BUFFERED, mode.ProcessingMode.BUFFERED_PARTIAL])
        )
    return request


ANSWERS = {
    "request_headers": {"request_headers", "immediate_response"},
    "request_body": {"request_body", "immediate_response"},
    "response_headers": {"response_headers"},
    "response_body": {"response_body"},
    "request_trailers": {"request_trailers"},
    "response_trailers": {"response_trailers"},
}


async def run_stream(router: Router, sequence: list[pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
    async def incoming():
        for message in sequence:
            yield message

    return [response async for response in ExternalProcessor(router).Process(incoming(), None)]  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(messages(), min_size=1, max_size=6), min_size=1, max_size=4))
def test_random_streams_never_raise_and_answer_in_protocol_order(streams: list[list[pb.ProcessingRequest]]) -> None:
    router = Router(RouterState(POLICY, Pools.build(POLICY, Discovery())))

    async def scenario() -> None:
        # Several streams at once, as Envoy multiplexes them.
        results = await asyncio.gather(*(run_stream(router, s) for s in streams))
        for sequence, responses in zip(streams, results, strict=True):
            expected = [m.WhichOneof("request") for m in sequence if not m.observability_mode]
            assert len(responses) == len(expected)
            for kind, response in zip(expected, responses, strict=True):
                assert response.WhichOneof("response") in ANSWERS[kind]
                if response.WhichOneof("response") == "immediate_response":
                    error = orjson.loads(response.immediate_response.body)["error"]
                    assert error["message"] and error["type"] and error["code"]

    asyncio.run(scenario())
    router.tracker.expire(now=math.inf)  # grace periods over: nothing may stay leased
    assert dict(router.tracker.inflight) == {} and router.tracker.open_leases == 0
    assert router.metrics.stream_errors._metrics == {}  # no handler bug was papered over
