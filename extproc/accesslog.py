"""Envoy's gRPC access log, received: the end of every routed request.

Each entry carries the request's dynamic metadata (the router's decision and replica lease, and
the token usage Envoy read from the response), its status and timing. The router ends the lease,
counts the upstream status and accounts tokens and cost. Envoy never waits for this stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from extproc import headers as h
from extproc._pb.envoy.data.accesslog.v3 import accesslog_pb2
from extproc._pb.envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from extproc.router import Router

log = logging.getLogger("extproc.accesslog")

USAGE_NAMESPACE = "extproc.usage"


def finished(router: Router, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
    """Account one finished request."""
    common = entry.common_properties
    if common.intermediate_log_entry:
        return
    metadata = common.metadata.filter_metadata
    decision = metadata.get(h.METADATA_NAMESPACE)
    if decision is None:
        return
    fields = decision.fields
    lease = fields.get("lease")
    if lease is not None and lease.string_value.isdigit():
        router.tracker.release_id(int(lease.string_value))
    model = fields["model"].string_value if "model" in fields else ""
    if not model:
        return
    code = entry.response.response_code.value if entry.response.HasField("response_code") else 0
    router.metrics.upstream.labels(model, f"{code // 100}xx" if code else "none").inc()
    usage = metadata.get(USAGE_NAMESPACE)
    if usage is not None and 200 <= code < 300:
        tokens = usage.fields
        input_tokens = int(tokens["input"].number_value) if "input" in tokens else 0
        output_tokens = int(tokens["output"].number_value) if "output" in tokens else 0
        router.record_usage(model, input_tokens, output_tokens)


class AccessLogSink(als_pb2_grpc.AccessLogServiceServicer):
    def __init__(self, router: Router) -> None:
        self.router = router

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: grpc.aio.ServicerContext
    ) -> als_pb2.StreamAccessLogsResponse:
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                try:
                    finished(self.router, entry)
                except Exception:  # one odd entry must not end the stream for the others
                    self.router.metrics.stream_errors.labels("access_log").inc()
                    log.exception("could not account an access log entry")
        return als_pb2.StreamAccessLogsResponse()
