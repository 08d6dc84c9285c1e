"""Fallback chains in Envoy: the clusters of hosted providers (TLS with SNI, the API key injected
from a secret Envoy reads itself), the upstream filters every cluster a chain may reach runs on
each attempt (the body's model, the path and the credentials of that attempt's backend), and
the chain routes, whose priority-group cluster specifier takes each request's list of backends
from the router's metadata and whose retry policy walks it (README "Fallback chains").

Why this shape, against Envoy 1.40's documentation and source:

* ``envoy.router.cluster_specifier_plugin.priority_group`` with ``override_metadata_namespace``
  picks the cluster of attempt N from the N-th group of a list in dynamic metadata, and the
  retry policy's ``refresh_cluster_on_retry`` re-runs it on every retry: a per-request chain
  (cooled-down backends left out) over clusters of different TLS, SNI, timeouts and limits.
* The router copies its buffered body into every attempt ("If we are doing a retry we need to
  make a copy", router.cc) and runs the attempt's cluster's upstream HTTP filters on it, sharing
  the downstream request headers: so each attempt can splice its model into the body (Lua),
  and every filter here sets the headers it owns from scratch (the previous attempt's stay).
* Envoy never retries once the response has started downstream (the per-try timeout is even
  ignored then, upstream_request.cc), so a stream that fails mid-way is never replayed.
* The key never enters a file the sidecar writes: ``credential_injector`` reads a generic
  secret over SDS from a file that names only the mounted key file (or an environment
  variable), and Envoy's config dump redacts SDS secrets.
"""

from __future__ import annotations

from typing import Any

import orjson

from extproc import headers as h
from extproc.envoy.options import EnvoyOptions, socket_address
from extproc.policy.backends import Provider
from extproc.policy.config import Policy

CHAIN_NAMESPACE = "extproc.chain"  # the priority groups of a request, as the cluster specifier reads them
ATTEMPT_NAMESPACE = "extproc.attempt"  # set by the upstream filters (no secret: whether a key was replaced)
ANSWERING = "backend"  # under ATTEMPT_NAMESPACE: the backend of a later attempt under way, for x-router-backend
KEPT_PATH = "path"  # under ATTEMPT_NAMESPACE: the client's path, once a provider's prefix replaced it
SDS_DIR = "sds"  # under the xDS directory: one file per provider key (a reference, never the key)
_CODEC = {
    "name": "envoy.filters.http.upstream_codec",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"},
}

# Run by every cluster a chain can reach, on every attempt, before its credentials filter.
# Values read from Envoy are copied into Lua locals before body(), which yields: handles taken
# before it are invalid after it.
_LUA = r"""
local PREFIX = %(prefix)s
local AUTH = "%(auth)s"

local function error_body(message, kind, code)
  return '{"error":{"message":"' .. message .. '","type":"' .. kind .. '","param":null,"code":"' .. code .. '"}}'
end

function envoy_on_request(h)
  local headers = h:headers()
  local info = h:streamInfo()
  local attempt = tonumber(headers:get("x-envoy-attempt-count")) or 1
  local previous = nil  -- what earlier attempts' filters left (never on the first attempt)
  if attempt > 1 then previous = info:dynamicMetadata():get("%(attempt_ns)s") end
  -- Attempts share the request headers: after one that replaced or stripped the client's
  -- Authorization, a backend that forwards it gets none (never the previous backend's key).
  if AUTH ~= "forward" then
    info:dynamicMetadata():set("%(attempt_ns)s", "authorization_replaced", true)
    if AUTH == "strip" then headers:remove("authorization") end
  elseif previous ~= nil and previous["authorization_replaced"] then
    headers:remove("authorization")
  end
  -- The client's path, kept by the first filter that rewrote it (a provider's prefix).
  local kept = previous ~= nil and previous["%(path)s"] or nil
  local path = kept or headers:get(":path")
  if PREFIX ~= nil and path ~= nil then
    if kept == nil then info:dynamicMetadata():set("%(attempt_ns)s", "%(path)s", path) end
    headers:replace(":path", PREFIX .. string.sub(path, 4))
  elseif kept ~= nil then
    headers:replace(":path", kept)
  end
  -- The happy path ends here: the router's body already names the first backend's model, and
  -- x-router-backend names the first backend unless a later attempt says otherwise.
  if attempt == 1 then return end
  local meta = info:dynamicMetadata():get("%(ns)s")
  if meta == nil or meta["%(plan)s"] == nil then return end
  local labels = meta["%(labels_list)s"]
  if labels ~= nil and labels[attempt] ~= nil then
    -- Attempts run one after another: the last one to start is the one that answers.
    info:dynamicMetadata():set("%(attempt_ns)s", "%(answering)s", labels[attempt])
  end
  local deadline = tonumber(meta["%(deadline)s"]) or 0
  if deadline > 0 and h:timestamp() > deadline then
    h:respond({[":status"] = "504", ["content-type"] = "application/json"},
      error_body("the fallback deadline passed before another backend could be tried", "server_error", "fallback_deadline"))
    return
  end
  local model = meta["%(plan)s"][attempt]
  local s, e = string.match(meta["%(span)s"] or "", "^(%%d+):(%%d+)$")
  if model == nil or s == nil then return end
  s, e = tonumber(s), tonumber(e)
  local body = h:body()
  local size = body:length()
  body:setBytes(body:getBytes(0, s) .. model .. body:getBytes(e, size - e))
end

function envoy_on_response(h)
  local headers = h:headers()
  local status = tonumber(headers:get(":status")) or 0
  if status ~= 429 and status < 500 and not (AUTH == "replace" and (status == 401 or status == 403)) then return end
  local meta = h:streamInfo():dynamicMetadata():get("%(ns)s")
  if meta == nil or meta["%(plan)s"] == nil then return end
  -- The answer of a backend the router is done with: if Envoy tries another, it is discarded.
  local message, kind, code
  if status == 401 or status == 403 then
    message = "a backend refused the router's credentials (" .. status .. "): its API key is missing, expired or wrong"
    kind, code = "server_error", "backend_credentials_rejected"
  else
    message = "every backend tried failed or is rate limited (" .. (meta["%(labels)s"] or "") .. "); the last answered " .. status
    kind = status == 429 and "rate_limit_error" or "server_error"
    code = status == 429 and "all_backends_rate_limited" or "all_backends_failed"
  end
  local body = h:body()
  body:setBytes(error_body(message, kind, code))
  h:headers():replace("content-type", "application/json")
end
"""


def lua_source(prefix: str | None, auth: str) -> str:
    """The upstream Lua filter of one cluster: ``prefix`` replaces the request path's /v1 (None:
    the client's path), ``auth`` says what to do with the Authorization header."""
    return _LUA % {
        "prefix": "nil" if prefix is None else orjson.dumps(prefix).decode(),
        "auth": auth,
        "attempt_ns": ATTEMPT_NAMESPACE,
        "ns": h.METADATA_NAMESPACE,
        "plan": h.KEY_PLAN,
        "path": KEPT_PATH,
        "deadline": h.KEY_DEADLINE,
        "span": h.KEY_MODEL_SPAN,
        "labels": h.KEY_BACKENDS,
        "labels_list": h.KEY_LABELS,
        "answering": ANSWERING,
    }


def upstream_filters(prefix: str | None, auth: str, secret: dict[str, Any] | None) -> list[dict[str, Any]]:
    filters: list[dict[str, Any]] = [
        {
            "name": "envoy.filters.http.lua",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                "default_source_code": {"inline_string": lua_source(prefix, auth)},
            },
        }
    ]
    if secret is not None:
        filters.append(
            {
                "name": "envoy.filters.http.credential_injector",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
                    "overwrite": True,  # the client's Authorization never reaches the provider
                    "credential": {
                        "name": "envoy.http.injected_credentials.generic",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic",
                            "credential": secret,
                            "header": "Authorization",
                            "header_value_prefix": "Bearer ",
                        },
                    },
                },
            }
        )
    filters.append(_CODEC)
    return filters


def with_chain_filters(cluster: dict[str, Any]) -> dict[str, Any]:
    """A cluster of the router's own replicas that a chain may reach: on every attempt the
    client's path comes back, no provider's key goes through, and a later attempt gets its model."""
    options = cluster.setdefault("typed_extension_protocol_options", {})
    http = options.setdefault(
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http_protocol_options": {}},
        },
    )
    http["http_filters"] = upstream_filters(None, "forward", None)
    cluster["circuit_breakers"] = {"thresholds": [{"max_retries": 1024}]}
    return cluster


def secret_name(provider: Provider) -> str:
    return f"extproc-key-{provider.name}"


def secret_resource(provider: Provider) -> dict[str, Any] | None:
    """The SDS resource of a provider's key: where Envoy reads it (a file, watched for the
    kubelet's updates, or an environment variable), never the key itself."""
    key = provider.api_key
    if key is None:
        return None
    if key.file is not None:
        source: dict[str, Any] = {"filename": key.file}
        directory = key.file.rsplit("/", 1)[0] or "/"
        source["watched_directory"] = {"path": directory}
    else:
        source = {"environment_variable": key.env}
    return {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        "name": secret_name(provider),
        "generic_secret": {"secret": source},
    }


def _sds_config(xds_dir: str, provider: Provider) -> dict[str, Any]:
    path = f"{xds_dir.rstrip('/')}/{SDS_DIR}/{provider.name}.json"
    return {
        "name": secret_name(provider),
        "sds_config": {
            "path_config_source": {"path": path, "watched_directory": {"path": path.rsplit("/", 1)[0]}},
            "resource_api_version": "V3",
        },
    }


def provider_cluster(provider: Provider, o: EnvoyOptions) -> dict[str, Any]:
    """One hosted provider: TLS to its host (SNI, the certificate checked against the host and
    the CA bundle), HTTP/2 where it offers it, its connect timeout and connection limits."""
    host, port = provider.host, provider.port
    address = socket_address(provider.address) if provider.address else None
    if address is None:
        address = {"socket_address": {"address": host, "port_value": port}}
    validation: dict[str, Any] = {
        "trusted_ca": {"filename": provider.ca_file or o.ca_file},
        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}],
    }
    secret = _sds_config(o.xds_dir, provider) if provider.api_key is not None else None
    auth = "strip" if provider.authorization == "replace" and secret is None else provider.authorization
    return {
        "name": provider.name,
        "type": "STATIC" if provider.address else "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": f"{provider.connect_timeout:g}s",
        "load_assignment": {
            "cluster_name": provider.name,
            # The hostname is what auto_host_rewrite puts in :authority for this attempt.
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address, "hostname": host}}]}],
        },
        "circuit_breakers": {
            "thresholds": [
                {
                    "max_connections": provider.max_connections,
                    "max_pending_requests": provider.max_pending_requests,
                    "max_requests": provider.max_requests,
                    "max_retries": 1024,  # retries of chains that start here (Envoy's default is 3)
                }
            ]
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {"validation_context": validation, "alpn_protocols": ["h2", "http/1.1"]},
            },
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}},
                "http_filters": upstream_filters(provider.path_prefix, auth, secret),
            }
        },
    }


def chain_route(
    key: str, per_try_timeout: float | None, default_cluster: str, path_regex: str, o: EnvoyOptions
) -> dict[str, Any]:
    """The route of requests the router gave several backends, matched on ``extproc.chain``:
    attempt N goes to the N-th group of the request's list, a retry for 429, 5xx, resets,
    connect failures and per-try timeouts, as many times as the list is long."""
    retry: dict[str, Any] = {
        "retry_on": "5xx,reset,connect-failure,refused-stream,retriable-status-codes",
        "retriable_status_codes": [429],
        "num_retries": 1,  # per request: x-envoy-max-retries, from the router's list
        "refresh_cluster_on_retry": True,
        "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.005s"},  # another backend: no wait
    }
    if per_try_timeout:
        retry["per_try_timeout"] = f"{per_try_timeout:g}s"
    return {
        "name": f"llm-chain-{key}",
        "match": {
            "safe_regex": {"regex": path_regex},
            "dynamic_metadata": [
                {
                    "filter": h.METADATA_NAMESPACE,
                    "path": [{"key": h.KEY_CHAIN}],
                    "value": {"string_match": {"exact": key}},
                }
            ],
        },
        "route": {
            "inline_cluster_specifier_plugin": {
                "extension": {
                    "name": "envoy.router.cluster_specifier_plugin.priority_group",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.router.cluster_specifiers.priority_group.v3.PriorityGroupClusterSpecifier",
                        "priority_groups": [
                            {"name": "default", "clusters": [{"cluster_name": default_cluster, "weight": 1}]}
                        ],
                        "override_metadata_namespace": CHAIN_NAMESPACE,
                    },
                }
            },
            "timeout": o.upstream_timeout,
            # As the model routes (routes.py): a model thinking for minutes before its first byte
            # (or between events) is not cut by the connection manager's stream_idle_timeout.
            "idle_timeout": o.upstream_timeout,
            "auto_host_rewrite": True,
            "retry_policy": retry,
        },
        # As the model routes: answers buffered whole for their usage up to this, and (what a
        # chain needs) the request body kept for retries up to it, not the connection's limit.
        "per_request_buffer_limit_bytes": o.max_response_bytes,
        "request_headers_to_add": [
            {
                "header": {
                    "key": "x-envoy-max-retries",
                    "value": f"%DYNAMIC_METADATA({h.METADATA_NAMESPACE}:{h.KEY_RETRIES})%",
                },
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
        "response_headers_to_add": [
            # The first backend, as the router planned it; a later attempt's upstream filter names
            # its own (an empty value adds no header, so the first one's stays).
            {
                "header": {
                    "key": h.ROUTER_BACKEND,
                    "value": f"%DYNAMIC_METADATA({h.METADATA_NAMESPACE}:{h.KEY_FIRST_BACKEND})%",
                },
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            },
            {
                "header": {"key": h.ROUTER_BACKEND, "value": f"%DYNAMIC_METADATA({ATTEMPT_NAMESPACE}:{ANSWERING})%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            },
            {
                "header": {"key": h.ROUTER_ATTEMPTS, "value": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            },
        ],
    }


def chain_key(per_try_timeout: float | None) -> str:
    """The chain route a request takes, by the per-try timeout its attempts get."""
    return "none" if not per_try_timeout else f"{round(per_try_timeout * 1000)}ms"


def chain_timeouts(policy: Policy) -> set[float | None]:
    """Every per-try timeout a chain route is needed for: each provider's, and the replicas'."""
    out: set[float | None] = {p.timeout for p in policy.providers.values()}
    out.add(policy.fallback.replica_timeout)
    return out
