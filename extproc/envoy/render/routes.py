"""The client listener's route configuration (RDS): what Envoy refuses itself (CONNECT, other
methods on LLM paths, bodiless calls, near misses of the LLM paths), one route per routed
cluster matched on the router's decision, the forwarded non-LLM paths, and a JSON 404 for
everything else (README "Paths")."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from extproc import headers as h
from extproc.envoy.names import LISTENER
from extproc.envoy.options import EnvoyOptions
from extproc.envoy.render.chains import chain_route
from extproc.envoy.render.filters import CACHE_MIRROR, CACHE_MIRROR_MODE
from extproc.errors import openai_error
from extproc.request import API_PATHS, UNKNOWN_PATH_MESSAGE


def _json_error(status: int, message: str, kind: str, code: str) -> dict[str, Any]:
    return {
        "status": status,
        "body": {"inline_string": orjson.dumps(openai_error(message, kind, code)).decode()},
    }


_DISABLED = {
    "envoy.filters.http.ext_proc": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
        "disabled": True,
    },
    "envoy.filters.http.buffer": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.BufferPerRoute",
        "disabled": True,
    },
}


def route_config(
    o: EnvoyOptions,
    routed_clusters: Mapping[str, None],
    retries: Mapping[str, tuple[str, int]],
    default_cluster: str | None,
    hashed: set[str],
    cache: bool = False,
    chains: Sequence[tuple[str, float | None, str]] = (),
) -> dict[str, Any]:
    """The client listener's routes (RDS): the refusals Envoy answers itself, one route per
    routed cluster (matched on the router's ``extproc.cluster`` metadata), forward_paths, and a
    JSON 404 for everything else."""
    llm_paths = sorted(API_PATHS)
    path_regex = "^(" + "|".join(p.replace("/", "\\/") for p in llm_paths) + r")(\?.*)?$"
    routes: list[dict[str, Any]] = [
        {
            # CONNECT carries no path, so no other route matches it, and unanswered it held a
            # stream open until the idle timeout. Matched here, Envoy refuses it at once (403:
            # CONNECT is not an enabled upgrade).
            "name": "connect",
            "match": {"connect_matcher": {}},
            "direct_response": _json_error(
                405, "CONNECT is not supported", "invalid_request_error", "method_not_allowed"
            ),
            "typed_per_filter_config": _DISABLED,
        },
        {
            "name": "llm-method-not-allowed",
            "match": {
                "safe_regex": {"regex": path_regex},
                "headers": [{"name": ":method", "string_match": {"exact": "POST"}, "invert_match": True}],
            },
            "direct_response": _json_error(
                405, "LLM API paths only accept POST", "invalid_request_error", "method_not_allowed"
            ),
            "typed_per_filter_config": _DISABLED,
        },
    ]
    for key, per_try_timeout, fallback_cluster in chains:
        # Requests the router gave several backends (extproc/envoy/render/chains.py); a cache
        # miss among them has its answer stored as on a model's own route.
        chained = chain_route(key, per_try_timeout, fallback_cluster, path_regex, o)
        if cache:
            routes.append(_cache_store_route(chained))
        routes.append(chained)
    for cluster in routed_clusters:
        # idle_timeout: a model may think for minutes before its first byte; the connection
        # manager's shorter stream_idle_timeout would cut that answer after the replica's work.
        route: dict[str, Any] = {"cluster": cluster, "timeout": o.upstream_timeout, "idle_timeout": o.upstream_timeout}
        retry_on, attempts = retries.get(cluster, ("connect-failure,refused-stream,reset", 1))
        if attempts:
            route["retry_policy"] = {"retry_on": retry_on, "num_retries": attempts}
            if cluster in hashed:
                # Step along the ring to a host not tried yet; each step lands on an adjacent ring
                # entry, which may be the same host again, so allow several.
                route["retry_policy"]["retry_host_predicate"] = [
                    {
                        "name": "envoy.retry_host_predicates.previous_hosts",
                        "typed_config": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                        },
                    }
                ]
                route["retry_policy"]["host_selection_retry_max_attempts"] = 10
        entry: dict[str, Any] = {
            "name": f"llm-{cluster}",
            "match": {
                "safe_regex": {"regex": path_regex},
                "dynamic_metadata": [
                    {
                        "filter": h.METADATA_NAMESPACE,
                        "path": [{"key": h.KEY_CLUSTER}],
                        "value": {"string_match": {"exact": cluster}},
                    }
                ],
            },
            "route": route,
            "per_request_buffer_limit_bytes": o.max_response_bytes,
        }
        if cluster in hashed:
            # The ring hash reads the router's affinity key; the header is added before hashing.
            route["hash_policy"] = [{"header": {"header_name": h.AFFINITY_KEY}}]
            entry["request_headers_to_add"] = [
                {
                    "header": {
                        "key": h.AFFINITY_KEY,
                        "value": f"%DYNAMIC_METADATA({h.METADATA_NAMESPACE}:{h.KEY_AFFINITY})%",
                    },
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ]
        if cache:
            routes.append(_cache_store_route(entry))
        routes.append(entry)
    routes.append(
        {
            # Reached only when the router made no decision: Envoy skips ext_proc for a POST
            # without a body, so the client gets the same error the router would have sent.
            "name": "llm-no-decision",
            "match": {"safe_regex": {"regex": path_regex}},
            "direct_response": _json_error(
                400,
                "request body is empty; send a JSON object with a 'model' field",
                "invalid_request_error",
                "invalid_request",
            ),
        }
    )
    routes.append(
        {
            # Paths that only resemble an LLM path once Envoy has normalised them (any case, a
            # trailing slash or anything after it, ;params, escapes Envoy keeps): some servers
            # would serve them as the LLM call, so none is forwarded.
            "name": "llm-path-variant",
            "match": {"safe_regex": {"regex": lookalike_regex(llm_paths)}},
            "direct_response": _json_error(404, UNKNOWN_PATH_MESSAGE, "invalid_request_error", "unknown_path"),
            "typed_per_filter_config": _DISABLED,
        }
    )
    if default_cluster is not None:
        for path in o.forward_paths:
            routes.append(
                {
                    "name": f"forward {path}",
                    "match": {"path": path},
                    "route": {"cluster": default_cluster, "timeout": o.upstream_timeout},
                    "typed_per_filter_config": _DISABLED,
                }
            )
    routes.append(
        {
            # Everything else: never forwarded, so no model-server endpoint is reachable past
            # the router unless forward_paths names it.
            "name": "other",
            "match": {"prefix": "/"},
            "direct_response": _json_error(404, "not found", "invalid_request_error", "not_found"),
            "typed_per_filter_config": _DISABLED,
        }
    )
    from_metadata = f"%DYNAMIC_METADATA({h.METADATA_NAMESPACE}:{{}})%"
    host: dict[str, Any] = {}
    if chains:
        # Each attempt's upstream filter reads which attempt it is (the body's model of that backend).
        host["include_request_attempt_count"] = True
    return {
        "name": LISTENER,
        "virtual_hosts": [
            {
                "name": LISTENER,
                "domains": ["*"],
                **host,
                "routes": routes,
                "request_headers_to_add": [
                    {
                        "header": {"key": h.SELECTED_MODEL, "value": from_metadata.format(h.KEY_UPSTREAM_MODEL)},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    },
                ],
                "response_headers_to_add": [
                    {
                        "header": {"key": h.ROUTER_MODEL, "value": from_metadata.format(h.KEY_MODEL)},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    },
                    {
                        "header": {"key": h.ROUTER_DECISION, "value": from_metadata.format(h.KEY_DECISION)},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    },
                    {
                        "header": {"key": h.ROUTER_EXPLAIN, "value": from_metadata.format(h.KEY_EXPLAIN)},
                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                    },
                    *(
                        [
                            {
                                "header": {"key": h.CACHE, "value": from_metadata.format(h.KEY_CACHE)},
                                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                            }
                        ]
                        if cache
                        else []
                    ),
                ],
            }
        ],
    }


def _cache_store_route(entry: dict[str, Any]) -> dict[str, Any]:
    """The cluster's route for a miss whose response may be stored (the router set its token):
    the same route, with the cache mirror turned on (filters.py)."""
    match = dict(entry["match"])
    match["dynamic_metadata"] = [
        *match["dynamic_metadata"],
        {
            "filter": h.METADATA_NAMESPACE,
            "path": [{"key": h.KEY_CACHE_STORE}],
            "value": {"present_match": True},
        },
    ]
    mirror = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
        "overrides": {"processing_mode": CACHE_MIRROR_MODE},
    }
    return {
        **entry,
        "name": f"{entry['name']}-cache-store",
        "match": match,
        "typed_per_filter_config": {**entry.get("typed_per_filter_config", {}), CACHE_MIRROR: mirror},
    }


def lookalike_regex(llm_paths: Sequence[str]) -> str:
    """RE2 (Envoy's safe_regex, matched against the whole normalised path without its query):
    an LLM path in any case, with anything after it."""
    return "(?i)(" + "|".join(re.escape(p) for p in llm_paths) + ").*"
