"""Envoy's gRPC access log, received: the end of every routed request.

Each entry carries the request's dynamic metadata (the router's decision and replica lease, and
the token usage Envoy read from the response), its status and timing, and how the upstream
exchange went. The router ends the lease, counts the upstream status, accounts tokens and cost,
and tells outlier detection how each replica it picked fared. Envoy never waits for this stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from extproc import headers as h
from extproc._pb.envoy.data.accesslog.v3 import accesslog_pb2
from extproc._pb.envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from extproc.replicas.health import Outcome
from extproc.router import Router

log = logging.getLogger("extproc.accesslog")

# The request got no answer from the replica (UF, UC, UR, UT): Envoy's local-origin errors.
_LOCAL_ORIGIN_FLAGS = (
    "upstream_connection_failure",
    "upstream_connection_termination",
    "upstream_remote_reset",
    "upstream_request_timeout",
)


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
    lease = fields.get(h.KEY_LEASE)
    if lease is not None and lease.string_value.isdigit():
        router.tracker.release_id(int(lease.string_value))
    model = fields[h.KEY_MODEL].string_value if h.KEY_MODEL in fields else ""
    if not model:
        return
    code = entry.response.response_code.value if entry.response.HasField("response_code") else 0
    # The one count of upstream statuses; "none": the request ended with no response (reset, client gone).
    router.metrics.upstream.labels(model, f"{code // 100}xx" if code else "none").inc()
    if h.KEY_ENDPOINT in fields:  # the router picked the replica (not Envoy's own balancing)
        lb = metadata.get(h.LB_NAMESPACE)
        listed = lb.fields[h.DESTINATION_ENDPOINT].string_value if lb and h.DESTINATION_ENDPOINT in lb.fields else ""
        outcomes = upstream_outcomes(entry, listed.split(",") if listed else [fields[h.KEY_ENDPOINT].string_value])
        if outcomes:
            router.observe_upstream(model, outcomes)
    usage = metadata.get(h.USAGE_NAMESPACE)
    if usage is not None and 200 <= code < 300:
        tokens = usage.fields
        input_tokens = int(tokens[h.KEY_INPUT_TOKENS].number_value) if h.KEY_INPUT_TOKENS in tokens else 0
        output_tokens = int(tokens[h.KEY_OUTPUT_TOKENS].number_value) if h.KEY_OUTPUT_TOKENS in tokens else 0
        router.record_usage(model, input_tokens, output_tokens)


def upstream_outcomes(entry: accesslog_pb2.HTTPAccessLogEntry, listed: list[str]) -> list[tuple[str, Outcome]]:
    """How the request fared on each replica Envoy tried, from the replicas the router listed
    (the pick, then the fallbacks Envoy's retries walk). The entry names only the last attempt's
    host; the attempts before it were retried, which the routes do only on connect failures and
    resets, so they failed that way. A request that ended with no upstream verdict (the client
    left first, or no attempt was made) says nothing."""
    common = entry.common_properties
    attempts = common.upstream_request_attempt_count
    if attempts == 0:
        return []
    address = common.upstream_remote_address.socket_address
    host = (f"[{address.address}]" if ":" in address.address else address.address) + f":{address.port_value}"
    if host not in listed:
        host = listed[0] if attempts == 1 else host  # a name resolved by Envoy, or the fallback policy's pick
    flags = common.response_flags
    if common.upstream_transport_failure_reason or any(getattr(flags, f) for f in _LOCAL_ORIGIN_FLAGS):
        last: Outcome | None = Outcome.LOCAL_ORIGIN_FAILURE
    elif entry.response.response_code_details == "via_upstream":
        last = Outcome.ERROR_5XX if entry.response.response_code.value >= 500 else Outcome.SUCCESS
    else:
        last = None
    earlier = listed[: listed.index(host)] if host in listed else listed
    outcomes = [(e, Outcome.LOCAL_ORIGIN_FAILURE) for e in earlier[: attempts - 1]]
    if last is not None:
        outcomes.append((host, last))
    return outcomes


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
