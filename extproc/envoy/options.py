"""What Envoy's configuration is rendered with besides the policy: EnvoyOptions, and the live
settings file (LIVE_SETTINGS) that the sidecar reads beside the policy, checked with a message
per mistake."""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from extproc import headers as h
from extproc.envoy.names import SOCKET
from extproc.policy.load import ConfigError, Problem

# The Envoy settings the sidecar reads from a file and applies live (the chart writes them into
# the routing ConfigMap beside the policy). The rest of EnvoyOptions is fixed for a pod's life:
# addresses, ports and paths the pod spec names too.
LIVE_SETTINGS = (
    "forward_headers",
    "message_timeout",
    "max_message_timeout",
    "upstream_timeout",
    "max_request_bytes",
    "usage",
    "access_log_flush",
    "two_round_trips",
    "cluster_endpoints",
    "default_cluster",
    "forward_paths",
    "cluster_domain",
)


@dataclass
class EnvoyOptions:
    listen_address: str = "0.0.0.0"
    listen_port: int = 8080
    admin_address: str = "127.0.0.1"
    admin_port: int = 9901
    extproc_uds: str | None = SOCKET
    extproc_address: tuple[str, int] | None = None  # TCP instead of the socket
    # Where the sidecar publishes the listener, routes and clusters (extproc/xds.py); the
    # bootstrap points Envoy's subscriptions there.
    xds_dir: str = "/etc/envoy"
    # A listener that only answers GET /ready (proxied to the admin on loopback), for probes.
    readiness_port: int | None = None
    # A listener that only answers GET /stats/prometheus (proxied likewise), for Prometheus: the
    # stats that survive the sidecar (ext_proc stream failures, Envoy's own replies).
    stats_port: int | None = None
    # Headers the policy may read in the one-round-trip mode (header conditions, session, debug).
    forward_headers: Sequence[str] = (h.PRIORITY, h.USER_ID, h.SESSION_ID, h.TENANT_ID, h.DEBUG)
    message_timeout: str = "1s"
    # The longest the sidecar may extend message_timeout for one message (override_message_timeout):
    # a request waiting in the admission queue (its priority's max_wait, plus a margin).
    max_message_timeout: str = "30s"
    upstream_timeout: str = "600s"  # an LLM call's whole answer, and the longest it may go quiet
    max_request_bytes: int = 8 * 1024 * 1024
    # A JSON answer is buffered whole (its token usage is read from it); one larger fails.
    max_response_bytes: int = 64 * 1024 * 1024
    # Slow clients (README "How Envoy is wired"): the headers must be in within
    # request_headers_timeout and the whole request within request_timeout, so a body shorter than
    # its content-length or one trickled in holds a stream for seconds, not stream_idle_timeout.
    request_headers_timeout: str = "10s"
    request_timeout: str = "60s"
    stream_idle_timeout: str = "300s"
    usage: bool = True  # read token usage from response bodies (in Envoy) for tokens and cost metrics
    access_log_flush: str = "0.02s"  # how long finished requests may wait before their batch goes out
    two_round_trips: bool = False  # send request headers too (header mutations route instead of metadata)
    # Endpoints of clusters Envoy balances itself (models without router-picked replicas).
    cluster_endpoints: Mapping[str, Sequence[str]] = field(default_factory=dict)
    default_cluster: str | None = None  # where forward_paths go; default: the default model's
    # Non-LLM paths Envoy forwards to default_cluster untouched (exact match; the query may vary).
    # Every other path is a 404: a catch-all would carry /v1/embeddings, /v1/messages, /generate
    # or a model server's admin endpoints past the router.
    forward_paths: Sequence[str] = ("/v1/models",)
    cluster_domain: str = "cluster.local"  # for headless Services of Kubernetes-discovered replicas
    # The trust store hosted providers' certificates are checked against, unless a provider
    # names its own ca_file (Debian's, which Envoy's image has too).
    ca_file: str = "/etc/ssl/certs/ca-certificates.crt"

    def with_settings(self, settings: Mapping[str, Any]) -> EnvoyOptions:
        """These options with live settings (load_settings) in place of their own."""
        return replace(self, **settings)


class SettingsError(ConfigError):
    """The Envoy settings file cannot be used; ``problems`` lists every mistake."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        super().__init__(source, problems)
        lines = "\n".join(f"  - {p}" for p in problems)
        self.args = (f"invalid Envoy settings {source}:\n{lines}",)


_DURATION = re.compile(r"^[0-9]+(\.[0-9]+)?s$")
_HEADER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def load_settings(path: str | Path) -> dict[str, Any]:
    """The live Envoy settings in a YAML file: a mapping of some of LIVE_SETTINGS to values, for
    EnvoyOptions.with_settings. Raises ConfigError naming every mistake."""
    source = str(path)
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SettingsError(source, [Problem((), f"cannot read the file: {exc}")]) from None
    return parse_settings(data if data is not None else {}, source)


def parse_settings(data: Any, source: str = "Envoy settings") -> dict[str, Any]:
    if not isinstance(data, dict):
        raise SettingsError(source, [Problem((), "give a mapping of setting to value")])
    problems: list[Problem] = []
    settings: dict[str, Any] = {}
    for key, value in data.items():
        if key not in LIVE_SETTINGS:
            close = difflib.get_close_matches(str(key), LIVE_SETTINGS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(Problem((str(key),), f"unknown setting{hint}; allowed: {', '.join(LIVE_SETTINGS)}"))
            continue
        try:
            settings[key] = _setting(key, value)
        except ValueError as exc:
            problems.append(Problem((key,), str(exc)))
    if problems:
        raise SettingsError(source, problems)
    return settings


def _setting(key: str, value: Any) -> Any:
    """One setting, checked and converted to EnvoyOptions' type; ValueError says what to change."""
    if key in ("message_timeout", "max_message_timeout", "upstream_timeout", "access_log_flush"):
        if not isinstance(value, str) or not _DURATION.match(value):
            raise ValueError(f"{value!r} is not a duration; write seconds with an 's', as Envoy does: 1s, 0.02s")
        return value
    if key in ("usage", "two_round_trips"):
        if not isinstance(value, bool):
            raise ValueError(f"{value!r} is not true or false")
        return value
    if key == "max_request_bytes":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{value!r} is not a positive number of bytes")
        return value
    if key == "forward_headers":
        names = _strings(value, "header names")
        for name in names:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a lower-case header name (Envoy keys headers in lower case)")
        return tuple(names)
    if key == "forward_paths":
        paths = _strings(value, "paths")
        for path in paths:
            if not path.startswith("/") or any(c in path for c in " ?#") or not path.isprintable():
                raise ValueError(f"{path!r} is not a path (starting with '/', without a query or fragment)")
        return tuple(paths)
    if key == "cluster_endpoints":
        if not isinstance(value, dict):
            raise ValueError("give a mapping of cluster name to a list of host:port")
        out = {}
        for cluster, endpoints in value.items():
            out[str(cluster)] = tuple(_strings(endpoints, f"endpoints of {cluster}"))
            for endpoint in out[str(cluster)]:
                socket_address(endpoint)
        return out
    if key == "default_cluster":
        if value in (None, ""):
            return None
        if not isinstance(value, str):
            raise ValueError(f"{value!r} is not a cluster name")
        return value
    if key == "cluster_domain":
        if not isinstance(value, str) or not value:
            raise ValueError(f"{value!r} is not a DNS domain")
        return value
    raise AssertionError(key)


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"give a list of {what}")
    return list(value)


def socket_address(endpoint: str) -> dict[str, Any]:
    """Envoy's address of a host:port endpoint; ValueError names what is wrong with it."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"endpoint {endpoint!r}: give host:port with a port from 1 to 65535")
    return {"socket_address": {"address": host.strip("[]"), "port_value": int(port)}}
