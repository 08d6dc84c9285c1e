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
from extproc.envoy import EnvoyOptions, EnvoyProcess, render
from extproc.policy import load_policy
from extproc.standin import StandIn, StandInFleet


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    """Envoy on ``port`` -> sidecar -> stand-in replicas named in ``fleet``."""

    workdir: Path
    policy_text: str
    replicas: list[StandIn]
    envoy_options: dict[str, Any] | Callable[[StandInFleet], dict[str, Any]] = field(default_factory=dict)
    sidecar_settings: dict[str, Any] = field(default_factory=dict)
    substitutions: dict[str, str] = field(default_factory=dict)
    discovery: Any = None
    # Edits the rendered Envoy config in place before Envoy starts (a setup extproc/envoy.py
    # does not generate, e.g. a gateway that sends every path to the router).
    envoy_config_hook: Callable[[dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        self.fleet = StandInFleet(self.replicas)
        self.port = free_port()

    def start(self) -> Stack:
        self.fleet.start()
        self.config_path = self.workdir / "policy.yaml"
        addresses = {r.name: r.address for r in self.replicas}
        self.config_path.write_text(string.Template(self.policy_text).substitute(addresses, **self.substitutions))
        self.uds = str(self.workdir / "extproc.sock")
        settings = Settings(
            config=self.config_path,
            uds=self.uds,
            metrics_port=free_port(),
            metrics_address="127.0.0.1",
            **{"reload": False, **self.sidecar_settings},
        )
        self.metrics_port = settings.metrics_port
        self.sidecar = Sidecar(settings, Runtime(settings, discovery=self.discovery)).start()
        policy = load_policy(self.config_path)
        extra = self.envoy_options(self.fleet) if callable(self.envoy_options) else self.envoy_options
        # A port found free may be taken (by any socket's ephemeral port) before Envoy binds it:
        # then Envoy exits at once, and it is tried again on other ports.
        for attempt in range(3):
            options = EnvoyOptions(
                listen_address="127.0.0.1", listen_port=self.port, admin_port=free_port(), extproc_uds=self.uds, **extra
            )
            self.envoy_config = render(policy, options)
            if self.envoy_config_hook is not None:
                self.envoy_config_hook(self.envoy_config)
            self.envoy = EnvoyProcess(self.envoy_config, str(self.workdir))
            try:
                self.envoy.start()
                return self
            except Exception as e:
                if attempt < 2 and "Address already in use" in str(e):
                    self.port = free_port()
                    continue
                self.stop()
                raise
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if hasattr(self, "envoy"):
            self.envoy.stop()
        if hasattr(self, "sidecar"):
            self.sidecar.stop()
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
