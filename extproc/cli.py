"""The ``extproc`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Any

import orjson

from extproc.envoy.names import SOCKET
from extproc.policy.load import DEFAULT_POLICY
from extproc.request import CHAT_PATH, COMPLETIONS_PATH, RESPONSES_PATH


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # eval and classify own their options; hand them everything after the command name, so
    # `extproc eval --config P --data D` works (argparse's REMAINDER refuses a leading option).
    if argv and argv[0] in _DELEGATED:
        rest = argv[1:]
        return _DELEGATED[argv[0]]()(rest[1:] if rest[:1] == ["--"] else rest)
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check-config":
        return _check_config(args.path)
    if args.command == "route":
        return _route(args)
    if args.command == "envoy-config":
        return _envoy_config(args)
    if args.command == "cache":
        return _cache_invalidate(args)
    if args.command == "demo":
        from extproc.demo import run_demo

        return run_demo(keep_running=args.keep_running)
    raise AssertionError(args.command)


def build_parser() -> argparse.ArgumentParser:
    """The command line; option defaults read the environment when this is called."""
    parser = argparse.ArgumentParser(prog="extproc", description="LLM routing sidecar for Envoy.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the ext_proc gRPC server")
    _add_serve_options(serve)

    check = commands.add_parser("check-config", help="validate a routing policy; exit 1 on errors")
    check.add_argument("path", type=Path)

    route = commands.add_parser("route", help="dry-run one request through the policy (no server)")
    route.add_argument("request", type=Path, help="JSON request body ('-' for stdin)")
    route.add_argument("--config", type=Path, default=DEFAULT_POLICY)
    route.add_argument("--path", help="API path (default: guessed from the body)")
    route.add_argument("--header", "-H", action="append", default=[], metavar="NAME:VALUE")
    route.add_argument(
        "--kubeconfig", default=os.environ.get("KUBECONFIG"), help="kubeconfig for Kubernetes replicas (env KUBECONFIG)"
    )

    envoy = commands.add_parser(
        "envoy-config", help="print Envoy's whole configuration for a policy, or write its bootstrap and xDS files"
    )
    envoy.add_argument("--config", type=Path, default=DEFAULT_POLICY)
    envoy.add_argument("--envoy-settings", type=Path, help="YAML of the live Envoy settings (as `serve` reads)")
    envoy.add_argument(
        "--xds-dir",
        type=Path,
        help="write the bootstrap and the listener, routes and clusters under this directory instead of printing "
        "(an init step before Envoy starts; `serve --xds-dir` keeps them current)",
    )
    envoy.add_argument("--uds", default="/var/run/extproc/extproc.sock", help="the sidecar's socket")
    envoy.add_argument("--extproc-address", help="host:port of the sidecar instead of the socket")
    envoy.add_argument("--listen-address", default="0.0.0.0")
    envoy.add_argument("--listen-port", type=int, default=8080)
    envoy.add_argument("--admin-port", type=int, default=9901)
    envoy.add_argument("--readiness-port", type=int, help="a listener answering only GET /ready, for probes")
    envoy.add_argument("--stats-port", type=int, help="a listener answering only GET /stats/prometheus, for Prometheus")
    envoy.add_argument(
        "--cluster-endpoint",
        action="append",
        default=[],
        metavar="CLUSTER=HOST:PORT",
        help="endpoints of clusters Envoy balances itself (repeatable)",
    )
    envoy.add_argument(
        "--forward-header",
        action="append",
        default=[],
        metavar="NAME",
        help="extra request header the policy reads (repeatable)",
    )
    envoy.add_argument(
        "--forward-path",
        action="append",
        default=None,
        metavar="PATH",
        help="non-LLM path forwarded to the default cluster unrouted (repeatable; default: /v1/models only)",
    )
    envoy.add_argument("--two-round-trips", action="store_true", help="send request headers as their own message")
    envoy.add_argument("--no-usage", action="store_true", help="do not stream response bodies for usage and cost")

    cache = commands.add_parser("cache", help="the semantic cache of a running sidecar")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True)
    invalidate = cache_commands.add_parser(
        "invalidate",
        help="drop stored answers (all, or one model's); with the Redis backend, every sidecar sharing it drops them",
    )
    invalidate.add_argument("--model", help="only this model's answers (a policy model name)")
    invalidate.add_argument(
        "--uds", default=os.environ.get("EXTPROC_UDS", SOCKET), help="the sidecar's Unix socket (env EXTPROC_UDS)"
    )
    invalidate.add_argument("--address", help="the sidecar's gRPC host:port instead of its socket")

    demo = commands.add_parser("demo", help="route sample prompts through a real Envoy on this machine")
    demo.add_argument("--keep-running", action="store_true", help="leave the stack up until Ctrl-C")

    evaluate = commands.add_parser("eval", help="measure routing quality and cost offline on labelled prompts")
    evaluate.add_argument("rest", nargs=argparse.REMAINDER)

    classify = commands.add_parser("classify", help="run the classifier on JSONL prompts")
    classify.add_argument("rest", nargs=argparse.REMAINDER)

    fit = commands.add_parser("fit", help="fit a complexity head for your own weak/strong pair from labelled prompts")
    fit.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _cache_invalidate(args: argparse.Namespace) -> int:
    import grpc

    from extproc.cache.admin import INVALIDATE, request_invalidate

    target = args.address or f"unix:{args.uds}"
    try:
        with grpc.insecure_channel(target) as channel:
            dropped = request_invalidate(channel, args.model)
    except grpc.RpcError as exc:
        print(f"extproc cache invalidate: {target}: {exc.details() or exc.code().name}", file=sys.stderr)
        return 1
    scope = f"model {args.model!r}" if args.model else "every model"
    print(f"dropped {dropped} stored answers ({scope}) via {INVALIDATE} on {target}")
    return 0


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(value: str) -> str:
    level = value.strip().lower()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not a log level; use one of: {', '.join(LOG_LEVELS)}")
    return level


def _flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _add_serve_options(serve: argparse.ArgumentParser) -> None:
    """Every option also reads an environment variable, named in its help (a container sets
    either). A string default goes through ``type``, so a bad variable is reported like a bad
    option."""

    def option(flag: str, env: str, help: str, default: str | None = None, **kwargs: Any) -> None:
        serve.add_argument(flag, default=os.environ.get(env, default), help=f"{help} (env {env})", **kwargs)

    option(
        "--config",
        "EXTPROC_CONFIG",
        "routing policy YAML (default: the bundled example; the image sets /etc/extproc/policy.yaml)",
        str(DEFAULT_POLICY),
        type=Path,
    )
    option("--uds", "EXTPROC_UDS", "Unix socket path ('' to disable)", SOCKET)
    option("--listen", "EXTPROC_LISTEN", "also serve TCP on host:port, e.g. 127.0.0.1:50051")
    option("--health-listen", "EXTPROC_HEALTH_LISTEN", "serve only the gRPC health service on host:port (kubelet)")
    option("--metrics-port", "EXTPROC_METRICS_PORT", "Prometheus /metrics port (0 disables)", "9090", type=int)
    option("--metrics-address", "EXTPROC_METRICS_ADDRESS", "address of the /metrics server", "0.0.0.0")
    option("--kubeconfig", "KUBECONFIG", "kubeconfig for replica discovery outside a cluster")
    option("--tls-cert", "EXTPROC_TLS_CERT", "serve TCP with TLS: certificate chain (PEM)")
    option("--tls-key", "EXTPROC_TLS_KEY", "serve TCP with TLS: private key (PEM)")
    option("--tls-client-ca", "EXTPROC_TLS_CLIENT_CA", "require client certificates signed by this CA (PEM)")
    option(
        "--lease-timeout",
        "EXTPROC_LEASE_TIMEOUT",
        "seconds a request may hold a replica before its lease ends anyway; keep it above Envoy's upstream timeout",
        "660",
        type=float,
    )
    serve.add_argument(
        "--no-reload",
        action="store_true",
        default=_flag(os.environ.get("EXTPROC_NO_RELOAD", "")),
        help="do not watch the config file (env EXTPROC_NO_RELOAD=1)",
    )
    option(
        "--xds-dir",
        "EXTPROC_XDS_DIR",
        "be Envoy's control plane: publish its listener, routes and clusters here, rendered from the live policy "
        "(the bootstrap `extproc envoy-config --xds-dir` writes points Envoy here)",
        type=Path,
    )
    option(
        "--envoy-settings",
        "EXTPROC_ENVOY_SETTINGS",
        "YAML of Envoy settings applied live with the policy (timeouts, forwarded headers and paths, cluster "
        "endpoints; README 'How Envoy is wired')",
        type=Path,
    )
    option("--envoy-listen", "EXTPROC_ENVOY_LISTEN", "host:port of Envoy's client listener", "0.0.0.0:8080")
    option(
        "--envoy-admin",
        "EXTPROC_ENVOY_ADMIN",
        "host:port of Envoy's admin interface, to confirm each update and undo one Envoy rejects",
    )
    option(
        "--wait-for-envoy",
        "EXTPROC_WAIT_FOR_ENVOY",
        "on SIGTERM, keep serving while the pod's Envoy drains (found through --envoy-admin), up to this many "
        "seconds; 0 stops at once",
        "0",
        type=float,
    )
    option("--log-level", "EXTPROC_LOG_LEVEL", f"one of {', '.join(LOG_LEVELS)}", "info", type=_log_level)


def _eval_main():
    from extproc.evaluation.cli import main as eval_main

    return eval_main


def _classify_main():
    from extproc.classifier.cli import main as classify_main

    return classify_main


def _fit_main():
    from extproc.evaluation.fit import main as fit_main

    return fit_main


# Subcommands with their own parsers; listed in `extproc --help` through the stubs above.
_DELEGATED = {"eval": _eval_main, "classify": _classify_main, "fit": _fit_main}


def _serve(args: argparse.Namespace) -> int:
    from extproc import logs
    from extproc.app import Settings, serve
    from extproc.envoy.options import EnvoyOptions

    logs.setup(args.log_level)
    listen_host, _, port = args.envoy_listen.rpartition(":")
    if not listen_host or not port.isdigit():
        print(f"extproc serve: --envoy-listen {args.envoy_listen!r}: give host:port", file=sys.stderr)
        return 2
    listen_port = int(port)
    settings = Settings(
        config=args.config,
        uds=args.uds or None,
        listen=args.listen,
        health_listen=args.health_listen,
        metrics_port=args.metrics_port or None,
        metrics_address=args.metrics_address,
        kubeconfig=args.kubeconfig,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        reload=not args.no_reload,
        lease_timeout=args.lease_timeout,
        xds_dir=args.xds_dir,
        envoy=EnvoyOptions(listen_address=listen_host, listen_port=listen_port),
        envoy_settings=args.envoy_settings,
        envoy_admin=args.envoy_admin,
        wait_for_envoy=args.wait_for_envoy,
    )
    from extproc.listen import AddressInUse
    from extproc.policy import ConfigError
    from extproc.policy.reload import Refused
    from extproc.replicas.kubeapi import KubernetesConfigError

    if args.config.resolve() == DEFAULT_POLICY:
        logging.getLogger("extproc.cli").warning(
            "serving the bundled example policy (replicas on 127.0.0.1); pass --config or EXTPROC_CONFIG"
        )
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(settings))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except (AddressInUse, KubernetesConfigError, Refused) as exc:  # another sidecar here, no cluster, Envoy said no
        print(f"extproc serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _loop_factory():
    """uvloop unless EXTPROC_UVLOOP=0: it cuts the sidecar's CPU per request (bench/RESULTS.md)."""
    if os.environ.get("EXTPROC_UVLOOP", "1") == "0":
        return None
    try:
        import uvloop
    except ImportError:  # a platform without a wheel: the standard loop works the same, a little slower
        return None
    return uvloop.new_event_loop


def _check_config(path: Path) -> int:
    from extproc.policy import ConfigError, load_policy

    try:
        policy = load_policy(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    classifier = "needed" if policy.uses_classifier else "not needed"
    print(
        f"{path}: OK — {len(policy.models)} models, {len(policy.decisions)} decisions, "
        f"default {policy.default_model!r}, classifier {classifier}"
    )
    return 0


ENVOY_HEADER = """\
# Envoy in front of the extproc routing sidecar: the whole configuration `extproc envoy-config`
# resolves for the bundled policy. Regenerate instead of editing; see README, "How Envoy is wired".
#
# Envoy runs this as a tiny bootstrap (admin, the sidecar's cluster, the readiness listener) plus
# the listener, routes and clusters the sidecar publishes from the live policy (`extproc serve
# --xds-dir`); here they are inlined as static resources, for review or for an Envoy without the
# sidecar's control plane.
#
# Deliberate choices:
# - ext_proc failure_mode_allow: false. An unrouted request has `model: auto` and no target
#   cluster, so forwarding it cannot succeed; clients get a fast 503 JSON error instead
#   (status_on_error) and retry. The access log to the sidecar never fails a request.
# - message_timeout 1s, above the sidecar's own deadlines (classifier 300 ms by default).
# - Request headers are skipped: one gRPC round trip per request. Path, method and the headers
#   the policy reads arrive as attributes; list any other header the policy tests in
#   request_attributes (`--forward-header`).
# - Paths are normalised; only the exact LLM paths reach the router, and only /v1/models
#   (`--forward-path`) is forwarded unrouted: every other path gets a JSON 404.
# - A client's x-request-id is dropped; logs carry Envoy's own id, returned in the response.
"""


def envoy_options(args: argparse.Namespace) -> Any:
    """EnvoyOptions from envoy-config's flags over the settings file's values."""
    from extproc.envoy.options import EnvoyOptions, load_settings

    options = EnvoyOptions(
        listen_address=args.listen_address,
        listen_port=args.listen_port,
        admin_port=args.admin_port,
        readiness_port=args.readiness_port,
        stats_port=args.stats_port,
        extproc_uds=args.uds,
    )
    if args.envoy_settings is not None:
        options = options.with_settings(load_settings(args.envoy_settings))
    if args.xds_dir is not None:
        options.xds_dir = str(args.xds_dir.absolute())
    if args.extproc_address:
        host, _, port = args.extproc_address.rpartition(":")
        options.extproc_address, options.extproc_uds = (host, int(port)), None
    endpoints = {k: list(v) for k, v in options.cluster_endpoints.items()}
    for item in args.cluster_endpoint:
        cluster, _, endpoint = item.partition("=")
        endpoints.setdefault(cluster, []).append(endpoint)
    options.cluster_endpoints = endpoints
    if args.two_round_trips:
        options.two_round_trips = True
    if args.no_usage:
        options.usage = False
    if args.forward_header:
        options.forward_headers = (*options.forward_headers, *args.forward_header)
    if args.forward_path is not None:
        options.forward_paths = tuple(args.forward_path)
    return options


def _envoy_config(args: argparse.Namespace) -> int:
    from extproc.envoy.dump import dump
    from extproc.envoy.render.bootstrap import inline, render_bootstrap
    from extproc.envoy.render.resources import render_resources
    from extproc.policy import ConfigError, load_policy

    try:
        policy = load_policy(args.config)
        options = envoy_options(args)
        resources = render_resources(policy, options)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"extproc envoy-config: {exc}", file=sys.stderr)
        return 1
    if args.xds_dir is None:
        print(ENVOY_HEADER + dump(inline(resources, options)), end="")
        return 0
    from extproc.xds import Publisher, write_bootstrap

    # Envoy needs every file at its start ("the path to the source must exist at config load time").
    asyncio.run(Publisher(args.xds_dir, settle=0).publish(resources, grace=0))
    path = write_bootstrap(args.xds_dir, render_bootstrap(options))
    print(f"wrote {path} and the listener, routes and clusters under {args.xds_dir}")
    return 0


def _guess_path(body: Any) -> str:
    if isinstance(body, dict):
        if "messages" in body:
            return CHAT_PATH
        if "input" in body:
            return RESPONSES_PATH
        if "prompt" in body:
            return COMPLETIONS_PATH
    return CHAT_PATH


def _route(args: argparse.Namespace) -> int:
    from extproc.policy import ConfigError, load_policy

    raw = sys.stdin.buffer.read() if str(args.request) == "-" else args.request.read_bytes()
    try:
        policy = load_policy(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    headers = {}
    for item in args.header:
        name, _, value = item.partition(":")
        headers[name.strip().lower()] = value.strip()
    try:
        body_json = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body_json = None
    path = args.path or _guess_path(body_json)
    from extproc.replicas.kubeapi import KubernetesConfigError

    try:
        out = asyncio.run(_route_once(policy, path, headers, raw, args.kubeconfig))
    except KubernetesConfigError as exc:
        print(f"extproc route: {exc}", file=sys.stderr)
        return 1
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0 if "error" not in out else 2


async def _route_once(
    policy: Any, path: str, headers: dict[str, str], raw: bytes, kubeconfig: str | None = None
) -> dict[str, Any]:
    from extproc.app import Runtime, Settings
    from extproc.errors import RouterError
    from extproc.router import Call

    runtime = Runtime(Settings(config=Path(), reload=False, kubeconfig=kubeconfig))
    try:
        await runtime.apply(policy)
    except BaseException:
        runtime.discovery.close()
        raise
    router = runtime.router
    assert router is not None
    # The dry run always explains itself, whatever the policy allows over HTTP.
    router.state.policy = _with_explain(router.state.policy)
    try:
        routed = await router.route(Call("POST", path, headers, raw, "route-cli", explain=True))
    except RouterError as error:
        return {"status": error.status, "error": orjson.loads(error.body())["error"]}
    finally:
        if runtime._async_classifier is not None:
            await runtime._async_classifier.aclose()
        runtime.discovery.close()
    explanation = routed.explanation or {}
    body = routed.body if routed.body is not None else raw
    return {
        "status": 200,
        "model": routed.model or None,
        "upstream_model": routed.upstream_model,
        "decision": routed.decision,
        "cluster": routed.cluster,
        "endpoint": routed.endpoints[0] if routed.endpoints else None,
        "fallbacks": list(routed.endpoints[1:]),
        "signals": explanation.get("signals"),
        "trace": explanation.get("trace"),
        "pii_action": explanation.get("pii_action"),
        "replicas": explanation.get("replicas"),
        "chain": explanation.get("fallback"),  # the backends Envoy would try in order, and those left out
        "body": orjson.loads(body),
    }


def _with_explain(policy: Any) -> Any:
    import dataclasses

    return dataclasses.replace(policy, explain=True)


if __name__ == "__main__":
    sys.exit(main())
