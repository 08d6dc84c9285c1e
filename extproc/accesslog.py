"""Envoy's gRPC access log, received: the end of every routed request.

Each entry carries the request's dynamic metadata (the router's decision and replica lease, and
the token usage Envoy read from the response), its status and timing, and how the upstream
exchange went. The router ends the lease, counts the upstream status, accounts tokens and cost,
and tells outlier detection how each replica it picked fared. Envoy also sends an entry for each
of its own local replies, routed or not (the router unreachable, a codec refusal, an upstream
timeout), which is counted by the code its client got. Envoy never waits for this stream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from extproc import cooldown
from extproc import headers as h
from extproc._pb.envoy.data.accesslog.v3 import accesslog_pb2
from extproc._pb.envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from extproc.envoy.render.filters import ATTEMPT_LOG
from extproc.envoy.render.local_replies import classify
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
        local_reply(router, entry)
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
    local_reply(router, entry)  # Envoy answered for the replica: a timeout, no connection
    tries = common.upstream_request_attempt_count
    answered = model  # the model whose backend answered: a fallback model's, after a chain moved on
    if h.KEY_CHAIN in fields:
        answered = _chain_finished(router, entry, model, tries, code) or model
    if h.KEY_ENDPOINT in fields and (tries <= 1 or h.KEY_CHAIN not in fields):
        # The router picked the replica (not Envoy's own balancing). A chained request that went
        # on to other backends: its first attempt's outcome came in its own entry (attempted).
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
        router.record_usage(answered, input_tokens, output_tokens)


_RETRIABLE = ("rate_limited", "5xx", "timeout", "connect_failure", "reset")


def attempt_result(entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
    """How one upstream attempt went: success, 4xx, rate_limited, 5xx, timeout, connect_failure,
    reset, or none (no verdict: the client left, or the attempt was cancelled)."""
    common = entry.common_properties
    flags = common.response_flags
    code = entry.response.response_code.value if entry.response.HasField("response_code") else 0
    if flags.upstream_request_timeout:
        return "timeout"
    if flags.upstream_connection_failure or common.upstream_transport_failure_reason:
        return "connect_failure"
    if code == 0 and (flags.upstream_remote_reset or flags.upstream_connection_termination or flags.local_reset):
        return "reset"
    if code == 429:
        return "rate_limited"
    if code >= 500:
        return "5xx"
    if 400 <= code < 500:
        return "4xx"
    return "success" if code else "none"


def attempted(router: Router, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
    """One upstream attempt of a chained request (the router filter's upstream log): the attempt
    metrics, the backend's cooldown or ejection, the first attempt's replica's health."""
    plan = router.recent_plans.get(entry.request.request_id)
    if plan is None:
        return  # not a chained request (a plain request's failure), or too old
    try:
        n = int(entry.request.request_headers.get("x-envoy-attempt-count") or 1)
    except ValueError:
        return
    if not 1 <= n <= len(plan.attempts):
        return
    attempt = plan.attempts[n - 1]
    result = attempt_result(entry)
    router.metrics.count_attempt(attempt.model, attempt.label, result)
    if result in _RETRIABLE and n < len(plan.attempts):
        router.metrics.fallbacks.labels(attempt.model, result).inc()
    if attempt.hosted:
        outcome = {
            "success": cooldown.Outcome.SUCCESS,
            "4xx": cooldown.Outcome.SUCCESS,  # the backend answered; the request was at fault
            "rate_limited": cooldown.Outcome.RATE_LIMITED,
        }.get(result, cooldown.Outcome.FAILURE)
        if result != "none":
            router.backends.observe(attempt.backend, outcome, entry.response.response_headers)
    elif n == 1 and result != "none":
        address = entry.common_properties.upstream_remote_address.socket_address
        host = (f"[{address.address}]" if ":" in address.address else address.address) + f":{address.port_value}"
        replica = {"success": Outcome.SUCCESS, "4xx": Outcome.SUCCESS, "rate_limited": Outcome.SUCCESS}.get(
            result, Outcome.ERROR_5XX if result == "5xx" else Outcome.LOCAL_ORIGIN_FAILURE
        )
        if address.address and host in router.state.pools.endpoints(attempt.model):
            router.observe_upstream(attempt.model, [(host, replica)])


def _chain_finished(
    router: Router, entry: accesslog_pb2.HTTPAccessLogEntry, model: str, tries: int, code: int
) -> str | None:
    """A chained request ended: how many backends it took; a success resets its backend's
    failures (first attempts that succeed are not in the attempt log). Returns the model whose
    backend answered, if it did."""
    if tries:
        router.metrics.observe_chain_attempts(model, tries)
    plan = router.recent_plans.get(entry.request.request_id)
    if plan is None or not 1 <= tries <= len(plan.attempts) or not 200 <= code < 300:
        return None
    attempt = plan.attempts[tries - 1]
    if tries == 1:
        router.metrics.count_attempt(attempt.model, attempt.label, "success")
    if attempt.hosted:
        router.backends.observe(attempt.backend, cooldown.Outcome.SUCCESS)
    return attempt.model


def local_reply(router: Router, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
    """Count a reply of Envoy's own (not a replica's, not the router's), by the status and code
    the client got: Envoy's access log sends every routed request and every local reply."""
    response = entry.response
    status = response.response_code.value if response.HasField("response_code") else 0
    reply = classify(status, response.response_code_details)
    if reply is not None:
        router.metrics.count_local_reply(status, reply.code)


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
        account = finished
        async for message in request_iterator:
            if message.HasField("identifier"):  # the first message of a stream names its log
                account = attempted if message.identifier.log_name == ATTEMPT_LOG else finished
            for entry in message.http_logs.log_entry:
                try:
                    account(self.router, entry)
                except Exception:  # one odd entry must not end the stream for the others
                    self.router.metrics.stream_errors.labels("access_log").inc()
                    log.exception("could not account an access log entry")
        return als_pb2.StreamAccessLogsResponse()
