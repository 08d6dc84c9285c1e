"""Running the sidecar: gRPC on a Unix socket and/or TCP, health, metrics, config reloads."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import start_http_server

from extproc._pb.envoy.service.accesslog.v3 import als_pb2_grpc
from extproc.accesslog import AccessLogSink
from extproc.cache import SemanticCache
from extproc.cache import admin as cache_admin
from extproc.envoy.names import SOCKET
from extproc.envoy.options import EnvoyOptions, load_settings
from extproc.envoy.render.resources import Resources, render_resources
from extproc.listen import SocketClaim, bind_error, ensure_free
from extproc.metrics import Metrics
from extproc.policy import ConfigError, Policy, load_policy
from extproc.policy.load import DEFAULT_POLICY, Problem
from extproc.replicas.load import LoadTracker
from extproc.replicas.pool import Discovery
from extproc.replicas.scrape import LoadScraper
from extproc.router import Router, RouterState
from extproc.server import add_to_server as add_ext_proc_to_server
from extproc.signals.classifier import ClassifierSignal
from extproc.xds import EnvoyAdmin, Publisher

log = logging.getLogger("extproc.app")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"


@dataclass
class Settings:
    config: Path = DEFAULT_POLICY
    uds: str | None = SOCKET
    listen: str | None = None  # host:port for TCP (localhost unless you add TLS)
    health_listen: str | None = None  # host:port of a health-only gRPC server, for the kubelet's probe
    metrics_address: str = "0.0.0.0"
    metrics_port: int | None = 9090
    kubeconfig: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_client_ca: str | None = None
    reload: bool = True
    reload_debounce: float = 0.5
    shutdown_grace: float = 10.0
    lease_timeout: float = 660.0  # the longest a request may hold a replica (Envoy's upstream timeout + margin)
    max_message_bytes: int = 64 * 1024 * 1024
    extra_server_options: list[tuple[str, int]] = field(default_factory=list)
    # The sidecar as Envoy's control plane (extproc/xds.py): the listener, routes and clusters
    # rendered from the live policy are published in xds_dir, where Envoy's bootstrap points.
    xds_dir: Path | None = None
    # Envoy's options: the listener's address; the live settings file (read again with every
    # policy reload) overrides the rest.
    envoy: EnvoyOptions = field(default_factory=EnvoyOptions)
    envoy_settings: Path | None = None
    envoy_admin: str | None = None  # host:port of Envoy's admin, to confirm each update
    xds_timeout: float = 10.0  # how long Envoy may take to confirm one update
    # On SIGTERM, keep serving while the pod's Envoy drains (its preStop hook: the chart's
    # files/envoy-drain.sh), up to this many seconds, so requests in flight keep their ext_proc
    # stream and their access-log entries; 0 stops at once.
    wait_for_envoy: float = 0.0


class Runtime:
    """The sidecar's long-lived parts, and applying a (new) policy to them."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None, discovery: Discovery | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.discovery = discovery or Discovery(settings.kubeconfig)
        self.router: Router | None = None
        self._classifier_signal: ClassifierSignal | None = None
        self._async_classifier = None
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self._metrics_server: tuple | None = None  # (WSGI server, thread)
        self.loop_tasks = 0
        self.scraper: LoadScraper | None = None
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self._tasks: list[asyncio.Task[None]] = []
        self._socket: SocketClaim | None = None
        self._socket_bound = False  # the socket file is this process's: remove it on stop
        self.publisher: Publisher | None = None
        self.envoy_options = settings.envoy
        if settings.xds_dir is not None:
            self.envoy_options = replace(settings.envoy, xds_dir=str(settings.xds_dir))
            self.publisher = Publisher(
                settings.xds_dir, admin=settings.envoy_admin, metrics=self.metrics, timeout=settings.xds_timeout
            )
        self._resources: Resources | None = None
        self.cache: SemanticCache | None = None

    # --- policy ------------------------------------------------------------------------------

    async def apply(self, policy: Policy) -> None:
        """Build everything the policy needs, bring Envoy to it when the sidecar is Envoy's
        control plane, then swap it in at once. Raises ConfigError for a policy (or Envoy
        settings) Envoy cannot be configured for and xds.EnvoyRejected when Envoy refuses what
        it renders to; either way nothing changes."""
        resources, options = self._render(policy)
        store = self._store_for(policy)
        if policy.uses_classifier:
            await self._ensure_classifier(policy)
        cache, retired = await self._cache_for(policy)
        if self.router is None:
            state = await asyncio.to_thread(lambda: RouterState(policy, _pools(policy, self.discovery)))
        else:
            state = await asyncio.to_thread(self.router.build_state, policy)

        def switch() -> None:
            if self.router is None:
                self.router = Router(
                    state,
                    metrics=self.metrics,
                    classifier=self._classifier_signal,
                    discovery=self.discovery,
                    tracker=LoadTracker(self.settings.lease_timeout),
                )
                self._register_gauges(self.router)
                self.router.follow_kv_events()
            else:
                self.router.classifier = self._classifier_signal
                self.router.swap(state)
            if cache is not None:
                cache.reconfigure(policy.cache)
            self.router.cache = self.cache = cache
            if self._classifier_signal is not None:
                self._classifier_signal.timeout_seconds = policy.classifier.timeout_ms / 1000
                self._classifier_signal.pii_tokens = policy.classifier.pii_tokens
                self._classifier_signal.topic_tokens = policy.classifier.topic_tokens
            self.router.backends.store = store
            self._update_scrape_targets()
            self._retain_replica_series()
            self.metrics.config.info({"hash": policy.digest[:16]})

        if self.publisher is not None and resources is not None and self.server is not None:
            # Decisions made on the old policy reach Envoy's router within the ext_proc timeout.
            grace = _seconds(options.message_timeout)
            try:
                await self.publisher.publish(resources, switch=switch, grace=grace)
            except BaseException:
                if self.router is not None:  # let go of watchers only the refused policy opened
                    self.router.swap(self.router.state)
                if cache is not None and cache is not self.cache:  # (a cache only it would have used)
                    await cache.close()
                raise
        else:
            switch()  # before serving, resources are published once the addresses are claimed (start)
        self._resources = resources
        if retired is not None:
            await retired.close()

    async def _cache_for(self, policy: Policy) -> tuple[SemanticCache | None, SemanticCache | None]:
        """(the cache the policy uses, the one it retires). Entries survive a reload unless the
        backend or its bound changed."""
        current = self.cache
        if not policy.uses_cache:
            return None, current
        if current is not None and current.compatible(policy.cache, policy.store):
            return current, None  # its per-request settings change with the switch
        from extproc.store import StoreError

        try:
            cache = SemanticCache(policy.cache, self.metrics, shared=policy.store)
        except StoreError as exc:
            raise ConfigError(str(self.settings.config), [Problem(("store", "password"), str(exc))]) from None
        await cache.start()
        return cache, current

    def _store_for(self, policy: Policy):  # type: ignore[no-untyped-def]
        """The shared store the policy names (the one in use when its settings did not change)."""
        current = self.router.backends.store if self.router is not None else None
        if policy.store is None:
            return None
        if current is not None and current.settings == policy.store:
            return current
        from extproc.store import SharedStore, StoreError

        try:
            return SharedStore(policy.store)
        except StoreError as exc:
            raise ConfigError(str(self.settings.config), [Problem(("store",), str(exc))]) from None

    async def _sync_backends(self) -> None:
        """Read the cooldowns and ejections other routers shared (when the policy has a store)."""
        while True:
            router = self.router
            interval = 0.25
            if router is not None and router.backends.store is not None:
                policy = router.state.policy
                interval = policy.store.sync_interval if policy.store is not None else interval
                ids = [b.id for m in policy.models.values() for b in m.backends if b.provider is not None]
                await router.backends.sync(ids)
            await asyncio.sleep(interval)

    def _render(self, policy: Policy) -> tuple[Resources | None, EnvoyOptions]:
        """Envoy's resources for policy and the live settings (None unless publishing)."""
        options = self.envoy_options
        if self.publisher is None:
            return None, options
        if self.settings.envoy_settings is not None:
            options = options.with_settings(load_settings(self.settings.envoy_settings))
        try:
            return render_resources(policy, options), options
        except ValueError as exc:
            raise ConfigError(
                str(self.settings.config), [Problem((), f"Envoy cannot be configured for it: {exc}")]
            ) from None

    async def _ensure_classifier(self, policy: Policy) -> None:
        if self._classifier_signal is not None:
            return
        settings = policy.classifier
        try:
            from extproc.classifier import AsyncClassifier, Classifier
            from extproc.classifier.normalize import warm as warm_normalizer

            model = await asyncio.to_thread(Classifier.load, None, threads=settings.threads)
            await asyncio.to_thread(warm_normalizer)  # its tables, built once, not on a request
            self._async_classifier = AsyncClassifier(
                model,
                max_batch=settings.max_batch,
                max_wait_ms=settings.max_wait_ms,
                cache_size=settings.cache_size,
                on_batch=self._on_batch,
                workers=settings.workers,
            )
            self._classifier_signal = ClassifierSignal(
                self._async_classifier, settings.timeout_ms / 1000, settings.pii_tokens, settings.topic_tokens
            )
            log.info("classifier loaded")
        except Exception as exc:  # routing must work without it
            self.metrics.signal_failures.labels("classifier", "load").inc()
            log.error(
                "classifier could not be loaded (%s: %s); classifier conditions will not match", type(exc).__name__, exc
            )

    def _update_scrape_targets(self) -> None:
        """Scrape the /metrics of replicas whose model asks for it (replicas.metrics: true)."""
        assert self.router is not None
        state = self.router.state
        targets = {
            endpoint
            for name, model in state.policy.models.items()
            if model.replicas is not None and model.replicas.metrics
            for endpoint in state.pools.endpoints(name)
        }
        if targets and self.scraper is None:
            self.scraper = LoadScraper()
            self.scraper.start()
            self.router.set_load_reports(self.scraper.report)
        if self.scraper is not None:
            self.scraper.set_targets(targets)

    def _retain_replica_series(self) -> None:
        """Drop the per-replica series of replicas that left their pool (by reload or discovery)."""
        assert self.router is not None
        pools = self.router.state.pools
        self.metrics.retain_replicas({(m, e) for m in pools.models() for e in pools.endpoints(m)})

    def _on_batch(self, size: int, seconds: float) -> None:
        self.metrics.classifier_batch.observe(size)
        self.metrics.classifier_seconds.observe(seconds)

    def _register_gauges(self, router: Router) -> None:
        def inflight() -> list[tuple[tuple[str, ...], float]]:
            # Every pool member, idle ones at 0, so dashboards see the whole pool.
            counts = router.tracker.inflight
            pools = router.state.pools
            samples = [((name, e), float(counts[e])) for name in pools.models() for e in pools.endpoints(name)]
            known = {e for _, e in (labels for labels, _ in samples)}
            samples += [(("unknown", e), float(n)) for e, n in counts.items() if e not in known]  # left a pool
            return samples

        def ready() -> list[tuple[tuple[str, ...], float]]:
            pools = router.state.pools
            return [((m,), float(len(pools.endpoints(m)))) for m in pools.models()]

        def ejected() -> list[tuple[tuple[str, ...], float]]:
            pools, out = router.state.pools, router.health.ejected
            return [((m,), float(sum(1 for e in pools.endpoints(m) if e in out))) for m in pools.models()]

        metrics = self.metrics
        metrics.add_gauge(metrics.replica_inflight, inflight)
        metrics.add_gauge(metrics.ready_replicas, ready)
        metrics.add_gauge(metrics.ejected_replicas, ejected)
        metrics.add_gauge(
            metrics.backends_blocked, lambda: [((b, why), 1.0) for b, why in router.backends.current().items()]
        )
        metrics.add_gauge(metrics.event_loop_tasks, lambda: [((), float(self.loop_tasks))])
        metrics.add_gauge(metrics.kv_replicas, lambda: [(key, float(n)) for key, n in router.kv.modes().items()])
        metrics.add_gauge(metrics.admission_queued, lambda: [((n,), float(q)) for n, q in router.admission.queued()])
        metrics.add_gauge(
            metrics.cache_entries, lambda: [((), float(router.cache.entries if router.cache is not None else 0))]
        )

    # --- serving -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Claim the socket and the metrics port first (failing fast with AddressInUse, and never
        touching what another process serves), then build the router, then serve. A start that
        fails part way undoes what it did."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        settings = self.settings
        if settings.uds:
            self._socket = SocketClaim(Path(settings.uds))
            self._socket.acquire()
        if settings.metrics_port is not None:
            try:
                self._metrics_server = start_http_server(
                    settings.metrics_port, settings.metrics_address, registry=self.metrics.registry
                )
            except OSError as exc:
                raise bind_error("metrics port", f"{settings.metrics_address}:{settings.metrics_port}", exc) from None
        policy = await asyncio.to_thread(load_policy, settings.config)
        await self.apply(policy)
        self.metrics.reloads.labels("success").inc()
        self.metrics.last_reload.set_to_current_time()
        self.metrics.last_reload_ok.set(1)
        assert self.router is not None
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second sidecar on the same TCP port must fail, not share it
            *settings.extra_server_options,
        ]
        server = grpc.aio.server(options=options)
        add_ext_proc_to_server(self.router, server)
        cache_admin.add_to_server(server, lambda: self.cache)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(AccessLogSink(self.router), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        self.server = server
        if settings.uds:
            _bind(server, "socket", f"unix:{settings.uds}")
            self._socket_bound = True
        if settings.listen:
            credentials = self._tls_credentials() if settings.tls_cert and settings.tls_key else None
            _bind(server, "gRPC address", settings.listen, credentials)
        if self.publisher is not None and self._resources is not None:
            # Every address is ours now (a second sidecar never gets here), and Envoy must know the
            # clusters this policy routes to before the first request is answered.
            await self.publisher.publish(self._resources, grace=0)
        await server.start()
        if settings.health_listen:
            # Only the health service here: the probe port never exposes the processor itself.
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            _bind(self.health_server, "health address", settings.health_listen)
            await self.health_server.start()
        for service in ("", SERVICE_NAME):
            await _set_health(self.health, service, health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        self._tasks.append(asyncio.create_task(self._sync_backends()))
        if settings.reload:
            from extproc.policy.reload import ConfigWatcher

            heads = self.router.state.policy.head_files if self.router is not None else ()
            also = [settings.envoy_settings] if settings.envoy_settings is not None else []
            watcher = ConfigWatcher(
                settings.config, self, debounce=settings.reload_debounce, head_files=heads, also=also
            )
            self._tasks.append(asyncio.create_task(watcher.run()))
        log.info(
            "serving ext_proc on %s",
            ", ".join(filter(None, [f"unix:{settings.uds}" if settings.uds else None, settings.listen])),
        )

    def _tls_credentials(self) -> grpc.ServerCredentials:
        key = Path(self.settings.tls_key or "").read_bytes()
        cert = Path(self.settings.tls_cert or "").read_bytes()
        ca = Path(self.settings.tls_client_ca).read_bytes() if self.settings.tls_client_ca else None
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)

    async def _housekeeping(self) -> None:
        """Twice a second: end stale leases, let back ejected replicas whose time is up, sample
        the task count, follow pool changes."""
        assert self.router is not None
        probes: asyncio.Task[None] | None = None
        try:
            while True:
                await asyncio.sleep(0.5)
                self.router.tracker.expire()
                health = self.router.health
                if health.tracked:
                    health.retain(self.router.state.pools.all_endpoints())
                if health.ejected and (probes is None or probes.done()):  # a probe takes up to its timeout
                    probes = asyncio.create_task(health.probe_due())
                self.loop_tasks = len(asyncio.all_tasks())  # sampled on the loop; read by the metrics thread
                if self.scraper is not None:
                    self._update_scrape_targets()  # discovered pools change between reloads
                self.router.follow_kv_events()
                self._retain_replica_series()
        finally:
            if probes is not None:
                probes.cancel()

    async def stop(self) -> None:
        """Stop taking new streams, let open ones finish (up to the grace period), then close."""
        for service in ("", SERVICE_NAME):
            await _set_health(self.health, service, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.server is not None:
            await self.server.stop(self.settings.shutdown_grace)
            self.server = None
        if self.health_server is not None:
            await self.health_server.stop(0)
            self.health_server = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._async_classifier is not None:
            await self._async_classifier.aclose()
        if self.cache is not None:
            await self.cache.close()
            self.cache = None
        self.discovery.close()
        if self.router is not None:
            self.router.kv.close()
        if self.scraper is not None:
            self.scraper.stop()
        if self._metrics_server is not None:
            server, _thread = self._metrics_server
            server.shutdown()
            server.server_close()
            self._metrics_server = None
        if self._socket is not None:
            self._socket.release(remove_socket=self._socket_bound)  # only a socket this process made
            self._socket, self._socket_bound = None, False


def _bind(server: grpc.aio.Server, what: str, address: str, credentials: grpc.ServerCredentials | None = None) -> None:
    if not address.startswith("unix:"):
        ensure_free(what, address)
    try:
        if credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc says only "Failed to bind"; the address is the useful part
        raise bind_error(what, address, exc) from None


def _pools(policy: Policy, discovery: Discovery):
    from extproc.replicas.pool import Pools

    return Pools.build(policy, discovery)


def _seconds(duration: str) -> float:
    return float(duration.removesuffix("s"))


async def _set_health(servicer: object, service: str, status: int) -> None:
    result = servicer.set(service, status)  # type: ignore[attr-defined]
    if asyncio.iscoroutine(result):
        await result


# How long after its own SIGTERM the sidecar looks for Envoy to begin draining: the kubelet signals
# the sidecar and starts Envoy's preStop hook at the same moment, and the hook takes a moment to
# reach Envoy's admin. An Envoy still LIVE after this is not being stopped: only this container is.
DRAIN_START_SECONDS = 3.0


async def wait_for_envoy(admin: EnvoyAdmin, bound: float, poll: float = 0.25) -> str:
    """Wait while the pod's Envoy drains, until it has exited (its admin stops answering), it is
    found not draining, or ``bound`` seconds pass. Returns why the wait ended: gone, live, bound."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        state = await admin.state()
        elapsed = loop.time() - start
        if state is None:
            return "gone"
        if state == "LIVE" and elapsed >= min(DRAIN_START_SECONDS, bound):
            return "live"
        if elapsed >= bound:
            return "bound"
        await asyncio.sleep(poll)


async def serve(settings: Settings) -> None:
    runtime = Runtime(settings)
    await runtime.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if settings.wait_for_envoy > 0 and settings.envoy_admin:
        # Requests Envoy still holds need their ext_proc answer and their access-log entry (the
        # replica lease, usage, outlier detection) until Envoy exits. Readiness fails meanwhile
        # (liveness, the overall service, stays as it is).
        await _set_health(runtime.health, SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("stopping once Envoy has drained (at most %gs)", settings.wait_for_envoy)
        ended = await wait_for_envoy(EnvoyAdmin(settings.envoy_admin), settings.wait_for_envoy)
        log.info("Envoy %s", {"gone": "has exited", "live": "is not draining", "bound": "is still draining"}[ended])
    log.info("shutting down")
    await runtime.stop()
