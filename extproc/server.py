"""The ext_proc gRPC stream: one small state machine per HTTP request. No routing logic here.

Envoy can run the router two ways, and the same stream handler serves both:

* one round trip (deploy/envoy/envoy.yaml): request headers are skipped, path, method and the
  headers the policy reads arrive as attributes on the single buffered body message, and the
  decision goes back as dynamic metadata that Envoy's routes and load balancers read;
* two round trips (any Envoy setup that sends request headers): the decision also goes back as
  header mutations (cluster header, x-selected-model, x-gateway-destination-endpoint).

The end of each request comes back on another stream: Envoy's gRPC access log (see
extproc/accesslog.py), which ends the replica lease and carries the status and token usage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from extproc import errors, protocol
from extproc import headers as h
from extproc._pb.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from extproc._pb.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from extproc.cache import Capture, render
from extproc.fallback import request_metadata
from extproc.lanes import LARGE_BODY_BYTES, LARGE_BODY_SECONDS
from extproc.logs import log_decision
from extproc.request import UNKNOWN_PATH_MESSAGE, api_for_path, looks_like_llm_path
from extproc.router import PASSTHROUGH, Call, Routed, Router

log = logging.getLogger("extproc.server")

BUFFERED_PARTIAL = processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL
QUEUE_MARGIN = 0.5  # seconds beyond a queued request's longest wait, for placing it and answering
CACHED = "cached"  # the requests metric's status for an answer from the semantic cache


class Exchange:
    """The state of one HTTP request as seen on one ext_proc stream."""

    __slots__ = (
        "body_mode",
        "capture",
        "extended",
        "headers",
        "method",
        "notices",
        "path",
        "pending",
        "request_id",
        "routed",
        "router",
        "saw_headers",
        "skip",
    )

    def __init__(self, router: Router) -> None:
        # Answers sent before the message's own (override_message_timeout while it queues).
        self.notices: asyncio.Queue[pb.ProcessingResponse] = asyncio.Queue()
        self.router = router
        self.method = ""
        self.path = ""
        self.request_id = ""
        self.headers: dict[str, str] = {}
        self.routed: Routed | None = None
        self.skip = False  # not an LLM call: let everything through untouched
        self.body_mode = 0
        self.saw_headers = False  # Envoy sent the request headers (two-round-trip mode)
        # A miss's response mirrored by the cache filter (its own stream, observability mode).
        self.pending = None
        self.capture: Capture | None = None
        self.extended = False  # Envoy honours one override_message_timeout per message

    async def handle(self, message: pb.ProcessingRequest) -> pb.ProcessingResponse | None:
        kind = message.WhichOneof("request")
        if message.observability_mode:
            await self._mirrored(message, kind)
            return None  # Envoy does not wait for answers to these
        if message.HasField("protocol_config"):
            self.body_mode = message.protocol_config.request_body_mode
        if kind == "request_headers":
            return self._request_headers(message)
        if kind == "request_body":
            return await self._request_body(message)
        if kind == "response_headers":
            return self._response_headers(message)
        if kind == "response_body":
            return protocol.CONTINUE_RESPONSE_BODY
        if kind == "request_trailers":
            return protocol.CONTINUE_REQUEST_TRAILERS
        if kind == "response_trailers":
            return protocol.CONTINUE_RESPONSE_TRAILERS
        raise ValueError(f"unexpected ext_proc message {kind!r}")

    # --- request path ------------------------------------------------------------------------

    def _request_headers(self, message: pb.ProcessingRequest) -> pb.ProcessingResponse:
        headers, invalid = protocol.read_headers(message.request_headers.headers)
        self.saw_headers = True
        self.method = headers.get(":method", "")
        self.path = headers.get(":path", "")
        self.request_id = headers.get(h.REQUEST_ID, "")
        self.headers = headers
        refused = self._refuse_path() or self._refuse_invalid(invalid)
        if refused is not None:
            return refused
        if self.skip:
            return protocol.CONTINUE_HEADERS
        if self.method != "POST":
            return self._fail(
                errors.MethodNotAllowed(f"{self.path.split('?')[0]} only accepts POST, not {self.method}")
            )
        if message.request_headers.end_of_stream:
            return self._fail(errors.BadRequest("request body is empty; send a JSON object with a 'model' field"))
        return protocol.CONTINUE_HEADERS

    async def _request_body(self, message: pb.ProcessingRequest) -> pb.ProcessingResponse:
        if not self.method:  # one-round-trip mode: the headers came as attributes
            values, headers = protocol.attributes(message)
            self.method = values.get("request.method", "")
            self.path = values.get("request.path", "")
            self.request_id = values.get("request.id", "") or headers.get(h.REQUEST_ID, "")
            self.headers = headers
            refused = self._refuse_path() or self._refuse_invalid(protocol.invalid_attributes(message))
            if refused is not None:
                return refused
        if self.skip:
            return protocol.CONTINUE_BODY
        if not message.request_body.end_of_stream:
            if self.body_mode == BUFFERED_PARTIAL:
                return self._fail(errors.PayloadTooLarge("request body exceeds the proxy's buffer limit"))
            return self._fail(
                errors.RouterError(
                    "router misconfigured: Envoy must send the request body BUFFERED", code="misconfigured"
                )
            )
        call = Call(
            self.method,
            self.path,
            self.headers,
            message.request_body.body,
            self.request_id,
            explain=self.headers.get(h.DEBUG, "").lower() == "true",
            on_wait=self._extend_timeout,
        )
        try:
            if len(call.body) > LARGE_BODY_BYTES:
                routed = await self._route_large(call)
            else:
                routed = await self.router.route(call)
        except errors.RouterError as error:
            return self._fail(error)
        self.routed = routed
        if routed.plan is not None:
            self.router.recent_plans.remember(self.request_id, routed.plan)
        metrics = self.router.metrics
        if routed.cache_hit is not None:
            metrics.count_request(routed.model, routed.decision, _domain(routed), CACHED)
            metrics.observe_stages(routed.stages)
            log_decision(self.request_id, _api(self.path), routed, 200, None)
            return self._cached(routed)
        metrics.count_request(routed.model or PASSTHROUGH, routed.decision, _domain(routed), "ok")
        metrics.observe_stages(routed.stages)
        log_decision(self.request_id, _api(self.path), routed, 200, None)
        return self._mutations(routed)

    async def _route_large(self, call: Call) -> Routed:
        """A large body's parse is Python work proportional to it (100,000 messages: 0.1-0.9 s
        on a busy machine), which may outlast Envoy's message_timeout: ask Envoy first to wait
        for its own deadline (plus any queue wait, since Envoy takes one extension per message),
        and answer 503 router_timeout when that passes rather than leave Envoy to cut it."""
        waits = self.router.longest_wait
        self._extend_timeout(LARGE_BODY_SECONDS + waits)
        try:
            return await asyncio.wait_for(self.router.route(call), LARGE_BODY_SECONDS + waits)
        except TimeoutError:
            raise errors.ServiceUnavailable(
                f"routing this {len(call.body)}-byte request took longer than its {LARGE_BODY_SECONDS:g}s "
                "deadline; retry, or send a shorter conversation",
                code="router_timeout",
            ) from None

    def _extend_timeout(self, seconds: float) -> None:
        """The request waits (for a replica with room, or for a large body's routing): ask Envoy
        to wait for our answer that long (and a margin for placing it), once per message, as
        override_message_timeout allows."""
        if self.extended:
            return  # Envoy would ignore a second one; the first already counted this wait
        self.extended = True
        response = pb.ProcessingResponse()
        response.override_message_timeout.FromMilliseconds(int((seconds + QUEUE_MARGIN) * 1000))
        self.notices.put_nowait(response)

    def _refuse_path(self) -> pb.ProcessingResponse | None:
        """Not an LLM call: let it through (skip). Close to one but not exact: refuse it, since
        some server might serve it as the LLM call it resembles, unrouted."""
        if api_for_path(self.path) is not None:
            return None
        if looks_like_llm_path(self.path):
            return self._fail(errors.NotFound(UNKNOWN_PATH_MESSAGE, code="unknown_path"))
        self.skip = True
        return None

    def _refuse_invalid(self, names: list[str]) -> pb.ProcessingResponse | None:
        """A header the router was given (and may read) is not UTF-8: the client's own error."""
        if not names or self.skip:  # (a request that is not an LLM call passes as it is)
            return None
        return self._fail(
            errors.BadRequest(
                f"header {names[0]!r} is not valid UTF-8; send header values as ASCII or UTF-8",
                code="invalid_header",
                param=names[0],
            )
        )

    def _mutations(self, routed: Routed) -> pb.ProcessingResponse:
        # Everything from the request's own answer, routed with the policy it started with: a
        # reload while it was routed must not rename its headers.
        set_headers: dict[str, str] = {
            routed.cluster_header: routed.cluster,
            h.ROUTER_DECISION: routed.decision,
        }
        if protocol.safe_header_value(routed.upstream_model):
            set_headers[h.SELECTED_MODEL] = routed.upstream_model
        remove = [h.DESTINATION_ENDPOINT, h.AFFINITY_KEY]
        meta = {
            h.KEY_CLUSTER: routed.cluster,
            h.KEY_MODEL: routed.model or PASSTHROUGH,
            h.KEY_DECISION: routed.decision,
        }
        if h.SELECTED_MODEL in set_headers:
            meta[h.KEY_UPSTREAM_MODEL] = routed.upstream_model
        if routed.endpoints:
            listed = ",".join(routed.endpoints) if routed.envoy_lb == "override_host" else routed.endpoints[0]
            set_headers[h.DESTINATION_ENDPOINT] = listed
            remove.remove(h.DESTINATION_ENDPOINT)
            meta[h.KEY_ENDPOINT] = routed.endpoints[0]
        if routed.affinity_key:
            set_headers[h.AFFINITY_KEY] = routed.affinity_key
            remove.remove(h.AFFINITY_KEY)
            meta[h.KEY_AFFINITY] = routed.affinity_key
        if routed.lease is not None:
            meta[h.KEY_LEASE] = str(routed.lease.id)
        if routed.explanation is not None:
            meta[h.KEY_EXPLAIN] = protocol.compact_json(routed.explanation)
        if routed.cache_detail is not None and routed.cache_detail.get("result") == "miss":
            meta[h.KEY_CACHE] = "miss"
        if routed.cache_token:
            meta[h.KEY_CACHE_STORE] = routed.cache_token
        if routed.body is not None:
            set_headers[h.CONTENT_LENGTH] = str(len(routed.body))
        fixed = b""
        if routed.plan is not None:
            # The request's own policy's deadline, not the router's current one.
            meta.update(request_metadata(routed.model_span, routed.fallback_deadline))
            fixed = routed.plan.fixed_metadata()
        dynamic: dict[str, dict[str, str]] = {h.METADATA_NAMESPACE: meta}
        if routed.endpoints:
            dynamic[h.LB_NAMESPACE] = {h.DESTINATION_ENDPOINT: set_headers[h.DESTINATION_ENDPOINT]}
        if not self.saw_headers:
            # Envoy skipped the request headers, so it could not apply header changes; routing
            # runs on the metadata. The (empty) mutation is still sent: it makes Envoy re-route.
            return protocol.body_response(protocol.EMPTY_MUTATION, routed.body, dynamic, fixed)
        return protocol.body_response(protocol.mutation(set_headers, remove), routed.body, dynamic, fixed)

    def _cached(self, routed: Routed) -> pb.ProcessingResponse:
        """A semantic cache hit, answered as the API would (JSON, or SSE when asked to stream)."""
        hit = routed.cache_hit
        assert hit is not None and routed.signals is not None
        content_type, body = render(
            hit.answer, stream=hit.stream, include_usage=hit.include_usage, prompt_tokens=routed.signals.tokens
        )
        headers = {
            h.CONTENT_TYPE: content_type,
            h.CACHE: "hit",
            h.ROUTER_MODEL: routed.model,
            h.ROUTER_DECISION: routed.decision,
        }
        if routed.explanation is not None:
            headers[h.ROUTER_EXPLAIN] = protocol.compact_json(routed.explanation)
        if hit.stream:
            headers["cache-control"] = "no-cache"
        return protocol.local_answer(200, headers, body, "extproc_cache_hit")

    async def _mirrored(self, message: pb.ProcessingRequest, kind: str | None) -> None:
        """The cache filter's copy of a miss's response: claim the miss by the token in the
        metadata, read the body as it streams past, store it once it ended normally."""
        cache = self.router.cache
        if kind == "response_headers":
            token = protocol.metadata(message, h.METADATA_NAMESPACE).get(h.KEY_CACHE_STORE, "")
            claimed = cache.claim(token) if cache is not None and token else None
            if claimed is None:
                return
            self.pending, capture = claimed
            headers = protocol.header_map(message.response_headers.headers)
            status_text = headers.get(":status", "")
            status = int(status_text) if status_text.isdigit() else 0
            if not capture.headers(status, headers.get(h.CONTENT_TYPE, "")):
                self.router.metrics.cache_not_stored.labels("status").inc()
                self.pending = None
                return
            self.capture = capture
            if message.response_headers.end_of_stream:
                await self._store()
        elif kind == "response_body" and self.capture is not None:
            self.capture.feed(message.response_body.body)
            if message.response_body.end_of_stream:
                await self._store()
        elif kind == "response_trailers" and self.capture is not None:
            await self._store()

    async def _store(self) -> None:
        capture, pending, cache = self.capture, self.pending, self.router.cache
        self.capture = self.pending = None
        if capture is not None and pending is not None and cache is not None:
            await cache.store_answer(pending, capture)

    def _fail(self, error: errors.RouterError) -> pb.ProcessingResponse:
        self.skip = True
        self.router.metrics.count_request("none", "none", "none", str(error.status))
        self.router.metrics.count_error(error.code)
        log_decision(self.request_id, _api(self.path), None, error.status, error.code)
        return protocol.immediate(error)

    def close(self) -> None:
        """The ext_proc stream ended, which Envoy does when the HTTP request ends: end the lease.
        Envoy's access-log entry ends it too, but a request reset before Envoy applied our answer
        carries none of our metadata, so no entry would ever name its lease."""
        if self.routed is not None and self.routed.lease is not None:
            self.router.tracker.release(self.routed.lease)
        if self.capture is not None:  # the response never ended: a cut stream is not stored
            self.router.metrics.cache_not_stored.labels("truncated").inc()
            self.capture = self.pending = None

    # --- response path (only when Envoy sends it to the routing stream) -----------------------

    def _response_headers(self, message: pb.ProcessingRequest) -> pb.ProcessingResponse:
        routed = self.routed
        if routed is None:
            return protocol.CONTINUE_RESPONSE_HEADERS
        # The upstream status is counted once, from Envoy's access log (accesslog.py).
        added = {h.ROUTER_MODEL: routed.model or PASSTHROUGH, h.ROUTER_DECISION: routed.decision}
        if routed.explanation is not None:
            added[h.ROUTER_EXPLAIN] = protocol.compact_json(routed.explanation)
        return protocol.response_headers_response(added)


def _domain(routed: Routed) -> str:
    topic = routed.signals.topic if routed.signals else None
    return topic.domain if topic else "none"


def _api(path: str) -> str:
    api = api_for_path(path)
    return api.value if api else "other"


async def _notices(exchange: Exchange, handling: asyncio.Future) -> AsyncIterator[pb.ProcessingResponse]:
    """What the exchange asks to send while its message is handled."""
    while not handling.done():
        notice = asyncio.ensure_future(exchange.notices.get())
        done, _ = await asyncio.wait({handling, notice}, return_when=asyncio.FIRST_COMPLETED)
        if notice in done:
            yield notice.result()
        else:
            notice.cancel()
    while not exchange.notices.empty():
        exchange.notices.get_nowait()  # too late: the answer itself is ready


def add_to_server(router: Router, server: grpc.aio.Server) -> None:
    """Serve ExternalProcessor.Process on server, reading each message with
    protocol.parse_request (which survives header values that are not UTF-8)."""
    handler = grpc.stream_stream_rpc_method_handler(
        ExternalProcessor(router).Process,
        request_deserializer=protocol.parse_request,
        response_serializer=pb.ProcessingResponse.SerializeToString,
    )
    service, handlers = "envoy.service.ext_proc.v3.ExternalProcessor", {"Process": handler}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    def _may_answer_early(self, message: pb.ProcessingRequest) -> bool:
        """The message's handling may send override_message_timeout before its answer: it may
        queue for a replica, or it carries a large body (then handled concurrently with the
        notices it sends)."""
        kind = message.WhichOneof("request")
        if kind == "request_body":
            return self.router.may_queue or len(message.request_body.body) > LARGE_BODY_BYTES
        return kind == "request_headers" and self.router.may_queue

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        exchange = Exchange(self.router)
        try:
            async for message in request_iterator:
                try:
                    if self._may_answer_early(message):
                        handling = asyncio.ensure_future(exchange.handle(message))
                        try:
                            async for notice in _notices(exchange, handling):
                                yield notice
                        finally:
                            if not handling.done():
                                handling.cancel()  # the stream ended while the request waited
                        response = handling.result()
                    else:
                        response = await exchange.handle(message)
                except Exception as exc:
                    # A bug must not become a hung or dropped request: answer with a clear error.
                    kind = message.WhichOneof("request")
                    log.exception("ext_proc stream failed on a %s message", kind)
                    self.router.metrics.stream_errors.labels(type(exc).__name__).inc()
                    if message.observability_mode or kind not in ("request_headers", "request_body"):
                        return  # a clean close lets Envoy carry on without us on the response path
                    response = protocol.immediate(errors.RouterError("the router failed on this request"))
                if response is not None:
                    yield response
        finally:
            exchange.close()
