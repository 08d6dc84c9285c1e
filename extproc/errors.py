"""Errors a request can end in, each rendered as an OpenAI-style error body."""

from __future__ import annotations

import math
from typing import Any

import orjson


def openai_error(message: str, kind: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object, as the router and Envoy's own replies send it: param is always
    there, null when no one field is at fault."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class RouterError(Exception):
    """A request the router answers itself, with an HTTP status and an OpenAI error body."""

    status = 500
    type = "server_error"
    code = "internal_error"
    retry_after: int | None = None  # seconds, sent as Retry-After

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.param = param

    def body(self) -> bytes:
        return orjson.dumps(openai_error(self.message, self.type, self.code, self.param))


class BadRequest(RouterError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Forbidden(RouterError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class NotFound(RouterError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(RouterError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class MethodNotAllowed(RouterError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(RouterError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(RouterError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class ServiceUnavailable(RouterError):
    status = 503
    type = "server_error"
    code = "no_available_replica"
    # Replicas come back on their own timescale (a restart, discovery, an ejection's end).
    retry_after = 5


class PiiCheckUnavailable(RouterError):
    status = 503
    type = "server_error"
    code = "pii_check_unavailable"
    retry_after = 1  # the encoder was busy for this request's deadline


class RateLimited(RouterError):
    """Every backend the request could go to asked the router to wait (429 with Retry-After)."""

    status = 429
    type = "rate_limit_error"
    code = "all_backends_cooling_down"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))
