"""Envoy ext_proc messages in and out: reading headers and attributes, building responses."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

from extproc._pb.envoy.config.core.v3 import base_pb2 as core
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc._pb.envoy.type.v3 import http_status_pb2 as http_status
from extproc._pb.extproc import lenient_pb2
from extproc.errors import RouterError

OVERWRITE = core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_HEADER_ATTRIBUTE = re.compile(r"^request\.headers\[['\"]([^'\"]+)['\"]\]$")
# Visible ASCII and spaces/tabs inside; no CR, LF or other controls (header injection).
_SAFE_VALUE = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?$")

EMPTY_MUTATION = pb.HeaderMutation()
CONTINUE_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
CONTINUE_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())
CONTINUE_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
CONTINUE_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
_JSON = core.HeaderValueOption(
    header=core.HeaderValue(key="content-type", raw_value=b"application/json"), append_action=OVERWRITE
)


def safe_header_value(value: str) -> bool:
    return bool(_SAFE_VALUE.match(value))


def header_map(header_map: core.HeaderMap) -> dict[str, str]:
    """Headers of an HttpHeaders message. Envoy fills raw_value only (lower-case keys)."""
    return read_headers(header_map)[0]


def read_headers(header_map: core.HeaderMap) -> tuple[dict[str, str], list[str]]:
    """(headers, names of those whose value is not UTF-8). Such values are kept with U+FFFD in
    place of the bad bytes; the caller decides whether to refuse the request."""
    out: dict[str, str] = {}
    invalid: list[str] = []
    for header in header_map.headers:
        if header.raw_value:
            try:
                value = header.raw_value.decode()
            except UnicodeDecodeError:
                invalid.append(header.key)
                value = header.raw_value.decode("utf-8", "replace")
        else:
            value = header.value
        # Repeated headers are joined the way HTTP defines it.
        out[header.key] = f"{out[header.key]},{value}" if header.key in out else value
    return out, invalid


# --- reading a ProcessingRequest whose attributes carry bytes that are not UTF-8 --------------

# Attributes Envoy sent that were not UTF-8 are listed (as keys) under this attributes entry,
# which Envoy itself never uses (its entries are named after filters).
INVALID_ATTRIBUTES = "extproc.invalid_utf8"


def parse_request(data: bytes) -> pb.ProcessingRequest:
    """A ProcessingRequest from the wire. One non-UTF-8 header value in the attributes would make
    the standard parse fail and with it the stream (Envoy answers 503): such a message is read
    again with those values left out and listed under INVALID_ATTRIBUTES."""
    try:
        return pb.ProcessingRequest.FromString(data)
    except DecodeError:
        lenient = lenient_pb2.ProcessingRequest.FromString(data)  # raises again if the rest is bad too
    attributes = {name: dict(struct.fields) for name, struct in lenient.attributes.items()}
    lenient.ClearField("attributes")
    request = pb.ProcessingRequest.FromString(lenient.SerializeToString())  # every other field, unchanged
    invalid: list[str] = []
    for name, fields in attributes.items():
        target = request.attributes[name]
        for key, value in fields.items():
            kind = value.WhichOneof("kind")
            if kind == "string_value":
                try:
                    target.fields[key].string_value = value.string_value.decode()
                except UnicodeDecodeError:
                    invalid.append(key)
            elif kind == "number_value":
                target.fields[key].number_value = value.number_value
            elif kind == "bool_value":
                target.fields[key].bool_value = value.bool_value
    for key in invalid:
        request.attributes[INVALID_ATTRIBUTES].fields[key].bool_value = True
    return request


def invalid_attributes(request: pb.ProcessingRequest) -> list[str]:
    """Names of the headers (or other attributes) whose value was not UTF-8 (see parse_request)."""
    struct = request.attributes.get(INVALID_ATTRIBUTES)
    if struct is None:
        return []
    return sorted(_header_name(key) or key for key in struct.fields)


_attribute_names: dict[str, str | None] = {}  # attribute key -> header name (None: not a header)


def _header_name(key: str) -> str | None:
    # The same few keys arrive on every request: match each once.
    name = _attribute_names.get(key, "")
    if name == "":
        match = _HEADER_ATTRIBUTE.match(key)
        name = _attribute_names[key] = match.group(1).lower() if match else None
    return name


def attributes(request: pb.ProcessingRequest) -> tuple[dict[str, str], dict[str, str]]:
    """(request attributes, request headers sent as ``request.headers['name']`` attributes)."""
    values: dict[str, str] = {}
    headers: dict[str, str] = {}
    for name, struct in request.attributes.items():
        if name == INVALID_ATTRIBUTES:
            continue
        for key, value in struct.fields.items():
            kind = value.WhichOneof("kind")
            if kind == "string_value":
                text = value.string_value
            elif kind == "number_value":
                text = str(int(value.number_value))
            else:
                continue
            name = _header_name(key)
            if name is None:
                values[key] = text
            else:
                headers[name] = text
    return values, headers


def metadata(request: pb.ProcessingRequest, namespace: str) -> dict[str, str]:
    struct = request.metadata_context.filter_metadata.get(namespace)
    if struct is None:
        return {}
    return {k: v.string_value for k, v in struct.fields.items() if v.WhichOneof("kind") == "string_value"}


def set_header(name: str, value: str) -> core.HeaderValueOption:
    return core.HeaderValueOption(header=core.HeaderValue(key=name, raw_value=value.encode()), append_action=OVERWRITE)


def mutation(set_headers: Mapping[str, str], remove: Iterable[str] = ()) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[set_header(k, v) for k, v in set_headers.items()], remove_headers=list(remove)
    )


def immediate(error: RouterError) -> pb.ProcessingResponse:
    """Envoy answers the client with this status and OpenAI-style JSON body."""
    headers = [_JSON]
    if error.retry_after is not None:
        headers.append(set_header("retry-after", str(error.retry_after)))
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status.HttpStatus(code=error.status),  # type: ignore[arg-type]
            headers=pb.HeaderMutation(set_headers=headers),
            body=error.body(),
            details=f"extproc_{error.code}",
        )
    )


def local_answer(status: int, headers: Mapping[str, str], body: bytes, details: str) -> pb.ProcessingResponse:
    """Envoy answers the client with this (a semantic cache hit) instead of calling upstream."""
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status.HttpStatus(code=status),  # type: ignore[arg-type]
            headers=mutation(headers),
            body=body,
            details=details,
        )
    )


def body_response(
    header_mutation: pb.HeaderMutation,
    body: bytes | None,
    dynamic_metadata: Mapping[str, Mapping[str, str]],
    fixed_metadata: bytes = b"",
) -> pb.ProcessingResponse:
    """The answer to a request body. ``fixed_metadata`` is a serialized Struct built once (a
    chain's plan: extproc/fallback.py) that the per-request ``dynamic_metadata`` strings are
    added to, namespace by namespace."""
    # A header mutation is always present, even when Envoy cannot apply it (request headers not
    # sent to us): its presence is what makes Envoy clear the route cache and route again on
    # the dynamic metadata.
    common = pb.CommonResponse(header_mutation=header_mutation, clear_route_cache=True)
    if body is not None:
        common.body_mutation.body = body
    response = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
    struct = response.dynamic_metadata
    if fixed_metadata:
        struct.MergeFromString(fixed_metadata)
    for namespace, fields in dynamic_metadata.items():
        inner = struct.fields[namespace].struct_value.fields
        for key, value in fields.items():
            inner[key].string_value = value
    return response


def response_headers_response(set_headers: Mapping[str, str]) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(
        response_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=mutation(set_headers)))
    )


def to_value(value: Any) -> struct_pb2.Value:
    """A protobuf Value of JSON-like data (also built once, to put in many responses' metadata)."""
    out = struct_pb2.Value()
    if isinstance(value, str):
        out.string_value = value
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int | float):
        out.number_value = value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            out.struct_value.fields[key].CopyFrom(to_value(item))
    else:
        out.list_value.values.extend(to_value(item) for item in value)
    return out


def compact_json(data: object) -> str:
    return orjson.dumps(data).decode()
