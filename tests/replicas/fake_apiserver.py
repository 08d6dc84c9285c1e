"""A small in-memory Kubernetes API server for EndpointSlices.

It speaks the real list + watch protocol over HTTP/1.1, the way the official ``kubernetes``
client expects it (tests/replicas/test_fake_apiserver.py runs that client against it), and
the sidecar's own client (extproc/replicas/kubeapi.py) is tested against it:

- ``GET /apis/discovery.k8s.io/v1/[namespaces/{ns}/]endpointslices?labelSelector=...``
  returns an ``EndpointSliceList`` whose ``metadata.resourceVersion`` is the
  store's current version;
- the same path with ``watch=true`` streams newline-delimited
  ``{"type": ..., "object": ...}`` events as HTTP chunks, starting after the
  requested ``resourceVersion`` and ending after ``timeoutSeconds``.

Faults a test can inject: a compacted history (a watch from an older version
is answered 410 Gone, as an ERROR event or as an HTTP status), an ERROR 410 into
the open watches, watches dropped mid-stream, and a full outage (the port
refuses connections) followed by a return on the same port.

Typical use::

    with FakeApiServer() as api:
        api.apply(endpoint_slice("vllm-a", service="vllm", endpoints=[endpoint("10.0.0.1")]))
        client = api.api_client()   # the sidecar's ApiClient pointed at it
"""

from __future__ import annotations

import contextlib
import copy
import json
import re
import select
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from extproc.replicas.kubeapi import ApiClient

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_API_VERSION = "discovery.k8s.io/v1"
_PATH = re.compile(r"^/apis/discovery\.k8s\.io/v1/(?:namespaces/(?P<ns>[^/]+)/)?endpointslices/?$")
# A watch without timeoutSeconds still ends eventually, so no handler thread lives forever.
_DEFAULT_WATCH_SECONDS = 1800.0
_PEER_CHECK_SECONDS = 0.1

Obj = dict[str, Any]


# --- object builders -----------------------------------------------------------------------


def endpoint(
    address: str,
    *,
    ready: bool | None = True,
    serving: bool | None = None,
    terminating: bool | None = None,
    node_name: str | None = None,
) -> Obj:
    """One EndpointSlice endpoint; a condition given as None is left out, as the API does."""
    conditions = {
        key: value
        for key, value in (("ready", ready), ("serving", serving), ("terminating", terminating))
        if value is not None
    }
    result: Obj = {"addresses": [address], "conditions": conditions}
    if node_name is not None:
        result["nodeName"] = node_name
    return result


def port(number: int | None, name: str = "", protocol: str = "TCP") -> Obj:
    """One EndpointSlice port; ``number=None`` is the API's "all ports" entry."""
    result: Obj = {"name": name, "protocol": protocol}
    if number is not None:
        result["port"] = number
    return result


def endpoint_slice(
    name: str,
    *,
    namespace: str = "default",
    service: str | None = None,
    labels: Mapping[str, str] | None = None,
    endpoints: Sequence[Obj] = (),
    ports: Sequence[Obj] | None = (port(8000, "http"),),
    address_type: str = "IPv4",
) -> Obj:
    """An EndpointSlice object as the API serves it (camelCase JSON)."""
    all_labels = dict(labels or {})
    if service is not None:
        all_labels[SERVICE_NAME_LABEL] = service
    return {
        "apiVersion": _API_VERSION,
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": all_labels},
        "addressType": address_type,
        "endpoints": list(endpoints),
        "ports": None if ports is None else list(ports),
    }


def gone_status(message: str) -> Obj:
    """The Status object the API sends with a 410 for an expired resourceVersion."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "Expired",
        "code": 410,
    }


# --- label selectors -----------------------------------------------------------------------

_SET_TERM = re.compile(r"^(?P<key>[^\s!=]+)\s+(?P<op>in|notin)\s+\((?P<values>[^)]*)\)$")


def _split_selector(selector: str) -> list[str]:
    """Split on the commas that separate terms, not those inside ``in (a,b)``."""
    terms: list[str] = []
    current: list[str] = []
    depth = 0
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    terms.append("".join(current).strip())
    return [term for term in terms if term]


def _term_matches(term: str, labels: Mapping[str, str]) -> bool:
    if match := _SET_TERM.match(term):
        values = {value.strip() for value in match["values"].split(",")}
        present = labels.get(match["key"]) in values
        return present if match["op"] == "in" else not present
    if "!=" in term:
        key, value = (part.strip() for part in term.split("!=", 1))
        return labels.get(key) != value
    if "=" in term:
        key, value = (part.strip() for part in term.replace("==", "=").split("=", 1))
        return labels.get(key) == value
    if term.startswith("!"):
        return term[1:].strip() not in labels
    return term in labels


def selector_matches(selector: str, labels: Mapping[str, str]) -> bool:
    """Kubernetes label selector semantics: every comma-separated term must hold."""
    return all(_term_matches(term, labels) for term in _split_selector(selector))


# --- the server ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Event:
    version: int
    type: str  # ADDED, MODIFIED, DELETED or BOOKMARK
    obj: Obj
    namespace: str | None  # None: for every watch (bookmarks)


@dataclass(slots=True)
class _WatchSession:
    namespace: str | None
    selector: str
    bookmarks: bool
    sock: socket.socket
    inject_gone: bool = False
    dropped: bool = False


@dataclass(slots=True)
class RequestRecord:
    """One request the server answered, for assertions on client behaviour."""

    kind: str  # "list" or "watch"
    namespace: str | None
    label_selector: str
    resource_version: str
    timeout_seconds: float | None = None
    at: float = field(default_factory=time.monotonic)


class FakeApiServer:
    """An in-memory EndpointSlice store served over the Kubernetes list + watch protocol."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        gone_as_status: bool = False,
        token: str | None = None,
        tls: tuple[str, str] | None = None,
        client_ca: str | None = None,
    ):
        self.host = host
        self.port = port
        # With a token, requests without `Authorization: Bearer <token>` get 401; with tls
        # (certificate, key files), the server speaks HTTPS, as a real API server does.
        self.token = token
        self.tls = tls
        self.client_ca = client_ca  # with tls: require a client certificate signed by this CA
        self.authorizations: list[str | None] = []
        # How a watch from a compacted resourceVersion is refused. The real API server does
        # both: usually an HTTP 200 stream carrying one ERROR event, sometimes an HTTP 410.
        self.gone_as_status = gone_as_status
        self._lock = threading.Condition()
        self._objects: dict[tuple[str, str], Obj] = {}
        self._events: list[_Event] = []
        self._version = 1
        self._compacted = 0
        self._sessions: list[_WatchSession] = []
        self._connections: set[socket.socket] = set()
        self._requests: list[RequestRecord] = []
        self._httpd: ThreadingHTTPServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._closed = False

    # -- lifecycle --

    def start(self) -> FakeApiServer:
        httpd = _Server((self.host, self.port), _Handler)
        httpd.fake = self
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*self.tls)
            if self.client_ca is not None:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(self.client_ca)
            httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._serve_thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"fake-apiserver:{self.port}",
        )
        self._serve_thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        self._stop_listening()

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def api_client(self) -> ApiClient:
        """The sidecar's client pointed at this server, as a kubeconfig with no credentials would."""
        return ApiClient(self.url)

    def official_client(self) -> Any:
        """The official ``kubernetes`` package's client (a test dependency only) pointed here."""
        import kubernetes.client

        return kubernetes.client.ApiClient(kubernetes.client.Configuration(host=self.url))

    # -- state --

    @property
    def resource_version(self) -> str:
        with self._lock:
            return str(self._version)

    def apply(self, obj: Obj, *, emit: bool = True) -> Obj:
        """Create or replace an object (ADDED or MODIFIED).

        ``emit=False`` changes the store without a watch event: the change can only be
        learnt by listing, which is how a test proves a relist happened.
        """
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        key = (meta["namespace"], meta["name"])
        with self._lock:
            self._version += 1
            meta["resourceVersion"] = str(self._version)
            event_type = "MODIFIED" if key in self._objects else "ADDED"
            self._objects[key] = obj
            if emit:
                self._record(event_type, obj, meta["namespace"])
            return copy.deepcopy(obj)

    def delete(self, name: str, namespace: str = "default", *, emit: bool = True) -> None:
        with self._lock:
            obj = self._objects.pop((namespace, name))
            self._version += 1
            # A DELETED event carries the object at the version of its deletion.
            obj["metadata"]["resourceVersion"] = str(self._version)
            if emit:
                self._record("DELETED", obj, namespace)

    def _record(self, event_type: str, obj: Obj, namespace: str | None) -> None:
        self._events.append(_Event(self._version, event_type, copy.deepcopy(obj), namespace))
        self._lock.notify_all()

    # -- faults --

    def compact(self) -> None:
        """Forget history: a watch from any version older than now gets 410 Gone."""
        with self._lock:
            self._compacted = self._version
            self._events = [event for event in self._events if event.version > self._compacted]

    def expire_watches(self) -> None:
        """Send an ERROR 410 event into every open watch and end it; history is compacted too,
        so resuming from the last seen version fails the same way and only a relist recovers."""
        with self._lock:
            self._compacted = self._version
            self._events.clear()
            for session in self._sessions:
                session.inject_gone = True
            self._lock.notify_all()

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream, without ending the chunked body."""
        with self._lock:
            for session in self._sessions:
                session.dropped = True
                _abort(session.sock)
            self._lock.notify_all()

    def send_bookmark(self) -> None:
        """A BOOKMARK event carrying the current version, to watches that asked for them."""
        with self._lock:
            self._version += 1
            obj = {
                "kind": "EndpointSlice",
                "apiVersion": _API_VERSION,
                "metadata": {"resourceVersion": str(self._version)},
            }
            self._events.append(_Event(self._version, "BOOKMARK", obj, None))
            self._lock.notify_all()

    def go_down(self) -> None:
        """An outage: the port refuses new connections and every open one is cut."""
        self._stop_listening()

    def come_back(self) -> None:
        """End an outage: listen again on the same port."""
        if self._httpd is None and not self._closed:
            self.start()

    def _stop_listening(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            for session in self._sessions:
                session.dropped = True
            for conn in list(self._connections):
                _abort(conn)
            self._lock.notify_all()
        if self._serve_thread is not None:
            self._serve_thread.join()

    # -- introspection --

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._requests)

    def count(self, kind: str) -> int:
        """How many list or watch requests have been answered so far."""
        with self._lock:
            return sum(1 for request in self._requests if request.kind == kind)

    @property
    def open_watches(self) -> int:
        with self._lock:
            return len(self._sessions)

    # -- request handling (called from handler threads) --

    def _track(self, conn: socket.socket, *, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    def _list(self, namespace: str | None, selector: str) -> Obj:
        with self._lock:
            self._requests.append(RequestRecord("list", namespace, selector, ""))
            items = [copy.deepcopy(obj) for obj in self._objects.values() if _visible(obj, namespace, selector)]
            version = self._version
        return {
            "kind": "EndpointSliceList",
            "apiVersion": _API_VERSION,
            "metadata": {"resourceVersion": str(version)},
            "items": items,
        }

    def _open_watch(
        self,
        namespace: str | None,
        selector: str,
        version: str,
        timeout: float | None,
        bookmarks: bool,
    ) -> tuple[int, list[_Event], Obj | None]:
        """Start a watch: (cursor, initial events, 410 status if too old). It counts as open
        (and can be dropped) only once its response headers are out: see _register_watch."""
        with self._lock:
            self._requests.append(RequestRecord("watch", namespace, selector, version, timeout))
            if version in ("", "0"):
                # "Start at most recent": synthetic ADDED events for the current state.
                initial = [
                    _Event(self._version, "ADDED", copy.deepcopy(obj), obj["metadata"]["namespace"])
                    for obj in self._objects.values()
                ]
                cursor = self._version
            else:
                cursor = int(version)
                initial = []
                if cursor < self._compacted:
                    message = f"too old resource version: {cursor} ({self._compacted})"
                    return cursor, [], gone_status(message)
            return cursor, initial, None

    def _register_watch(
        self, namespace: str | None, selector: str, bookmarks: bool, sock: socket.socket
    ) -> _WatchSession:
        """A cut before the response headers would be "closed without response", which urllib3
        retries on its own at the same resourceVersion: not the mid-stream drop tests mean.
        Events are found by version (_next_events), so none is missed by registering late."""
        with self._lock:
            session = _WatchSession(namespace, selector, bookmarks, sock)
            self._sessions.append(session)
            return session

    def _next_events(self, session: _WatchSession, cursor: int, deadline: float) -> tuple[list[_Event], bool]:
        """Wait a little for something to send; returns (events, stream should end).

        The wait is short so that the caller can also notice a client that hung up:
        ``open_watches`` then drops as soon as the client closes, as tests expect.
        """
        with self._lock:
            self._lock.wait_for(
                lambda: (
                    session.dropped
                    or session.inject_gone
                    or time.monotonic() >= deadline
                    or any(event.version > cursor for event in self._events)
                ),
                timeout=min(_PEER_CHECK_SECONDS, max(0.0, deadline - time.monotonic())),
            )
            events = [event for event in self._events if event.version > cursor]
            done = session.dropped or session.inject_gone or time.monotonic() >= deadline
            return events, done

    def _close_watch(self, session: _WatchSession) -> None:
        with self._lock:
            if session in self._sessions:
                self._sessions.remove(session)


def _visible(obj: Obj, namespace: str | None, selector: str) -> bool:
    meta = obj.get("metadata", {})
    if namespace is not None and meta.get("namespace") != namespace:
        return False
    return selector_matches(selector, meta.get("labels") or {})


def _peer_closed(sock: socket.socket) -> bool:
    """True once the client has closed its end (a watch client sends nothing after its
    request, so a readable socket means EOF or a reset)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _abort(sock: socket.socket) -> None:
    """Cut a connection so that the peer sees it fail, not end cleanly."""
    with contextlib.suppress(OSError):  # already closed by the peer
        sock.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # come_back() rebinds the same port right after go_down()
    fake: FakeApiServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-answer is what these tests do on purpose; anything
        # else is a bug in the fake and gets the usual traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.fake._track(request, open_=True)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.fake._track(request, open_=False)
        super().shutdown_request(request)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked streams, as the real API server
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        fake = self.server.fake
        authorization = self.headers.get("Authorization")
        fake.authorizations.append(authorization)
        if fake.token is not None and authorization != f"Bearer {fake.token}":
            self._send_json(401, _status(401, "Unauthorized", "Unauthorized"))
            return
        url = urlsplit(self.path)
        match = _PATH.match(url.path)
        if match is None:
            self._send_json(404, _status(404, "NotFound", f"the server could not find {url.path}"))
            return
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        namespace = match["ns"]
        selector = query.get("labelSelector", "")
        if query.get("watch", "").lower() in ("true", "1"):
            timeout = float(query["timeoutSeconds"]) if "timeoutSeconds" in query else None
            bookmarks = query.get("allowWatchBookmarks", "").lower() == "true"
            self._watch(fake, namespace, selector, query.get("resourceVersion", ""), timeout, bookmarks)
        else:
            self._send_json(200, fake._list(namespace, selector))

    def _send_json(self, status: int, body: Obj) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _watch(
        self,
        fake: FakeApiServer,
        namespace: str | None,
        selector: str,
        version: str,
        timeout: float | None,
        bookmarks: bool,
    ) -> None:
        cursor, initial, gone = fake._open_watch(namespace, selector, version, timeout, bookmarks)
        if gone is not None and fake.gone_as_status:
            self._send_json(410, gone)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if gone is not None:
            self._chunk({"type": "ERROR", "object": gone})
            self._end_chunks()
            return
        session = fake._register_watch(namespace, selector, bookmarks, self.connection)
        try:
            self._stream(fake, session, cursor, initial, timeout)
        except OSError:
            self.close_connection = True  # the client went away or the server cut it
        finally:
            fake._close_watch(session)

    def _stream(
        self,
        fake: FakeApiServer,
        session: _WatchSession,
        cursor: int,
        initial: Iterable[_Event],
        timeout: float | None,
    ) -> None:
        deadline = time.monotonic() + (timeout if timeout is not None else _DEFAULT_WATCH_SECONDS)
        for event in initial:
            self._send_event(session, event)
        while True:
            events, done = fake._next_events(session, cursor, deadline)
            if session.dropped or (not events and not done and _peer_closed(session.sock)):
                self.close_connection = True
                return
            for event in events:
                self._send_event(session, event)
                cursor = event.version
            if session.inject_gone:
                self._chunk({"type": "ERROR", "object": gone_status("watch expired")})
            if done:
                self._end_chunks()
                return

    def _send_event(self, session: _WatchSession, event: _Event) -> None:
        if event.type == "BOOKMARK":
            if session.bookmarks:
                self._chunk({"type": "BOOKMARK", "object": event.obj})
        elif _visible(event.obj, session.namespace, session.selector):
            self._chunk({"type": event.type, "object": event.obj})

    def _chunk(self, event: Obj) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
