"""Run a chart-rendered pod's containers on this machine, the way the kubelet would run them.

ConfigMap volumes become directories laid out as the kubelet writes them (``..data`` symlink to a
timestamped directory, one symlink per key), emptyDirs become shared directories, and each
container's image is replaced by its local equivalent: Envoy's binary for ``envoyproxy/envoy``,
and for our image its Dockerfile ENTRYPOINT (``extproc serve``), or the ``extproc`` command the
container names, from this virtualenv. Arguments are the rendered ones, with mount paths mapped
to those directories. Init containers run to completion, in order, before any other starts.
``terminate`` stops the pod as the kubelet does: each container's preStop hook, then its SIGTERM,
then SIGKILL at the end of the grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.envoy.process import envoy_binary
from tests.harness import wait_for
from tests.helm.chart import ROOT, Rendered


def dockerfile_entrypoint() -> list[str]:
    (line,) = [x for x in (ROOT / "Dockerfile").read_text().splitlines() if x.startswith("ENTRYPOINT ")]
    return json.loads(line.removeprefix("ENTRYPOINT "))


class ConfigMapVolume:
    """A ConfigMap volume as the kubelet's atomic writer lays it out."""

    def __init__(self, path: Path, data: dict[str, str]) -> None:
        self.path = path
        self.path.mkdir(parents=True)
        self.generation = 0
        self.data: dict[str, str] = {}
        self.update(data)
        for key in data:
            (self.path / key).symlink_to(Path("..data") / key)

    def update(self, data: dict[str, str]) -> None:
        """Write a new version of the whole ConfigMap (these keys changed) beside the old one and
        swap ..data to it in one rename."""
        self.data = {**self.data, **data}
        self.generation += 1
        version = self.path / f"..{self.generation:04d}"
        version.mkdir()
        for key, text in self.data.items():
            (version / key).write_text(text)
        link = self.path / "..data_tmp"
        link.symlink_to(version.name)
        link.replace(self.path / "..data")


class Pod:
    def __init__(self, rendered: Rendered, workdir: Path) -> None:
        self.rendered = rendered
        self.workdir = workdir
        self.volumes: dict[str, Path] = {}
        self.configmaps: dict[str, ConfigMapVolume] = {}
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, Any] = {}
        for volume in rendered.pod["volumes"]:
            name = volume["name"]
            if "configMap" in volume:
                data = rendered.one("ConfigMap", volume["configMap"]["name"])["data"]
                self.configmaps[name] = ConfigMapVolume(workdir / "volumes" / name, data)
                self.volumes[name] = self.configmaps[name].path
            else:
                self.volumes[name] = workdir / "volumes" / name
                self.volumes[name].mkdir(parents=True)

    def host_paths(self, container: dict[str, Any]) -> dict[str, Path]:
        """Mount path in the container -> directory here. A mount path that is already under the
        test's directory (set through values, e.g. sidecar.socketDir) is used as is, since
        configuration files name it too."""
        paths = {}
        for mount in container.get("volumeMounts", []):
            target = Path(mount["mountPath"])
            if self.workdir in target.parents:
                target.mkdir(parents=True, exist_ok=True)
                paths[mount["mountPath"]] = target
            else:
                paths[mount["mountPath"]] = self.volumes[mount["name"]]
        return paths

    def command(self, container: dict[str, Any]) -> list[str]:
        if container.get("command") == ["/usr/local/bin/envoy"]:
            entrypoint = [envoy_binary()]
        elif container.get("command"):
            program, *rest = container["command"]
            assert program == "extproc", container["command"]
            entrypoint = [str(Path(sys.executable).parent / program), *rest]
        else:
            program, *rest = dockerfile_entrypoint()
            entrypoint = [str(Path(sys.executable).parent / program), *rest]
        return [*entrypoint, *self._mapped(container, container.get("args", []))]

    def _mapped(self, container: dict[str, Any], args: list[str]) -> list[str]:
        mounts = self.host_paths(container)
        if not mounts:
            return list(args)
        # One pass, longest mount path first, so a mapped path is never mapped again.
        alternatives = "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
        pattern = re.compile(rf"(^|=)({alternatives})(?=/|$)")
        return [pattern.sub(lambda m: m.group(1) + str(mounts[m.group(2)]), a) for a in args]

    def hook_command(self, container: dict[str, Any], command: list[str]) -> list[str]:
        """An exec hook's command as it runs here: the shell from PATH, mount paths mapped."""
        program, *rest = command
        if program in ("/bin/bash", "/bin/sh"):
            found = shutil.which(Path(program).name)
            assert found, f"{program} is not installed here"
            program = found
        elif program == "extproc":
            program = str(Path(sys.executable).parent / program)
        return [program, *self._mapped(container, rest)]

    def init(self) -> None:
        """Run the pod's init containers to completion, as the kubelet does before the others."""
        for container in self.rendered.pod.get("initContainers", []):
            process = self.start(container["name"])
            code = process.wait(120)
            assert code == 0, f"init container {container['name']} exited with {code}:\n{self.log(container['name'])}"

    def start(self, name: str) -> subprocess.Popen[bytes]:
        container = self.rendered.container(name)
        env = {k: v for k, v in os.environ.items() if not k.startswith("EXTPROC_")}
        env.update({e["name"]: e["value"] for e in container.get("env", [])})
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        self._logs[name] = log
        process = subprocess.Popen(self.command(container), stdout=log, stderr=subprocess.STDOUT, env=env)
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")[-4000:]

    def port(self, container: str, name: str) -> int:
        return next(p["containerPort"] for p in self.rendered.container(container)["ports"] if p["name"] == name)

    # --- the kubelet's probes ----------------------------------------------------------------

    def grpc_probe(self, container: str, probe: str) -> bool:
        spec = self.rendered.container(container)[probe]["grpc"]
        with grpc.insecure_channel(f"127.0.0.1:{spec['port']}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                answer = stub.Check(health_pb2.HealthCheckRequest(service=spec.get("service", "")), timeout=2)
            except grpc.RpcError:
                return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    def http_probe(self, container: str, probe: str) -> bool:
        spec = self.rendered.container(container)[probe]["httpGet"]
        port = spec["port"] if isinstance(spec["port"], int) else self.port(container, spec["port"])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{spec['path']}", timeout=2) as response:
                return 200 <= response.status < 400
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def wait_ready(self, container: str, probe: str, check) -> None:
        def ready() -> bool:
            process = self.processes[container]
            if process.poll() is not None:
                raise AssertionError(f"{container} exited with {process.returncode}:\n{self.log(container)}")
            return check(container, probe)

        try:
            wait_for(ready, timeout=90, interval=0.1)
        except AssertionError as error:
            raise AssertionError(f"{container} not ready ({error}):\n{self.log(container)}") from None

    # --- the kubelet's stop -----------------------------------------------------------------

    def terminate(self, grace: float | None = None) -> dict[str, float]:
        """Stop the pod as the kubelet does when it is deleted: for every container at once, its
        preStop hook (run to completion), then SIGTERM to it, and SIGKILL to whatever still runs
        when the grace period (the pod's terminationGracePeriodSeconds) is over. Returns the
        seconds after the start at which each container's process had exited."""
        grace = float(self.rendered.pod["terminationGracePeriodSeconds"] if grace is None else grace)
        start = time.monotonic()
        deadline = start + grace
        exited: dict[str, float] = {}

        def stop_one(name: str) -> None:
            container = self.rendered.container(name)
            process = self.processes[name]
            hook = container.get("lifecycle", {}).get("preStop", {}).get("exec")
            if hook is not None:
                with open(self.workdir / f"{name}-prestop.log", "wb") as log:
                    runner = subprocess.Popen(
                        self.hook_command(container, hook["command"]), stdout=log, stderr=subprocess.STDOUT
                    )
                    try:
                        runner.wait(max(0.0, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        runner.kill()
                        runner.wait(5)
            process.terminate()
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            exited[name] = time.monotonic() - start

        running = [c["name"] for c in self.rendered.pod["containers"] if c["name"] in self.processes]
        threads = [threading.Thread(target=stop_one, args=(name,)) for name in running]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(grace + 30)
        return exited

    def hook_log(self, name: str) -> str:
        path = self.workdir / f"{name}-prestop.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for process in self.processes.values():
            process.terminate()
        for name, process in self.processes.items():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            with contextlib.suppress(Exception):
                self._logs[name].close()
        self.processes.clear()
