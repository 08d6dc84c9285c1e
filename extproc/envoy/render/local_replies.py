"""Envoy's own local replies (router unreachable, body too large, no upstream, every refusal of
its HTTP/1 codec) rewritten as OpenAI-style JSON errors, by ``local_reply_config`` mappers."""

from __future__ import annotations

from typing import Any

from extproc.errors import openai_error


def _cel(expression: str) -> dict[str, Any]:
    return {
        "extension_filter": {
            "name": "cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression,
            },
        }
    }


def _mapper(expression: str, status: int | None, message: str, kind: str, code: str) -> dict[str, Any]:
    mapper: dict[str, Any] = {
        "filter": _cel(expression),
        "body_format_override": {
            "json_format": openai_error(message, kind, code),
            "content_type": "application/json",
        },
    }
    if status is not None:  # None: keep Envoy's status
        mapper["status_code"] = status
    return mapper


def local_reply_mappers() -> list[dict[str, Any]]:
    """Envoy's own local replies as OpenAI-style errors, the first matching mapper winning. The
    router's replies (details ``extproc_*``), the chains' Lua filter's and direct responses already carry JSON and are left
    alone. HTTP/1 codec errors (malformed requests) are local replies too: each gets JSON here.
    What Envoy answers without a local reply (HTTP/2 stream resets, closed connections) is in
    the README ("Bad input")."""
    # lua_response: the chains' upstream Lua filter (extproc/envoy/render/chains.py), which
    # answers with its own JSON error when the fallback deadline has passed.
    ours = (
        "response.code_details.startsWith('extproc_') || response.code_details == 'direct_response'"
        " || response.code_details == 'lua_response'"
    )
    details = "response.code_details"
    return [
        {  # direct responses carry our JSON bodies; only the content type needs fixing
            "filter": _cel(f"{details} == 'direct_response'"),
            "body_format_override": {
                "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                "content_type": "application/json",
            },
        },
        _mapper(
            f"{details}.startsWith('ext_proc_error')",
            503,
            "the router is unavailable; retry shortly",
            "server_error",
            "router_unavailable",
        ),
        _mapper(
            f"{details} == 'path_normalization_failed'",
            400,
            # (No literal percent signs: Envoy would read them as format commands.)
            "the request path cannot be normalised: percent-encoded slashes or backslashes, NUL and "
            "fragments (#) are not accepted",
            "invalid_request_error",
            "invalid_path",
        ),
        _mapper(
            f"{details} == 'http1.content_length_and_chunked_not_allowed'",
            400,
            "the request has both content-length and transfer-encoding; send one of them",
            "invalid_request_error",
            "malformed_request",
        ),
        _mapper(
            f"{details} == 'http1.invalid_characters'",
            400,
            "a header contains a character HTTP does not allow (NUL or another control character)",
            "invalid_request_error",
            "malformed_request",
        ),
        _mapper(
            f"{details} == 'http1.invalid_transfer_encoding'",
            501,
            "only transfer-encoding: chunked is supported",
            "invalid_request_error",
            "unsupported_transfer_encoding",
        ),
        _mapper(
            "response.code == 431",
            431,
            "request headers are too large (over 60 KiB, or more than 100 headers)",
            "invalid_request_error",
            "headers_too_large",
        ),
        _mapper(
            f"response.code == 413 && !({ours})",
            413,
            "request body is larger than the proxy accepts",
            "invalid_request_error",
            "request_too_large",
        ),
        _mapper(
            "response.code == 408",
            408,
            "the request did not arrive in time; send the headers and the whole body without pausing",
            "invalid_request_error",
            "request_timeout",
        ),
        _mapper(
            f"{details} == 'response_payload_too_large'",
            502,
            "the model server's answer is larger than the proxy reads; ask for fewer tokens or stream it",
            "server_error",
            "response_too_large",
        ),
        _mapper(
            f"response.code >= 500 && !({ours})",
            503,
            "no model server could take the request; retry shortly",
            "server_error",
            "upstream_unavailable",
        ),
        _mapper(f"response.code == 404 && !({ours})", 404, "not found", "invalid_request_error", "not_found"),
        _mapper(
            # The HTTP/1 codec's other refusals (a malformed request line, header or chunk, two
            # content-lengths) and a missing host: Envoy's status and its reason, which names
            # no client data.
            f"{details}.startsWith('http1.') || {details} == 'missing_host_header'",
            None,
            "the request is not valid HTTP (%RESPONSE_CODE_DETAILS%)",
            "invalid_request_error",
            "malformed_request",
        ),
        _mapper(
            # Any other refusal of Envoy's own (a request timeout, an HTTP/2 message Envoy
            # answers instead of resetting): Envoy's status and reason.
            f"!({ours})",
            None,
            "the proxy refused the request (%RESPONSE_CODE_DETAILS%)",
            "invalid_request_error",
            "invalid_request",
        ),
    ]
