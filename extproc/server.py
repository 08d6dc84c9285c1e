"""The ext_proc gRPC stream: one small state machine per HTTP request. No routing logic here.

Envoy can run the router two ways, and the same stream handler serves both:

* one round trip (deploy/envoy/envoy.yaml): request headers are skipped, path, method and the
  headers the policy reads arrive as attributes on the single buffered body message, and the
  decision goes back as dynamic metadata that Envoy's routes and load balancers read;
* two round trips (any Envoy setup that sends request headers): the decision also goes back as
  header mutations (cluster header, x-selected-model, x-gateway-destination-endpoint).

A second ext_proc filter in observability mode (responses ignored by Envoy) opens a stream
that lives exactly as long as the HTTP request: it carries the replica lease to its release,
the upstream status, and (when enabled) the usage of the response.
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
from extproc.logs import log_decision
from extproc.replicas.load import Lease
from extproc.request import api_for_path
from extproc.router import Call, Routed, Router
from extproc.usage import UsageMeter

log = logging.getLogger("extproc.server")

BUFFERED_PARTIAL = processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL


class Exchange:
    """The state of one HTTP request as seen on one ext_proc stream."""

    __slots__ = (
        "body_mode",
        "headers",
        "lease",
        "method",
        "model",
        "observer",
        "path",
        "request_id",
        "routed",
        "router",
        "saw_response",
        "skip",
        "usage",
    )

    def __init__(self, router: Router) -> None:
        self.router = router
        self.method = ""
        self.path = ""
        self.request_id = ""
        self.headers: dict[str, str] = {}
        self.routed: Routed | None = None
        self.lease: Lease | None = None
        self.observer = False  # this stream is the observability filter's
        self.model = ""
        self.skip = False  # not an LLM call: let everything through untouched
        self.saw_response = False
        self.body_mode = 0
        self.usage: UsageMeter | None = None

    async def handle(self, message: pb.ProcessingRequest) -> pb.ProcessingResponse | None:
        kind = message.WhichOneof("request")
        if message.observability_mode:
            self._observe(message, kind)
            return None
        if message.HasField("protocol_config"):
            self.body_mode = message.protocol_config.request_body_mode
        if kind == "request_headers":
            return self._request_headers(message)
        if kind == "request_body":
            return await self._request_body(message)
        if kind == "response_headers":
            self.saw_response = True
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
        headers = protocol.header_map(message.request_headers.headers)
        self.method = headers.get(":method", "")
        self.path = headers.get(":path", "")
        self.request_id = headers.get(h.REQUEST_ID, "")
        self.headers = headers
        if api_for_path(self.path) is None:
            self.skip = True
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
            if api_for_path(self.path) is None:
                self.skip = True
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
        )
        try:
            routed = await self.router.route(call)
        except errors.RouterError as error:
            return self._fail(error)
        self.routed = routed
        self.lease = routed.lease
        self.router.metrics.requests.labels(routed.model or "passthrough", routed.decision, _domain(routed), "ok").inc()
        self._record_stages(routed)
        log_decision(self.request_id, _api(self.path), routed, 200, None)
        return self._mutations(routed)

    def _mutations(self, routed: Routed) -> pb.ProcessingResponse:
        policy = self.router.state.policy
        set_headers = {
            policy.headers.cluster: routed.cluster,
            h.DECISION: routed.decision,
        }
        if protocol.safe_header_value(routed.upstream_model):
            set_headers[h.SELECTED_MODEL] = routed.upstream_model
        remove = [h.DESTINATION_ENDPOINT, h.AFFINITY_KEY]
        meta = {
            "cluster": routed.cluster,
            "model": routed.model or "passthrough",
            "decision": routed.decision,
        }
        if h.SELECTED_MODEL in set_headers:
            meta["upstream_model"] = routed.upstream_model
        if routed.endpoints:
            listed = ",".join(routed.endpoints) if routed.envoy_lb == "override_host" else routed.endpoints[0]
            set_headers[h.DESTINATION_ENDPOINT] = listed
            remove.remove(h.DESTINATION_ENDPOINT)
            meta["endpoint"] = routed.endpoints[0]
        if routed.affinity_key:
            set_headers[h.AFFINITY_KEY] = routed.affinity_key
            remove.remove(h.AFFINITY_KEY)
            meta["affinity"] = routed.affinity_key
        if routed.lease is not None:
            meta["lease"] = str(routed.lease.id)
        if routed.explanation is not None:
            meta["explain"] = protocol.compact_json(routed.explanation)
        if routed.body is not None:
            set_headers[h.CONTENT_LENGTH] = str(len(routed.body))
        dynamic = {h.METADATA_NAMESPACE: meta}
        if routed.endpoints:
            dynamic[h.LB_NAMESPACE] = {h.DESTINATION_ENDPOINT: set_headers[h.DESTINATION_ENDPOINT]}
        return protocol.body_response(protocol.mutation(set_headers, remove), routed.body, dynamic)

    def _fail(self, error: errors.RouterError) -> pb.ProcessingResponse:
        self.skip = True
        self.router.metrics.requests.labels("none", "none", "none", str(error.status)).inc()
        log_decision(self.request_id, _api(self.path), None, error.status, error.code)
        return protocol.immediate(error)

    def _record_stages(self, routed: Routed) -> None:
        observe = self.router.metrics.stage_seconds.labels
        for stage, seconds in routed.stages.items():
            observe(stage).observe(seconds)

    # --- response path (only when Envoy sends it to the routing stream) -----------------------

    def _response_headers(self, message: pb.ProcessingRequest) -> pb.ProcessingResponse:
        routed = self.routed
        if routed is None:
            return protocol.CONTINUE_RESPONSE_HEADERS
        status = protocol.header_map(message.response_headers.headers).get(":status", "")
        self._count_upstream(routed.model or "passthrough", status)
        added = {h.ROUTER_MODEL: routed.model or "passthrough", h.ROUTER_DECISION: routed.decision}
        if routed.explanation is not None:
            added[h.ROUTER_EXPLAIN] = protocol.compact_json(routed.explanation)
        return protocol.response_headers_response(added)

    # --- observability stream ----------------------------------------------------------------

    def _observe(self, message: pb.ProcessingRequest, kind: str | None) -> None:
        if not self.observer:
            self.observer = True
            meta = protocol.metadata(message, h.METADATA_NAMESPACE)
            self.model = meta.get("model", "")
            lease_id = meta.get("lease")
            if lease_id and lease_id.isdigit():
                self.lease = self.router.tracker.claim(int(lease_id))
            if self.model and self.router.usage_enabled:
                self.usage = UsageMeter()
        if not self.model:
            return
        if kind == "response_headers":
            status = protocol.header_map(message.response_headers.headers).get(":status", "")
            self._count_upstream(self.model, status)
            if self.usage is not None and not status.startswith("2"):
                self.usage = None
            if message.response_headers.end_of_stream:
                self._finish()
        elif kind == "response_body":
            if self.usage is not None:
                self.usage.feed(message.response_body.body)
            if message.response_body.end_of_stream:
                self._finish()
        elif kind == "response_trailers":
            self._finish()

    def _finish(self) -> None:
        """The response is complete: release the replica and account its usage, now rather than
        when Envoy gets round to closing the observability stream."""
        if self.lease is not None:
            self.router.tracker.release(self.lease)
        if self.usage is not None:
            self.router.record_usage(self.model, self.usage)
            self.usage = None

    def _count_upstream(self, model: str, status: str) -> None:
        code = f"{status[0]}xx" if status[:1].isdigit() else "unknown"
        self.router.metrics.upstream.labels(model, code).inc()

    # --- end of stream -----------------------------------------------------------------------

    def close(self) -> None:
        lease = self.lease
        if self.observer:
            # A cancelled request never sees its response end; the stream closing is its end.
            if lease is not None:
                self.router.tracker.release(lease)
        elif lease is not None:
            if self.saw_response:  # Envoy kept this stream for the whole request
                self.router.tracker.release(lease)
            else:
                self.router.tracker.release_unclaimed(lease)


def _domain(routed: Routed) -> str:
    topic = routed.signals.topic if routed.signals else None
    return topic.domain if topic else "none"


def _api(path: str) -> str:
    api = api_for_path(path)
    return api.value if api else "other"


class ExternalProcessor(pb_grpc.ExternalProcessorServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        exchange = Exchange(self.router)
        try:
            async for message in request_iterator:
                try:
                    response = await exchange.handle(message)
                except Exception as exc:
                    # A bug must not become a hung or dropped request: answer with a clear 500.
                    log.exception("ext_proc stream failed on a %s message", message.WhichOneof("request"))
                    self.router.metrics.stream_errors.labels(type(exc).__name__).inc()
                    if message.observability_mode or message.WhichOneof("request") not in (
                        "request_headers",
                        "request_body",
                    ):
                        return
                    response = protocol.immediate(errors.RouterError("the router failed on this request"))
                if response is not None:
                    yield response
        except asyncio.CancelledError:
            raise
        finally:
            exchange.close()
