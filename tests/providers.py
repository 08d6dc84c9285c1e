"""Stand-in hosted providers for tests: OpenAI-compatible HTTPS servers with certificates from a
CA made for the test (openssl), each recording what it received (SNI, Host, path, Authorization,
the body's model) and answering as told: ok, a stream, 429 with Retry-After, 500, a hang, or a
stream that breaks after its first chunk."""

from __future__ import annotations

import collections
import http.server
import json
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def make_ca(directory: Path, hosts: list[str]) -> tuple[Path, dict[str, tuple[Path, Path]]]:
    """A self-signed CA and, per host, a certificate for it (subjectAltName DNS:host)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca_cert),
        "-days", "2", "-subj", "/CN=extproc test CA")  # fmt: skip
    certs = {}
    for host in hosts:
        key, csr, cert, ext = (directory / f"{host}.{s}" for s in ("key", "csr", "pem", "ext"))
        ext.write_text(f"subjectAltName=DNS:{host}\nbasicConstraints=CA:FALSE\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={host}")
        run("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
        certs[host] = (cert, key)
    return ca_cert, certs


@dataclass
class Received:
    sni: str | None
    host: str
    path: str
    authorization: str | None
    model: str
    body: bytes
    headers: dict[str, str]


@dataclass
class Provider:
    """One stand-in provider on 127.0.0.1, serving TLS for ``host``."""

    host: str
    cert: Path
    key: Path
    mode: str = "ok"  # ok | 429 | 500 | hang | stream_break
    retry_after: str | None = None
    hang: float = 5.0
    received: collections.deque[Received] = field(default_factory=lambda: collections.deque(maxlen=500))
    port: int = 0

    def start(self) -> Provider:
        provider = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    model = json.loads(body).get("model", "")
                except ValueError:
                    model = "<invalid json>"
                provider.received.append(
                    Received(
                        getattr(self.connection, "sni", None),
                        self.headers.get("host", ""),
                        self.path,
                        self.headers.get("authorization"),
                        model,
                        body,
                        {k.lower(): v for k, v in self.headers.items()},
                    )
                )
                mode = provider.mode
                if mode == "429":
                    self._answer(
                        429, {"error": {"message": "rate limited", "type": "rate_limit"}}, provider.retry_after
                    )
                elif mode == "500":
                    self._answer(500, {"error": {"message": "upstream exploded"}})
                elif mode == "hang":
                    time.sleep(provider.hang)
                    self._answer(200, _completion(provider.host, model))
                elif mode == "stream_break":
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    chunk = b'data: {"choices":[{"delta":{"content":"hel"}}]}\n\n'
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                    time.sleep(0.2)
                    self.connection.shutdown(socket.SHUT_RDWR)  # dies mid-stream
                    self.close_connection = True
                else:
                    self._answer(200, _completion(provider.host, model))

            def _answer(self, status: int, doc: dict[str, Any], retry_after: str | None = None) -> None:
                raw = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(raw)))
                if retry_after is not None:
                    self.send_header("retry-after", retry_after)
                self.end_headers()
                self.wfile.write(raw)

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.cert), str(self.key))
        context.set_alpn_protocols(["http/1.1"])

        def remember_sni(sock: ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
            sock.sni = name  # type: ignore[attr-defined]

        context.sni_callback = remember_sni

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # type: ignore[no-untyped-def]
                pass  # Envoy gave up on a hung answer: the write fails, as it would for a real provider

            def get_request(self):  # type: ignore[no-untyped-def]
                sock, address = super().get_request()
                return context.wrap_socket(sock, server_side=True), address

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _completion(host: str, model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": f"hello from {host}"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
