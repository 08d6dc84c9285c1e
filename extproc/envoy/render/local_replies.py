"""Envoy's own local replies (router unreachable, body too large, no upstream, an upstream timeout,
every refusal of its HTTP/1 codec) rewritten as OpenAI-style JSON errors, by ``local_reply_config``
mappers; and the same table read back (``classify``) to name the reply an access-log entry
describes, so the sidecar counts Envoy's replies by the code their clients saw."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from extproc.errors import openai_error

_DETAILS = "response.code_details"
# Replies that already carry our JSON bodies, by their response code details: the router's
# (extproc_*), direct responses, and the chains' upstream Lua filter's (extproc/envoy/render/
# chains.py: its JSON error when the fallback deadline has passed). The mappers leave them alone and classify() names none of them.
_OURS_PREFIX = "extproc_"
_OURS_EXACT = ("direct_response", "lua_response")
ALREADY_JSON = " || ".join([f"{_DETAILS}.startsWith('{_OURS_PREFIX}')", *(f"{_DETAILS} == '{d}'" for d in _OURS_EXACT)])


def _ours(details: str) -> bool:
    return details.startswith(_OURS_PREFIX) or details in _OURS_EXACT


# Seconds a client is told to wait before retrying a transient 503 of Envoy's own (the sidecar
# restarting or busy, no replica connection); OpenAI's SDKs honour Retry-After up to a minute.
RETRY_AFTER_SECONDS = 1


@dataclass(frozen=True)
class LocalReply:
    """One kind of Envoy local reply as its client sees it. It matches Envoy's reply by its
    response code details (exactly or by prefix) or by Envoy's status (``status_at_least``, or one
    ``status_of``), never one of the router's own; the first matching entry of LOCAL_REPLIES wins."""

    code: str
    kind: str
    message: str
    status: int | None = None  # the status sent; None keeps Envoy's
    details: tuple[str, ...] = ()
    details_prefix: str | None = None
    status_of: int | None = None
    status_at_least: int | None = None
    retry_after: int | None = None

    def expression(self) -> str:
        """The CEL filter of this reply's mapper."""
        terms = [f"{_DETAILS} == '{d}'" for d in self.details]
        if self.details_prefix is not None:
            terms.append(f"{_DETAILS}.startsWith('{self.details_prefix}')")
        if self.status_of is not None:
            terms.append(f"response.code == {self.status_of}")
        if self.status_at_least is not None:
            terms.append(f"response.code >= {self.status_at_least}")
        matched = " || ".join(terms) if terms else "true"
        return f"({matched}) && !({ALREADY_JSON})"

    def matches(self, status: int, details: str) -> bool:
        if _ours(details):
            return False
        if details in self.details or (self.details_prefix is not None and details.startswith(self.details_prefix)):
            return True
        if self.status_of is not None and status == self.status_of:
            return True
        if self.status_at_least is not None and status >= self.status_at_least:
            return True
        return not (self.details or self.details_prefix or self.status_of or self.status_at_least)

    def mapper(self) -> dict[str, Any]:
        mapper: dict[str, Any] = {
            "filter": _cel(self.expression()),
            "body_format_override": {
                "json_format": openai_error(self.message, self.kind, self.code),
                "content_type": "application/json",
            },
        }
        if self.status is not None:
            mapper["status_code"] = self.status
        if self.retry_after is not None:
            mapper["headers_to_add"] = [
                {
                    "header": {"key": "retry-after", "value": str(self.retry_after)},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ]
        return mapper


# In order: the first match wins. Status matches see Envoy's status before the mapping; the
# classification of access-log entries sees the status sent, which each status match keeps in
# its own range (431 stays 431, 413 stays 413, 504 stays 504, a 5xx stays a 5xx).
LOCAL_REPLIES: tuple[LocalReply, ...] = (
    LocalReply(
        "router_unavailable",
        "server_error",
        "the router is unavailable; retry shortly",
        status=503,
        details_prefix="ext_proc_error",
        retry_after=RETRY_AFTER_SECONDS,
    ),
    LocalReply(
        "invalid_path",
        "invalid_request_error",
        # (No literal percent signs: Envoy would read them as format commands.)
        "the request path cannot be normalised: percent-encoded slashes or backslashes, NUL and "
        "fragments (#) are not accepted",
        status=400,
        details=("path_normalization_failed",),
    ),
    LocalReply(
        "malformed_request",
        "invalid_request_error",
        "the request has both content-length and transfer-encoding; send one of them",
        status=400,
        details=("http1.content_length_and_chunked_not_allowed",),
    ),
    LocalReply(
        "malformed_request",
        "invalid_request_error",
        "a header contains a character HTTP does not allow (NUL or another control character)",
        status=400,
        details=("http1.invalid_characters",),
    ),
    LocalReply(
        "unsupported_transfer_encoding",
        "invalid_request_error",
        "only transfer-encoding: chunked is supported",
        status=501,
        details=("http1.invalid_transfer_encoding",),
    ),
    LocalReply(
        "headers_too_large",
        "invalid_request_error",
        "request headers are too large (over 60 KiB, or more than 100 headers)",
        status=431,
        status_of=431,
    ),
    LocalReply(
        "request_too_large",
        "invalid_request_error",
        "request body is larger than the proxy accepts",
        status=413,
        status_of=413,
    ),
    LocalReply(
        # The client did not send its headers and whole body within Envoy's request timeouts.
        "request_timeout",
        "invalid_request_error",
        "the request did not arrive in time; send the headers and the whole body without pausing",
        status=408,
        status_of=408,
    ),
    LocalReply(
        "response_too_large",
        "server_error",
        "the model server's answer is larger than the proxy reads; ask for fewer tokens or stream it",
        status=502,
        details=("response_payload_too_large",),
    ),
    LocalReply(
        # The model server took longer than the route's timeout (envoy.upstreamTimeout): a 504,
        # not a "retry shortly" 503, since the same request would likely time out again.
        "upstream_timeout",
        "server_error",
        "the model server did not finish its answer within the proxy's upstream timeout",
        status=504,
        status_of=504,
    ),
    LocalReply(
        "upstream_unavailable",
        "server_error",
        "no model server could take the request; retry shortly",
        status=503,
        status_at_least=500,
        retry_after=RETRY_AFTER_SECONDS,
    ),
    LocalReply("not_found", "invalid_request_error", "not found", status=404, status_of=404),
    LocalReply(
        # The HTTP/1 codec's other refusals (a malformed request line, header or chunk, two
        # content-lengths) and a missing host: Envoy's status and its reason, which names no
        # client data.
        "malformed_request",
        "invalid_request_error",
        "the request is not valid HTTP (%RESPONSE_CODE_DETAILS%)",
        details=("missing_host_header",),
        details_prefix="http1.",
    ),
    LocalReply(
        # Any other refusal of Envoy's own (a request timeout, an HTTP/2 message Envoy answers
        # instead of resetting): Envoy's status and reason.
        "invalid_request",
        "invalid_request_error",
        "the proxy refused the request (%RESPONSE_CODE_DETAILS%)",
    ),
)


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


def local_reply_mappers() -> list[dict[str, Any]]:
    """Envoy's own local replies as OpenAI-style errors, the first matching mapper winning. The
    router's replies (details ``extproc_*``), the chains' Lua filter's and direct responses
    already carry JSON and are left alone. HTTP/1 codec errors (malformed requests) are local replies too: each gets JSON here.
    What Envoy answers without a local reply (HTTP/2 stream resets, closed connections) is in
    the README ("Bad input")."""
    direct = {  # direct responses carry our JSON bodies; only the content type needs fixing
        "filter": _cel(f"{_DETAILS} == 'direct_response'"),
        "body_format_override": {
            "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
            "content_type": "application/json",
        },
    }
    return [direct, *(reply.mapper() for reply in LOCAL_REPLIES)]


def classify(status: int, details: str) -> LocalReply | None:
    """The local reply an access-log entry describes (the status sent, Envoy's response code
    details), or None for an answer that is not one of Envoy's local replies (a replica's, the
    router's own, a direct response, a success, or no answer at all)."""
    if status < 400 or not details or details == "via_upstream":
        return None
    return next((reply for reply in LOCAL_REPLIES if reply.matches(status, details)), None)
