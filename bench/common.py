"""Pieces the benchmark scripts share: the sidecar as its own process (and as its Envoy's control
plane), ports, resource use."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import orjson
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.envoy.options import LIVE_SETTINGS, EnvoyOptions
from extproc.envoy.process import EnvoyProcess
from extproc.envoy.render.bootstrap import render_bootstrap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SidecarProcess:
    """`extproc serve` in a subprocess, so its CPU and memory can be measured on their own. With
    ``envoy`` options it is that Envoy's control plane, as in the chart: it publishes the
    listener, routes and clusters in ``envoy.xds_dir`` (start Envoy with ``envoy_process``)."""

    def __init__(
        self,
        policy: Path,
        uds: Path,
        metrics_port: int,
        *,
        log_level: str = "warning",
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        envoy: EnvoyOptions | None = None,
    ) -> None:
        self.policy, self.uds, self.metrics_port = policy, uds, metrics_port
        self.cwd = cwd  # a checkout to run instead of the installed package (a same-run baseline)
        self.log_level = log_level
        self.env = {**os.environ, **(env or {})}
        self.envoy = envoy
        self.process: subprocess.Popen | None = None

    def _envoy_args(self) -> list[str]:
        if self.envoy is None:
            return []
        o = self.envoy
        settings = self.uds.with_name("envoy-settings.json")
        settings.write_bytes(orjson.dumps({k: getattr(o, k) for k in LIVE_SETTINGS}))
        return [
            "--xds-dir",
            o.xds_dir,
            "--envoy-settings",
            str(settings),
            "--envoy-listen",
            f"{o.listen_address}:{o.listen_port}",
            "--envoy-admin",
            f"127.0.0.1:{o.admin_port}",
        ]

    def start(self, timeout: float = 60.0) -> None:
        args = [
            sys.executable,
            "-m",
            "extproc.cli",
            "serve",
            "--config",
            str(self.policy),
            "--uds",
            str(self.uds),
            "--metrics-port",
            str(self.metrics_port),
            "--metrics-address",
            "127.0.0.1",
            "--no-reload",
            "--log-level",
            self.log_level,
            *self._envoy_args(),
        ]
        self.log = open(self.uds.with_suffix(".log"), "wb")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        deadline = time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor")
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sidecar exited: {self.uds.with_suffix('.log').read_text()[-2000:]}")
            try:
                with grpc.insecure_channel(f"unix:{self.uds}") as channel:
                    if health_pb2_grpc.HealthStub(channel).Check(request, timeout=1).status == 1:
                        return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError("sidecar did not become healthy")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss_mb(self) -> float:
        return process_rss_mb(self.pid)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the sidecar so far."""
        return process_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self.process = None
        self.log.close()


def envoy_process(sidecar: SidecarProcess, workdir: str, concurrency: int = 1) -> EnvoyProcess:
    """Envoy on the bootstrap that points at what the (started) sidecar publishes."""
    assert sidecar.envoy is not None
    return EnvoyProcess(render_bootstrap(sidecar.envoy), workdir, concurrency=concurrency)


def process_rss_mb(pid: int) -> float:
    """A process's resident memory now (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    """The CPU's model name, family and model numbers and the vector extensions onnxruntime may
    pick, for benchmark headers (a VM often shows only "AMD EPYC", which names no generation)."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first processor is enough
    except OSError:
        return platform.processor() or "unknown CPU"
    flags = set(fields.get("flags", "").split())
    isa = [
        name
        for name, flag in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("VNNI", "avx512_vnni"), ("AMX", "amx_tile"))
        if flag in flags
    ]
    return f"{fields.get('model name', 'unknown CPU')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}, {', '.join(isa) or 'no AVX2'})"
