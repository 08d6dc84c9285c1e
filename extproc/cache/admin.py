"""The invalidation command: one gRPC method beside ext_proc on the sidecar's own server (its
socket, or its TCP address with the same TLS), so `extproc cache invalidate` needs no other port.
Request and answer are small JSON documents: `{"model": name or null}` -> `{"dropped": n}`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import orjson

SERVICE = "extproc.v1.Cache"
INVALIDATE = f"/{SERVICE}/Invalidate"


def add_to_server(server: grpc.aio.Server, cache: Callable[[], Any]) -> None:
    """Serve Invalidate on server; `cache()` is the live SemanticCache (None: not caching)."""

    async def invalidate(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            model = orjson.loads(request or b"{}").get("model")
        except (orjson.JSONDecodeError, AttributeError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, 'send {"model": name or null}')
        if model is not None and not isinstance(model, str):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "'model' must be a string")
        current = cache()
        if current is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no decision of the policy uses the cache")
        dropped = await current.invalidate(model)
        return orjson.dumps({"dropped": dropped})

    handler = grpc.unary_unary_rpc_method_handler(invalidate)  # bytes in, bytes out
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Invalidate": handler}),))


def request_invalidate(channel: grpc.Channel, model: str | None, timeout: float = 10.0) -> int:
    call = channel.unary_unary(INVALIDATE)
    answer = call(orjson.dumps({"model": model}), timeout=timeout)
    return int(orjson.loads(answer)["dropped"])
