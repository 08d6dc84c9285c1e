"""The little of the Kubernetes API that replica discovery needs: authenticated GETs of JSON and
of watch streams over urllib3, with in-cluster or kubeconfig credentials.

Why not the official ``kubernetes`` package: discovery makes two kinds of request to one GA
API (list and watch of ``discovery.k8s.io/v1`` EndpointSlices), while that package installs
126 MB (a generated model and API class for every resource, twice: sync and ``aio``) and pulls
pydantic, aiohttp, requests, oauthlib and websocket-client into the image. What this module
must get right instead, and where it is tested (tests/replicas, against a local server that
speaks the list + watch protocol, which the official client is also run against):

- list, then watch from the list's ``resourceVersion``; bookmarks; ``ERROR`` events and HTTP
  statuses as :class:`ApiError` (410 Gone → the caller relists);
- in a pod: the service account's token (re-read every minute: bound tokens rotate), CA
  certificate and namespace;
- outside: a kubeconfig (``KUBECONFIG`` may list several files, merged as kubectl does) with a
  token, token file, client certificate, basic auth or an exec credential plugin. Not
  supported: the removed ``auth-provider`` plugins and ``proxy-url`` (each a clear error).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import json
import os
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import urllib3

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
_TOKEN_REREAD_SECONDS = 60.0  # as client-go: the kubelet rotates projected tokens well before expiry
_EXEC_TIMEOUT_SECONDS = 30.0
_EXEC_EARLY_REFRESH = datetime.timedelta(seconds=30)
_MAX_ERROR_BODY = 64 * 1024

Json = dict[str, Any]
Token = Callable[[], str | None]


class KubernetesConfigError(RuntimeError):
    """Neither in-cluster credentials nor a usable kubeconfig were found."""


class ApiError(Exception):
    """The API server refused a request (HTTP status, or an ERROR event in a watch)."""

    def __init__(self, status: int, reason: str = "", message: str = "") -> None:
        self.status, self.reason, self.message = status, reason, message
        super().__init__(f"HTTP {status} {reason}: {message}" if message else f"HTTP {status} {reason}")

    @classmethod
    def from_status(cls, status: int, body: Any) -> ApiError:
        """From a ``Status`` object (the API's error body), or whatever else came back."""
        if isinstance(body, dict) and body.get("kind") == "Status":
            return cls(int(body.get("code") or status), str(body.get("reason") or ""), str(body.get("message") or ""))
        return cls(status)


class ApiClient:
    """Authenticated JSON GETs against one API server; safe to share between threads."""

    def __init__(
        self,
        host: str,
        *,
        token: Token | None = None,
        basic_auth: tuple[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        namespace: str = "default",
    ) -> None:
        self.host = host.rstrip("/")
        self.namespace = namespace  # of the pod, or of the kubeconfig's context
        self._token = token
        self._basic = basic_auth
        pool_options: dict[str, Any] = {}
        if ssl_context is not None:
            pool_options["ssl_context"] = ssl_context
            if ssl_context.verify_mode == ssl.CERT_NONE:
                pool_options.update(cert_reqs="CERT_NONE", assert_hostname=False)
        if server_hostname:
            pool_options["server_hostname"] = server_hostname
        # No retries: the watcher has its own backoff, and a retried watch would hide a cut.
        # Each watch holds a connection for minutes: room for one per replica source, and a list.
        self._pool = urllib3.PoolManager(num_pools=2, maxsize=32, retries=False, **pool_options)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "extproc"}
        token = self._token() if self._token is not None else None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif self._basic is not None:
            headers.update(urllib3.make_headers(basic_auth=":".join(self._basic)))
        return headers

    def _open(self, path: str, params: Mapping[str, Any], timeout: tuple[float, float]) -> urllib3.BaseHTTPResponse:
        query = urlencode({k: v for k, v in params.items() if v is not None})
        response = self._pool.request(
            "GET",
            f"{self.host}{path}" + (f"?{query}" if query else ""),
            headers=self._headers(),
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]),
            preload_content=False,
        )
        if response.status != 200:
            body = response.read(_MAX_ERROR_BODY)
            response.release_conn()
            if response.status == 401 and isinstance(self._token, CachedToken):
                self._token.invalidate()  # an expired credential: the next attempt fetches a new one
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                parsed = None
            raise ApiError.from_status(response.status, parsed)
        return response

    def get(self, path: str, params: Mapping[str, Any], timeout: tuple[float, float]) -> Json:
        response = self._open(path, params, timeout)
        try:
            return orjson.loads(response.read())
        finally:
            response.release_conn()

    def watch(self, path: str, params: Mapping[str, Any], timeout: tuple[float, float]) -> WatchStream:
        return WatchStream(self._open(path, {**params, "watch": "true"}, timeout))


class WatchStream:
    """The events of one watch response, in order; :meth:`close` may be called from another
    thread to end a blocked read at once."""

    def __init__(self, response: urllib3.BaseHTTPResponse) -> None:
        self._response = response
        self._closed = False

    def __iter__(self) -> Iterator[Json]:
        buffer = b""
        try:
            for data in self._chunks():
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield orjson.loads(line)
                if self._closed:
                    return
            if buffer.strip() and not self._closed:
                yield orjson.loads(buffer)
        finally:
            self.close()

    def _chunks(self) -> Iterator[bytes]:
        response = self._response
        if response.chunked:  # how the API server streams over HTTP/1.1: yields each chunk as it comes
            yield from response.read_chunked(decode_content=True)
        else:
            while data := response.read1(64 * 1024):
                yield data

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._response.shutdown()  # unblocks a read in progress on another thread
        with contextlib.suppress(Exception):
            self._response.close()


# --- credentials ---------------------------------------------------------------------------------


class CachedToken:
    """A bearer token fetched by ``fetch`` (returns the token and how long it is good for)."""

    def __init__(self, fetch: Callable[[], tuple[str, float]]) -> None:
        self._fetch = fetch
        self._lock = threading.Lock()
        self._token: str | None = None
        self._until = 0.0

    def __call__(self) -> str | None:
        with self._lock:
            if self._token is None or time.monotonic() >= self._until:
                self._token, seconds = self._fetch()
                self._until = time.monotonic() + seconds
            return self._token

    def invalidate(self) -> None:
        with self._lock:
            self._token = None


def file_token(path: Path) -> CachedToken:
    def fetch() -> tuple[str, float]:
        try:
            return path.read_text().strip(), _TOKEN_REREAD_SECONDS
        except OSError as exc:
            raise KubernetesConfigError(f"cannot read the API token at {path}: {exc.strerror}") from None

    return CachedToken(fetch)


def exec_token(spec: Json, base: Path) -> CachedToken:
    """A client-go credential plugin (``users[].user.exec``): runs it for an ExecCredential."""
    command = spec.get("command")
    if not command:
        raise KubernetesConfigError("kubeconfig: users[].user.exec has no command")
    if not os.path.isabs(command) and os.sep in command:
        command = str(base / command)  # relative to the kubeconfig, as client-go resolves it
    argv = [command, *spec.get("args", [])]
    api_version = spec.get("apiVersion", "client.authentication.k8s.io/v1")

    def fetch() -> tuple[str, float]:
        env = dict(os.environ)
        env.update({item["name"]: item["value"] for item in spec.get("env") or []})
        env["KUBERNETES_EXEC_INFO"] = json.dumps(
            {"apiVersion": api_version, "kind": "ExecCredential", "spec": {"interactive": False}}
        )
        try:
            done = subprocess.run(
                argv, env=env, capture_output=True, timeout=_EXEC_TIMEOUT_SECONDS, stdin=subprocess.DEVNULL
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KubernetesConfigError(f"kubeconfig exec plugin {argv[0]}: {exc}") from None
        if done.returncode != 0:
            raise KubernetesConfigError(f"kubeconfig exec plugin {argv[0]} exited with {done.returncode}")
        try:
            status = json.loads(done.stdout)["status"]
            token = status["token"]
        except (ValueError, KeyError, TypeError):
            raise KubernetesConfigError(
                f"kubeconfig exec plugin {argv[0]}: no status.token in its output (client certificates "
                "from exec plugins are not supported)"
            ) from None
        seconds = 3600.0
        if expires := status.get("expirationTimestamp"):
            left = datetime.datetime.fromisoformat(expires) - datetime.datetime.now(datetime.UTC)
            seconds = max(0.0, (left - _EXEC_EARLY_REFRESH).total_seconds())
        return token, seconds

    return CachedToken(fetch)


def _ssl_context(
    ca_file: str | None = None,
    ca_data: str | None = None,
    cert: tuple[str, str] | None = None,
    cert_data: tuple[bytes, bytes] | None = None,
    insecure: bool = False,
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca_file, cadata=ca_data)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert is not None:
        context.load_cert_chain(*cert)
    elif cert_data is not None:
        # ssl loads a key only from a file: a private one, removed at once.
        with tempfile.TemporaryDirectory(prefix="extproc-kube-") as tmp:
            cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            for path, data in ((cert_path, cert_data[0]), (key_path, cert_data[1])):
                path.touch(mode=0o600)
                path.write_bytes(data)
            context.load_cert_chain(str(cert_path), str(key_path))
    return context


# --- configuration --------------------------------------------------------------------------------


def load_api_client(kubeconfig: str | None = None, service_account: Path = SERVICE_ACCOUNT_DIR) -> ApiClient:
    """In-cluster credentials when running in a pod (KUBERNETES_SERVICE_HOST set), else the
    kubeconfig (this path, else ``KUBECONFIG``, else ``~/.kube/config``).

    An explicit ``kubeconfig`` path wins even inside a pod: the caller asked for it.
    """
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster(service_account)
    return from_kubeconfig(kubeconfig)


def in_cluster(directory: Path = SERVICE_ACCOUNT_DIR) -> ApiClient:
    host = os.environ["KUBERNETES_SERVICE_HOST"]
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    token, ca = directory / "token", directory / "ca.crt"
    if not token.is_file() or not ca.is_file():
        raise KubernetesConfigError(
            f"cannot configure the Kubernetes client: running in a pod, but its service account credentials "
            f"are missing at {directory} (is automountServiceAccountToken disabled? chart: serviceAccount.automount)"
        )
    try:
        namespace = (directory / "namespace").read_text().strip() or "default"
        context = _ssl_context(ca_file=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise KubernetesConfigError(f"cannot configure the Kubernetes client from {directory}: {exc}") from None
    host = f"[{host}]" if ":" in host else host
    return ApiClient(f"https://{host}:{port}", token=file_token(token), ssl_context=context, namespace=namespace)


def _kubeconfig_paths(explicit: str | None) -> list[Path]:
    if explicit:
        return [Path(explicit).expanduser()]
    listed = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    return [Path(p).expanduser() for p in listed] or [Path("~/.kube/config").expanduser()]


def _merged_kubeconfig(paths: list[Path]) -> tuple[Json, dict[str, Path]]:
    """kubectl's merge: the first file to name a cluster, user or context (or current-context)
    wins. Also returns the file each entry came from, for its relative paths."""
    import yaml

    merged: Json = {"clusters": {}, "users": {}, "contexts": {}, "current-context": None}
    origin: dict[str, Path] = {}
    found = False
    for path in paths:
        try:
            doc = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            continue
        except (OSError, yaml.YAMLError) as exc:
            raise KubernetesConfigError(f"cannot read kubeconfig {path}: {exc}") from None
        if not isinstance(doc, dict):
            raise KubernetesConfigError(f"kubeconfig {path} is not a YAML mapping")
        found = True
        for kind, key in (("clusters", "cluster"), ("users", "user"), ("contexts", "context")):
            for entry in doc.get(kind) or []:
                name = entry.get("name")
                if name is not None and name not in merged[kind]:
                    merged[kind][name] = entry.get(key) or {}
                    origin[f"{kind}/{name}"] = path.parent
        merged["current-context"] = merged["current-context"] or doc.get("current-context")
    if not found:
        where = ", ".join(map(str, paths))
        raise KubernetesConfigError(
            f"cannot configure the Kubernetes client: no kubeconfig at {where} "
            "(outside a cluster, pass --kubeconfig or set KUBECONFIG)"
        )
    return merged, origin


def from_kubeconfig(explicit: str | None = None) -> ApiClient:
    paths = _kubeconfig_paths(explicit)
    config, origin = _merged_kubeconfig(paths)
    where = ", ".join(map(str, paths))
    name = config["current-context"]
    context = config["contexts"].get(name) if name else None
    if context is None:
        raise KubernetesConfigError(f"kubeconfig {where}: current-context {name!r} is not one of its contexts")
    cluster = config["clusters"].get(context.get("cluster"))
    user = config["users"].get(context.get("user"), {}) if context.get("user") else {}
    if cluster is None or not cluster.get("server"):
        raise KubernetesConfigError(f"kubeconfig {where}: context {name!r} names no cluster with a server")
    if cluster.get("proxy-url"):
        raise KubernetesConfigError(f"kubeconfig {where}: clusters[].cluster.proxy-url is not supported")
    if user.get("auth-provider"):
        raise KubernetesConfigError(
            f"kubeconfig {where}: users[].user.auth-provider plugins are not supported (kubectl removed them); "
            "use an exec plugin or a token"
        )
    cluster_dir = origin[f"clusters/{context['cluster']}"]
    user_dir = origin.get(f"users/{context.get('user')}", cluster_dir)

    def path_of(base: Path, value: str) -> str:
        return str(base / Path(value).expanduser())

    token: Token | None = None
    if user.get("token"):
        fixed = user["token"]
        token = lambda: fixed  # noqa: E731
    elif user.get("tokenFile"):
        token = file_token(Path(path_of(user_dir, user["tokenFile"])))
    elif user.get("exec"):
        token = exec_token(user["exec"], user_dir)
    basic = (user["username"], user.get("password", "")) if user.get("username") else None
    server = cluster["server"]
    context_ssl = None
    try:
        if server.startswith("https://"):
            ca_data = cluster.get("certificate-authority-data")
            cert = key = None
            if user.get("client-certificate") and user.get("client-key"):
                cert = (path_of(user_dir, user["client-certificate"]), path_of(user_dir, user["client-key"]))
            if user.get("client-certificate-data") and user.get("client-key-data"):
                key = (base64.b64decode(user["client-certificate-data"]), base64.b64decode(user["client-key-data"]))
            context_ssl = _ssl_context(
                ca_file=path_of(cluster_dir, cluster["certificate-authority"])
                if cluster.get("certificate-authority")
                else None,
                ca_data=base64.b64decode(ca_data).decode() if ca_data else None,
                cert=cert,
                cert_data=key,
                insecure=bool(cluster.get("insecure-skip-tls-verify")),
            )
    except (OSError, ValueError, ssl.SSLError) as exc:
        raise KubernetesConfigError(f"kubeconfig {where}: cannot set up TLS for {server}: {exc}") from None
    return ApiClient(
        server,
        token=token,
        basic_auth=basic,
        ssl_context=context_ssl,
        server_hostname=cluster.get("tls-server-name"),
        namespace=context.get("namespace") or "default",
    )
