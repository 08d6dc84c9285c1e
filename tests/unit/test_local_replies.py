"""Envoy's own replies: one table renders Envoy's local_reply_config mappers and classifies the
access-log entries of those replies, so the sidecar counts each under the code its client got."""

from __future__ import annotations

import pytest

from extproc._pb.envoy.data.accesslog.v3 import accesslog_pb2
from extproc.accesslog import finished
from extproc.envoy.render.local_replies import LOCAL_REPLIES, RETRY_AFTER_SECONDS, classify, local_reply_mappers
from extproc.errors import BadRequest, PiiCheckUnavailable, ServiceUnavailable
from extproc.protocol import immediate
from tests.unit.test_accounting import router, sample

# (status sent, Envoy's response code details) as Envoy 1.40 logs them -> the code the client got
SEEN = [
    (503, "ext_proc_error_gRPC_error_14{...}", "router_unavailable"),
    (503, "ext_proc_error_per-message_timeout_exceeded", "router_unavailable"),
    (504, "response_timeout", "upstream_timeout"),
    (503, "upstream_reset_before_response_started{remote_connection_failure}", "upstream_unavailable"),
    (503, "no_healthy_upstream", "upstream_unavailable"),
    (431, "http1.headers_too_large", "headers_too_large"),
    (413, "request_payload_too_large", "request_too_large"),
    (400, "path_normalization_failed", "invalid_path"),
    (400, "http1.codec_error", "malformed_request"),
    (400, "missing_host_header", "malformed_request"),
    (501, "http1.invalid_transfer_encoding", "unsupported_transfer_encoding"),
    (404, "route_not_found", "not_found"),
    (408, "request_overall_timeout", "request_timeout"),
    (408, "request_header_timeout", "request_timeout"),
    (502, "response_payload_too_large", "response_too_large"),
    (403, "rbac_access_denied", "invalid_request"),
]


@pytest.mark.parametrize(("status", "details", "code"), SEEN, ids=[d for _, d, _ in SEEN])
def test_an_envoy_reply_is_classified_under_the_code_its_mapper_sends(status: int, details: str, code: str) -> None:
    reply = classify(status, details)
    assert reply is not None and reply.code == code
    assert reply.status in (None, status)  # the status the mapper sends is the one logged


@pytest.mark.parametrize(
    ("status", "details"),
    [
        (200, "via_upstream"),
        (500, "via_upstream"),
        (503, "extproc_no_available_replica"),
        (404, "direct_response"),
        (0, ""),
        (200, ""),
    ],
)
def test_answers_that_are_not_envoys_own_replies_are_not_classified(status: int, details: str) -> None:
    assert classify(status, details) is None


def test_every_mapper_sends_openais_error_shape_with_param_null() -> None:
    mappers = local_reply_mappers()[1:]  # the first only fixes direct responses' content type
    assert len(mappers) == len(LOCAL_REPLIES)
    for mapper in mappers:
        error = mapper["body_format_override"]["json_format"]["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["param"] is None, error


def test_only_the_transient_503s_carry_retry_after_and_a_timeout_stays_504() -> None:
    hinted = {r.code for r in LOCAL_REPLIES if r.retry_after is not None}
    assert hinted == {"router_unavailable", "upstream_unavailable"}
    for reply in LOCAL_REPLIES:
        header = reply.mapper().get("headers_to_add")
        if reply.retry_after is None:
            assert header is None
        else:
            assert reply.status == 503 and header[0]["header"] == {
                "key": "retry-after",
                "value": str(RETRY_AFTER_SECONDS),
            }
    (timeout,) = [r for r in LOCAL_REPLIES if r.code == "upstream_timeout"]
    assert timeout.status == 504 and timeout.retry_after is None


def test_the_routers_retryable_errors_carry_retry_after_and_others_do_not() -> None:
    def retry_after(error) -> str | None:
        headers = immediate(error).immediate_response.headers.set_headers
        values = [h.header.raw_value.decode() for h in headers if h.header.key == "retry-after"]
        return values[0] if values else None

    assert retry_after(ServiceUnavailable("none ready")) == "5"
    assert retry_after(PiiCheckUnavailable("busy")) == "1"
    assert retry_after(BadRequest("no")) is None


def local_reply_entry(status: int, details: str, model: str | None = None) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    if model is not None:
        e.common_properties.metadata.filter_metadata["extproc"].update({"model": model})
    e.response.response_code.value = status
    e.response.response_code_details = details
    return e


def test_the_access_log_counts_envoys_replies_routed_or_not_and_nothing_else() -> None:
    r = router()
    finished(r, local_reply_entry(503, "ext_proc_error_per-message_timeout_exceeded"))  # never routed
    finished(r, local_reply_entry(504, "response_timeout", model="small"))  # routed, the replica too slow
    finished(r, local_reply_entry(200, "via_upstream", model="small"))
    finished(r, local_reply_entry(500, "via_upstream", model="small"))  # the replica's own 500
    finished(r, local_reply_entry(503, "extproc_no_available_replica"))  # the router's, counted by it
    name = "extproc_envoy_local_replies_total"
    assert sample(r, name, status="503", code="router_unavailable") == 1
    assert sample(r, name, status="504", code="upstream_timeout") == 1
    total = sum(
        s.value
        for m in r.metrics.registry.collect()
        if m.name == name.removesuffix("_total")
        for s in m.samples
        if s.name == name
    )
    assert total == 2
    assert sample(r, "extproc_upstream_responses_total", model="small", code="5xx") == 2
