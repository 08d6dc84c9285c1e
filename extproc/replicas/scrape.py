"""Optional background scraping of the model servers' own load (Prometheus ``/metrics``).

vLLM and SGLang report their queue, running batch and KV-cache fill; the load scorer
prefers them to the router's own in-flight count when they are fresh. Scraping runs off
the request path: a scheduler thread hands each target to a small thread pool once per
interval, every scrape has a hard deadline, and a target still being scraped is skipped,
so one slow replica can never delay the others or pile up work.
"""

from __future__ import annotations

import http.client
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from statistics import fmean

from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger("extproc.replicas")

# Per signal, the metric names in order of preference: the first one a server exposes
# is used. vLLM renamed gpu_cache_usage_perc to kv_cache_usage_perc (both are 0..1
# despite "perc"); SGLang's token_usage is the fraction of its KV token pool in use.
WAITING_METRICS = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
RUNNING_METRICS = ("vllm:num_requests_running", "sglang:num_running_reqs")
KV_CACHE_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
_WANTED = frozenset(WAITING_METRICS + RUNNING_METRICS + KV_CACHE_METRICS)
_PREFIXES = tuple(sorted({name.split(":", 1)[0] + ":" for name in _WANTED}))

# vLLM's exposition with all its histograms is a few hundred KiB; more is not a metrics page.
_MAX_BODY_BYTES = 8 << 20
_READ_SIZE = 64 << 10


class ScrapeError(Exception):
    """One scrape failed: the target answered badly, too slowly, or not at all."""


@dataclass(frozen=True, slots=True)
class LoadReport:
    """One replica's load as it last reported it; None where it does not expose a signal."""

    waiting: float | None  # queue length
    running: float | None
    kv_cache_usage: float | None  # 0..1
    scraped_at: float  # time.monotonic()


# --- parsing -------------------------------------------------------------------------------


def parse_load(text: str, scraped_at: float) -> LoadReport:
    """Read the load signals from a Prometheus text exposition.

    Request counts are summed across label sets (one per model name or engine);
    KV-cache usage is a fraction per cache, so it is averaged instead, which keeps
    it in 0..1. Raises ValueError on a malformed exposition.
    """
    values: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(_relevant_lines(text)):
        for sample in family.samples:
            if sample.name in _WANTED and not math.isnan(sample.value):
                values.setdefault(sample.name, []).append(float(sample.value))
    kv_cache = _first_present(values, KV_CACHE_METRICS, fmean)
    return LoadReport(
        waiting=_first_present(values, WAITING_METRICS, sum),
        running=_first_present(values, RUNNING_METRICS, sum),
        kv_cache_usage=None if kv_cache is None else min(1.0, max(0.0, kv_cache)),
        scraped_at=scraped_at,
    )


def _relevant_lines(text: str) -> str:
    """Only the samples we read: the full page is mostly histograms, and parsing them all
    once per second per replica would cost CPU the request path needs."""
    return "\n".join(
        line
        for line in text.splitlines()
        if line.startswith(_PREFIXES) and line.split("{", 1)[0].split(None, 1)[0] in _WANTED
    )


def _first_present(
    values: dict[str, list[float]],
    names: Sequence[str],
    combine: Callable[[list[float]], float],
) -> float | None:
    for name in names:
        if values.get(name):
            return combine(values[name])
    return None


# --- fetching ------------------------------------------------------------------------------


def fetch_metrics(endpoint: str, path: str, timeout: float) -> str:
    """GET ``http://{endpoint}{path}`` within ``timeout`` seconds in total.

    ``endpoint`` is ``ip:port`` or ``[ipv6]:port``. The deadline covers connecting,
    waiting for the response and reading the body: a server that trickles bytes is
    cut off like one that never answers.
    """
    deadline = time.monotonic() + timeout
    connection = http.client.HTTPConnection(endpoint, timeout=timeout)
    try:
        connection.request(
            "GET",
            path,
            headers={
                "Accept": "text/plain;version=0.0.4",  # not OpenMetrics: one format to parse
                "Accept-Encoding": "identity",
                "Connection": "close",
            },
        )
        _arm(connection, deadline)
        response = connection.getresponse()
        if response.status != 200:
            raise ScrapeError(f"HTTP {response.status} {response.reason}")
        return _read_body(connection, response, deadline).decode("utf-8", errors="replace")
    except TimeoutError as exc:
        raise ScrapeError(f"no complete answer within {timeout:g}s") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise ScrapeError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        connection.close()


def _arm(connection: http.client.HTTPConnection, deadline: float) -> None:
    """Let the next socket operation wait only for what is left of the deadline."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    if connection.sock is not None:
        connection.sock.settimeout(remaining)


def _read_body(connection: http.client.HTTPConnection, response: http.client.HTTPResponse, deadline: float) -> bytes:
    body = bytearray()
    while True:
        _arm(connection, deadline)
        chunk = response.read1(_READ_SIZE)  # at most one socket read, so the deadline holds
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > _MAX_BODY_BYTES:
            raise ScrapeError(f"metrics page larger than {_MAX_BODY_BYTES} bytes")


# --- the scraper ---------------------------------------------------------------------------


class LoadScraper:
    """Scrapes every target's ``/metrics`` once per ``interval`` in the background.

    ``report()`` is what the picker calls on the request path: a dictionary lookup, no
    lock, no I/O. A report older than ``stale_after`` (a target that stopped answering)
    reads as None, so stale load never steers traffic.
    """

    def __init__(
        self,
        *,
        interval: float = 1.0,
        timeout: float = 0.5,
        stale_after: float = 5.0,
        path: str = "/metrics",
        max_workers: int = 8,
    ) -> None:
        if interval <= 0 or timeout <= 0 or stale_after <= 0 or max_workers < 1:
            raise ValueError("interval, timeout, stale_after and max_workers must be positive")
        if not path.startswith("/"):
            raise ValueError(f"metrics path must start with '/': {path!r}")
        self._interval = interval
        self._timeout = timeout
        self._stale_after = stale_after
        self._path = path
        self._max_workers = max_workers
        self._lock = threading.Lock()
        self._targets: frozenset[str] = frozenset()
        # Written under the lock, read without it: a dict lookup is atomic, and only
        # whole LoadReport values are ever stored.
        self._reports: dict[str, LoadReport] = {}
        self._in_flight: set[str] = set()
        self._failing: set[str] = set()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    # -- public API --

    def set_targets(self, endpoints: Iterable[str]) -> None:
        """Replace the set of ``ip:port`` targets; reports of removed ones are dropped now."""
        targets = frozenset(endpoints)
        with self._lock:
            self._targets = targets
            for endpoint in self._reports.keys() - targets:
                del self._reports[endpoint]
            self._failing &= targets

    def report(self, endpoint: str) -> LoadReport | None:
        """The target's last load, or None if never scraped, removed, or stale."""
        report = self._reports.get(endpoint)
        if report is None or time.monotonic() - report.scraped_at > self._stale_after:
            return None
        return report

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("LoadScraper.start() called twice")
        self._pool = ThreadPoolExecutor(self._max_workers, thread_name_prefix="extproc-scrape")
        self._thread = threading.Thread(target=self._run, name="extproc-scrape-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop scheduling and return without waiting for scrapes in progress: each one
        ends by its own deadline and its result is thrown away."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the loop --

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._schedule_round()
            self._stopping.wait(self._interval)

    def _schedule_round(self) -> None:
        assert self._pool is not None
        with self._lock:
            # A target whose last scrape has not finished is skipped, not queued again:
            # a hanging replica holds one worker at most, until its deadline.
            due = self._targets - self._in_flight
            self._in_flight |= due
        for endpoint in sorted(due):
            try:
                self._pool.submit(self._scrape, endpoint)
            except RuntimeError:  # the pool shut down under us: stop() is under way
                return

    def _scrape(self, endpoint: str) -> None:
        try:
            if self._stopping.is_set():
                return
            text = fetch_metrics(endpoint, self._path, self._timeout)
            report = parse_load(text, time.monotonic())
        except (ScrapeError, ValueError) as exc:
            self._note_failure(endpoint, exc)
        else:
            self._store(endpoint, report)
        finally:
            with self._lock:
                self._in_flight.discard(endpoint)

    def _store(self, endpoint: str, report: LoadReport) -> None:
        with self._lock:
            if endpoint not in self._targets or self._stopping.is_set():
                return  # removed while the scrape was in flight: keep it dropped
            self._reports[endpoint] = report
            recovered = endpoint in self._failing
            self._failing.discard(endpoint)
        if recovered:
            logger.info("load scrape of %s recovered", endpoint)

    def _note_failure(self, endpoint: str, exc: Exception) -> None:
        # The previous report is kept: it ages out by stale_after on its own.
        if self._stopping.is_set():
            return  # a scrape cut by stop(): nothing to report, and the logs may be closed already
        with self._lock:
            first = endpoint in self._targets and endpoint not in self._failing
            if first:
                self._failing.add(endpoint)
        # One warning when a target starts failing, not one per interval.
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "load scrape of %s%s failed: %s",
            endpoint,
            self._path,
            exc,
        )
