"""Reading ext_proc messages whose header attributes carry bytes that are not UTF-8."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from extproc import protocol
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc._pb.extproc import lenient_pb2

FILTER = "envoy.filters.http.ext_proc"


def wire(attributes: dict[str, bytes | float], body: bytes = b'{"model":"auto"}') -> bytes:
    """A ProcessingRequest as Envoy sends it, string values as raw bytes."""
    lenient = lenient_pb2.ProcessingRequest()
    for key, value in attributes.items():
        field = lenient.attributes[FILTER].fields[key]
        if isinstance(value, bytes):
            field.string_value = value
        else:
            field.number_value = value
    rest = pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True), observability_mode=False)
    rest.protocol_config.request_body_mode = 1
    return rest.SerializeToString() + lenient.SerializeToString()


def test_a_valid_message_parses_as_usual() -> None:
    request = protocol.parse_request(wire({"request.path": b"/v1/chat/completions"}))
    assert protocol.attributes(request)[0] == {"request.path": "/v1/chat/completions"}
    assert protocol.invalid_attributes(request) == []


def test_non_utf8_header_values_are_left_out_and_named() -> None:
    data = wire(
        {
            "request.path": b"/v1/chat/completions",
            "request.headers['x-session-id']": b"s-\xff",
            "request.headers['x-user-tier']": b"gold",
            "request.headers['x-router-debug']": b"\xc3\x28",
            "request.id": 7.0,
        }
    )
    with pytest.raises(DecodeError):
        pb.ProcessingRequest.FromString(data)
    request = protocol.parse_request(data)
    values, headers = protocol.attributes(request)
    assert values == {"request.path": "/v1/chat/completions", "request.id": "7"}
    assert headers == {"x-user-tier": "gold"}
    assert protocol.invalid_attributes(request) == ["x-router-debug", "x-session-id"]
    assert request.request_body.body == b'{"model":"auto"}' and request.request_body.end_of_stream
    assert request.protocol_config.request_body_mode == 1


def test_a_message_broken_elsewhere_still_fails() -> None:
    with pytest.raises(DecodeError):
        protocol.parse_request(b"\x0a\xff\xff")


def test_request_headers_name_values_that_are_not_utf8() -> None:
    headers = pb.HttpHeaders()
    headers.headers.headers.add(key="x-session-id", raw_value=b"s-\xff")
    headers.headers.headers.add(key="x-user-tier", raw_value=b"gold")
    values, invalid = protocol.read_headers(headers.headers)
    assert values == {"x-session-id": "s-\ufffd", "x-user-tier": "gold"} and invalid == ["x-session-id"]
