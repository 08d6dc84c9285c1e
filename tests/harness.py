"""A real stack for end-to-end tests: stand-in model servers, the sidecar, and Envoy."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import string
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from extproc.app import Runtime, Settings
from extproc.envoy.options import LIVE_SETTINGS, EnvoyOptions
from extproc.envoy.process import EnvoyProcess
from extproc.envoy.render.bootstrap import render, render_bootstrap
from extproc.policy import load_policy
from extproc.standin import StandIn, StandInFleet

_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now, never one this process was given before: the kernel may hand
    a just-released ephemeral port out again, and two settings given the same one collide."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def wait_for(condition: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02) -> Any:
    """Poll until condition() is truthy; fail with a clear message instead of sleeping and hoping."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class Sidecar:
    """The sidecar's Runtime on its own event loop thread."""

    def __init__(self, settings: Settings, runtime: Runtime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime or Runtime(settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sidecar", daemon=True)

    def start(self) -> Sidecar:
        self.thread.start()
        self.call(self.runtime.start())
        return self

    def call(self, coroutine: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def run(self, function: Callable[[], Any]) -> Any:
        """Run a plain function on the sidecar's loop (to read its state without races)."""

        async def wrapper() -> Any:
            return function()

        return self.call(wrapper())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.call(self.runtime.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def router(self):
        return self.runtime.router


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Stack:
    """Envoy on ``port`` -> sidecar -> stand-in replicas named in ``fleet``.

    Envoy runs as it does in the chart: from the static bootstrap, with the listener, routes and
    clusters the sidecar publishes in ``workdir/xds`` from the live policy, confirmed through
    Envoy's admin. ``envoy_options`` are EnvoyOptions fields: the live ones (LIVE_SETTINGS) go to
    the settings file the sidecar reloads with the policy (``settings_path``)."""

    workdir: Path
    policy_text: str
    replicas: list[StandIn]
    envoy_options: dict[str, Any] | Callable[[StandInFleet], dict[str, Any]] = field(default_factory=dict)
    sidecar_settings: dict[str, Any] = field(default_factory=dict)
    substitutions: dict[str, str] = field(default_factory=dict)
    discovery: Any = None
    # Edits the rendered Envoy config in place before Envoy starts: a setup extproc/envoy/render/ does
    # not generate (e.g. a gateway that sends every path to the router), so Envoy then runs that
    # one static config and the sidecar is not its control plane.
    envoy_config_hook: Callable[[dict[str, Any]], None] | None = None
    envoy_concurrency: int = 1  # Envoy's worker threads
    envoy_log_level: str = "warn"

    def __post_init__(self) -> None:
        self.fleet = StandInFleet(self.replicas)
        self.port = free_port()

    def start(self) -> Stack:
        self.fleet.start()
        self.config_path = self.workdir / "policy.yaml"
        addresses = {r.name: r.address for r in self.replicas}
        self.config_path.write_text(string.Template(self.policy_text).substitute(addresses, **self.substitutions))
        self.uds = str(self.workdir / "extproc.sock")
        self.xds_dir = self.workdir / "xds"
        self.settings_path = self.workdir / "envoy-settings.yaml"
        extra = self.envoy_options(self.fleet) if callable(self.envoy_options) else self.envoy_options
        live = {k: v for k, v in extra.items() if k in LIVE_SETTINGS}
        self.settings_path.write_text(orjson.dumps(live).decode())  # JSON is YAML
        xds = self.envoy_config_hook is None
        # A port found free may be taken (by any socket's ephemeral port) before Envoy binds it;
        # then the whole stack is started again on other ports.
        for attempt in range(3):
            try:
                self._start(extra, live, xds)
                return self
            except Exception as e:
                self._stop_proxy()
                if attempt < 2 and "Address already in use" in str(e):
                    self.port = free_port()
                    continue
                self.fleet.stop()
                raise
        raise AssertionError("unreachable")

    def _start(self, extra: dict[str, Any], live: dict[str, Any], xds: bool) -> None:
        admin = free_port()
        fixed = {k: v for k, v in extra.items() if k not in LIVE_SETTINGS}
        options = EnvoyOptions(
            listen_address="127.0.0.1",
            listen_port=self.port,
            admin_port=admin,
            extproc_uds=self.uds,
            xds_dir=str(self.xds_dir),
            **fixed,
        )
        settings = Settings(
            config=self.config_path,
            uds=self.uds,
            metrics_port=free_port(),
            metrics_address="127.0.0.1",
            **{"reload": False, **self.sidecar_settings},
        )
        if xds:
            settings.xds_dir = self.xds_dir
            settings.envoy = options
            settings.envoy_settings = self.settings_path
            settings.envoy_admin = f"127.0.0.1:{admin}"
        self.metrics_port = settings.metrics_port
        self.sidecar = Sidecar(settings, Runtime(settings, discovery=self.discovery)).start()
        if xds:
            config = render_bootstrap(options)
        else:
            config = render(load_policy(self.config_path), options.with_settings(live))
            assert self.envoy_config_hook is not None
            self.envoy_config_hook(config)
        self.envoy = EnvoyProcess(
            config, str(self.workdir), concurrency=self.envoy_concurrency, log_level=self.envoy_log_level
        )
        self.envoy.start()
        if xds:
            rejected = self.envoy.stats("listener_manager.lds.update_rejected")
            if rejected.get("listener_manager.lds.update_rejected"):  # the listener could not bind
                raise RuntimeError(f"Envoy's listener did not start:\n{self.envoy.log_tail()}")

    @property
    def envoy_config(self) -> dict[str, Any]:
        """The configuration Envoy runs: the static one, or the bootstrap with the resources the
        sidecar published inlined."""
        if self.envoy_config_hook is not None:
            return self.envoy.config
        from extproc.envoy.render.bootstrap import inline
        from extproc.xds import resources_of

        publisher = self.sidecar.runtime.publisher
        assert publisher is not None and publisher.published is not None
        return inline(resources_of(publisher.published), self.sidecar.runtime.envoy_options)

    def _stop_proxy(self) -> None:
        if hasattr(self, "envoy"):
            self.envoy.stop()
            del self.envoy
        if hasattr(self, "sidecar"):
            self.sidecar.stop()
            del self.sidecar

    def stop(self) -> None:
        self._stop_proxy()
        self.fleet.stop()

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def request(
        self,
        method: str,
        path: str,
        body: bytes | dict | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Response:
        raw = orjson.dumps(body) if isinstance(body, dict) else body
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            sent = {"content-type": "application/json", **(headers or {})} if raw is not None else dict(headers or {})
            connection.request(method, path, body=raw, headers=sent)
            response = connection.getresponse()
            return Response(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
        finally:
            connection.close()

    def post(
        self, body: bytes | dict, path: str = "/v1/chat/completions", headers: dict[str, str] | None = None
    ) -> Response:
        return self.request("POST", path, body, headers)

    def replica(self, response: Response) -> str:
        return response.headers.get("x-replica", "")

    def inflight(self) -> dict[str, int]:
        return self.sidecar.run(lambda: dict(self.sidecar.router.tracker.inflight))

    def metrics_text(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()


def chat(text: str, model: str = "auto", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


@contextlib.contextmanager
def stack(tmp_path: Path, policy_text: str, replica_names: list[str], **kwargs: Any) -> Iterator[Stack]:
    s = Stack(tmp_path, policy_text, [StandIn(name=n) for n in replica_names], **kwargs)
    with s:
        yield s
