"""The client listener's HTTP filters and access log: ext_proc (the routing call, body buffered,
fail closed) and the buffer that holds the request until its answer is in; json_to_metadata and
sse_to_metadata, which read token usage from responses into metadata; and the gRPC access log
that brings each finished request back to the sidecar."""

from __future__ import annotations

from typing import Any

from extproc import headers as h
from extproc.envoy.names import EXT_PROC_CLUSTER
from extproc.envoy.options import EnvoyOptions
from extproc.envoy.render.chains import CHAIN_NAMESPACE
from extproc.envoy.render.local_replies import ALREADY_JSON
from extproc.policy.config import Policy


def ext_proc_filters(policy: Policy, o: EnvoyOptions) -> list[dict[str, Any]]:
    ext_proc_type = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
    grpc_service = {"envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER}, "timeout": o.max_message_timeout}
    headers_to_read = sorted(
        {
            *o.forward_headers,
            policy.headers.session,
            policy.headers.user,
            h.CONTENT_TYPE,
            h.CONTENT_ENCODING,
            h.DEBUG,
            *([policy.cache.tenant_header] if policy.cache.tenant_header else []),
        }
    )
    routing: dict[str, Any] = {
        "@type": ext_proc_type,
        "grpc_service": grpc_service,
        "failure_mode_allow": False,  # an unrouted request cannot be served correctly: fail closed
        "status_on_error": {"code": 503},
        "message_timeout": o.message_timeout,
        "max_message_timeout": o.max_message_timeout,
        "allow_mode_override": False,
        "processing_mode": {
            "request_header_mode": "SEND" if o.two_round_trips else "SKIP",
            "response_header_mode": "SKIP",
            "request_body_mode": "BUFFERED",
            "response_body_mode": "NONE",
        },
        "metadata_options": {"receiving_namespaces": {"untyped": [h.METADATA_NAMESPACE, h.LB_NAMESPACE]}},
    }
    # The chain pieces of the listener (this namespace, the attempt log) are there for every
    # policy, so that a policy starting to chain changes clusters and routes only, never the listener.
    routing["metadata_options"]["receiving_namespaces"]["untyped"].append(CHAIN_NAMESPACE)
    if not o.two_round_trips:
        routing["request_attributes"] = [
            "request.path",
            "request.method",
            "request.id",
            *(f"request.headers['{name}']" for name in headers_to_read),
        ]
    filters = [
        {"name": "envoy.filters.http.ext_proc", "typed_config": routing},
        {
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": o.max_request_bytes,
            },
        },
    ]
    if o.usage:
        filters += _usage_filters()
    filters.append(cache_mirror_filter())
    return filters


CACHE_MIRROR = "extproc.cache_mirror"
# What the cache mirror sends on a route that may store (routes.py): the response as it passes,
# never waited for (observability_mode), so the client's stream is not delayed or buffered.
CACHE_MIRROR_MODE = {
    "request_header_mode": "SKIP",
    "response_header_mode": "SEND",
    "request_body_mode": "NONE",
    "response_body_mode": "STREAMED",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SEND",
}


def cache_mirror_filter() -> dict[str, Any]:
    """A second ext_proc filter, inert on every route but the cache-store ones (routes.py), where
    it mirrors a miss's response to the sidecar to be stored. Observability mode: Envoy sends
    each chunk and moves on, so the client sees the response exactly as without it. (Envoy
    honours a server's mode_override only in answers to header messages, and the routing call
    answers the body, so a per-route override is how the routing decision turns it on.) Always
    in the chain, so that a policy which starts caching changes routes only, not the listener."""
    return {
        "name": CACHE_MIRROR,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER}},
            "observability_mode": True,
            "stat_prefix": "cache_mirror",  # its streams counted apart from the routing call's
            "failure_mode_allow": True,  # the mirror failing never fails the request
            "processing_mode": {
                "request_header_mode": "SKIP",
                "response_header_mode": "SKIP",
                "request_body_mode": "NONE",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            # The routing call's metadata names the miss the response belongs to.
            "metadata_options": {"forwarding_namespaces": {"untyped": [h.METADATA_NAMESPACE]}},
        },
    }


def _usage_rules() -> list[dict[str, Any]]:
    """Token usage wherever the OpenAI-style APIs put it, into metadata namespace extproc.usage."""
    tokens_in, tokens_out = h.KEY_INPUT_TOKENS, h.KEY_OUTPUT_TOKENS

    def rule(path: tuple[str, ...], key: str) -> dict[str, Any]:
        return {
            "selectors": [{"key": part} for part in path],
            "on_present": {"metadata_namespace": h.USAGE_NAMESPACE, "key": key, "type": "NUMBER"},
        }

    return [
        rule(("usage", "prompt_tokens"), tokens_in),  # chat and completions
        rule(("usage", "completion_tokens"), tokens_out),
        rule(("usage", "input_tokens"), tokens_in),  # responses, non-streaming
        rule(("usage", "output_tokens"), tokens_out),
        rule(("response", "usage", "input_tokens"), tokens_in),  # responses, response.completed event
        rule(("response", "usage", "output_tokens"), tokens_out),
    ]


def _usage_filters() -> list[dict[str, Any]]:
    """Envoy reads usage from response bodies itself (C++, no copy to the sidecar): whole JSON
    responses with json_to_metadata, and the final events of SSE streams with sse_to_metadata,
    which passes every chunk through at once. The access log then carries it to the sidecar."""
    return [
        {
            "name": "envoy.filters.http.json_to_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
                "response_rules": {"rules": _usage_rules()},
            },
        },
        {
            "name": "envoy.filters.http.sse_to_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
                "response_rules": {
                    "content_parser": {
                        "name": "envoy.content_parsers.json",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.content_parsers.json.v3.JsonContentParser",
                            "rules": [{"rule": rule} for rule in _usage_rules()],
                        },
                    },
                    # response.completed events of the Responses API repeat the whole answer.
                    "max_event_size": 1048576,
                },
            },
        },
    ]


def access_log(o: EnvoyOptions) -> list[dict[str, Any]]:
    """One entry per finished routed request, batched to the sidecar over gRPC: it ends the
    replica lease (on every ending, resets included) and carries status and token usage. Also
    one per local reply of Envoy's own for a request the router never decided on (the router
    unreachable or too slow, a codec refusal), which the sidecar counts by the code sent."""
    routed = {
        "metadata_filter": {
            "matcher": {
                "filter": h.METADATA_NAMESPACE,
                "path": [{"key": h.KEY_MODEL}],
                "value": {"present_match": True},
            },
            "match_if_key_not_found": False,
        }
    }
    local_reply = {
        "extension_filter": {
            "name": "cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": f"response.code >= 100 && response.code_details != 'via_upstream' && !({ALREADY_JSON})",
            },
        }
    }
    return [
        {
            "name": "envoy.access_loggers.http_grpc",
            "filter": {"or_filter": {"filters": [routed, local_reply]}},
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                "common_config": {
                    "log_name": "extproc",
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER}},
                    "buffer_flush_interval": o.access_log_flush,
                    "buffer_size_bytes": 16384,
                },
            },
        }
    ]


ATTEMPT_LOG = "extproc-attempts"  # the log name of the router filter's per-attempt entries


def attempt_log(o: EnvoyOptions) -> list[dict[str, Any]]:
    """One entry per upstream attempt of a chained request (the router filter's upstream_log):
    its backend's status, Retry-After and failure flags, for cooldowns and the attempt metrics."""
    return [
        {
            "name": "envoy.access_loggers.http_grpc",
            # Upstream attempts carry none of the request's metadata: every attempt that failed
            # or was a retry is logged (a first attempt that succeeded shows in the request's
            # own entry), and the router finds the request's plan by its id.
            "filter": {
                "or_filter": {
                    "filters": [
                        {
                            "status_code_filter": {
                                "comparison": {
                                    "op": "GE",
                                    "value": {"default_value": 400, "runtime_key": "extproc.attempt_log_ge"},
                                }
                            }
                        },
                        {
                            "status_code_filter": {
                                "comparison": {
                                    "op": "LE",
                                    "value": {"default_value": 199, "runtime_key": "extproc.attempt_log_le"},
                                }
                            }
                        },
                        {
                            "header_filter": {
                                "header": {
                                    "name": "x-envoy-attempt-count",
                                    "string_match": {"exact": "1"},
                                    "invert_match": True,
                                }
                            }
                        },
                    ]
                }
            },
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
                "common_config": {
                    "log_name": ATTEMPT_LOG,
                    "transport_api_version": "V3",
                    "grpc_service": {"envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER}},
                    "buffer_flush_interval": o.access_log_flush,
                    "buffer_size_bytes": 16384,
                },
                "additional_request_headers_to_log": ["x-envoy-attempt-count"],
                "additional_response_headers_to_log": ["retry-after", "retry-after-ms"],
            },
        }
    ]
