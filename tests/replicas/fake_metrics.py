"""Local HTTP servers that expose vLLM- or SGLang-style Prometheus metrics, and can be told
to fail, hang, or change their numbers."""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Noise around the samples that matter, as a real page has: histograms, counters, info.
_NOISE = """# HELP {p}:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE {p}:time_to_first_token_seconds histogram
{p}:time_to_first_token_seconds_bucket{{le="0.1",model_name="m"}} 3.0
{p}:time_to_first_token_seconds_bucket{{le="+Inf",model_name="m"}} 7.0
{p}:time_to_first_token_seconds_count{{model_name="m"}} 7.0
{p}:time_to_first_token_seconds_sum{{model_name="m"}} 1.25
# HELP {p}:prompt_tokens_total Number of prefill tokens processed.
# TYPE {p}:prompt_tokens_total counter
{p}:prompt_tokens_total{{model_name="m"}} 8128.0
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.5
"""


def _gauge(name: str, help_text: str, samples: Mapping[str, float]) -> str:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
    lines += [f'{name}{{model_name="{model}"}} {value!r}' for model, value in samples.items()]
    return "\n".join(lines) + "\n"


def vllm_metrics(
    waiting: Mapping[str, float],
    running: Mapping[str, float],
    kv_cache: Mapping[str, float],
    *,
    legacy: bool = False,
) -> str:
    """A vLLM page; values per model_name label. ``legacy`` uses gpu_cache_usage_perc, the
    name older builds used for the KV-cache fill."""
    kv_name = "vllm:gpu_cache_usage_perc" if legacy else "vllm:kv_cache_usage_perc"
    return (
        _NOISE.format(p="vllm")
        + _gauge("vllm:num_requests_running", "Number of requests in model execution batches.", running)
        + _gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", waiting)
        + _gauge(kv_name, "KV-cache usage. 1 means 100 percent usage.", kv_cache)
    )


def sglang_metrics(queue: float, running: float, token_usage: float) -> str:
    """An SGLang page, with one model_name label set as SGLang emits."""
    model = "meta-llama/Llama-3.1-8B-Instruct"
    return (
        _NOISE.format(p="sglang")
        + _gauge("sglang:token_usage", "The token usage", {model: token_usage})
        + _gauge("sglang:num_running_reqs", "The number of running requests", {model: running})
        + _gauge("sglang:num_queue_reqs", "The number of requests in the waiting queue", {model: queue})
    )


class MetricsServer:
    """Serves ``body`` at ``/metrics``; ``hang()`` makes it hold requests without answering,
    ``status`` makes it answer with an error."""

    def __init__(self, body: str = "", host: str = "127.0.0.1") -> None:
        self.body = body
        self.status = 200
        self._lock = threading.Lock()
        self._requests = 0
        self._open = 0
        self._release = threading.Event()
        self._release.set()
        self._httpd = _Server((host, 0), _Handler)
        self._httpd.fake = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> MetricsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._release.set()  # hung requests answer, so their threads end
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def endpoint(self) -> str:
        host, port = str(self._httpd.server_address[0]), self._httpd.server_address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def hang(self) -> None:
        """From now on, hold each request open without answering until ``release()``."""
        self._release.clear()

    def release(self) -> None:
        self._release.set()

    @property
    def requests(self) -> int:
        """Requests received so far, answered or not."""
        with self._lock:
            return self._requests

    @property
    def open_requests(self) -> int:
        """Requests received and not yet answered (held by ``hang()``)."""
        with self._lock:
            return self._open

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self._requests += 1
            self._open += 1
        try:
            self._release.wait()
            data = self.body.encode()
            handler.send_response(self.status)
            handler.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        finally:
            with self._lock:
                self._open -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: MetricsServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-answer is what these tests do on purpose; anything
        # else is a bug in the fake and gets the usual traceback.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def __init__(self, address: tuple[str, int], handler: Any) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.path != "/metrics":
            self.send_error(404)
            return
        self.server.fake._serve(self)
