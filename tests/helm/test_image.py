"""Builds the Dockerfile with buildah and runs the image: optional, since it needs buildah, a base
image and the package index (minutes, not seconds).

Run with ``EXTPROC_IMAGE_TEST=1 python -m pytest tests/helm/test_image.py`` where buildah is
installed (Debian: ``apt-get install buildah``). No registry is needed: the base image is
``EXTPROC_TEST_BASE_IMAGE`` if given, else Debian bookworm's python3 made with debootstrap
(``apt-get install debootstrap``) and kept in buildah's storage for the next run. Behind a
TLS-inspecting proxy, the CA that pip is configured with is mounted into the build.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.helm.chart import ROOT

pytestmark = [
    pytest.mark.image,
    pytest.mark.skipif(
        os.environ.get("EXTPROC_IMAGE_TEST") != "1" or shutil.which("buildah") is None,
        reason="image build: set EXTPROC_IMAGE_TEST=1 where buildah is installed",
    ),
]

IMAGE = "localhost/extproc:test"
DEBIAN_BASE = "localhost/extproc-test-base:bookworm"
ENV = {**os.environ, "STORAGE_DRIVER": "vfs", "BUILDAH_ISOLATION": "chroot"}
CONTEXT = ["Dockerfile", ".dockerignore", "pyproject.toml", "README.md", "extproc", "deploy/image"]


def buildah(*args: str, check: bool = True, timeout: float = 1200) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["buildah", *args], env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        pytest.fail(f"buildah {' '.join(args)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def base_image() -> str:
    if given := os.environ.get("EXTPROC_TEST_BASE_IMAGE"):
        return given
    if buildah("images", "-q", DEBIAN_BASE, check=False).stdout.strip():
        return DEBIAN_BASE
    if shutil.which("debootstrap") is None:
        pytest.skip("no base image: set EXTPROC_TEST_BASE_IMAGE or install debootstrap")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        rootfs = Path(tmp, "rootfs")
        subprocess.run(
            [
                *("debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", "bookworm"),
                str(rootfs),  # from debootstrap's default Debian mirror
            ],
            check=True,
            capture_output=True,
            timeout=1800,
        )
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            shutil.rmtree(rootfs / cache, ignore_errors=True)
        archive = Path(tmp, "rootfs.tar")
        with tarfile.open(archive, "w") as tar:
            tar.add(rootfs, arcname=".")
        container = buildah("from", "scratch").stdout.strip()
        buildah("add", container, str(archive), "/")
        buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", container)
        buildah("commit", "-q", container, DEBIAN_BASE)
        buildah("rm", container)
    return DEBIAN_BASE


def pip_ca() -> str | None:
    """The CA bundle pip is configured with here, if any (a TLS-inspecting proxy's)."""
    configured = (
        os.environ.get("PIP_CERT")
        or subprocess.run(
            ["python3", "-m", "pip", "config", "get", "global.cert"], capture_output=True, text=True
        ).stdout.strip()
    )
    return configured if configured and Path(configured).is_file() else None


def build(context: Path, base: str) -> str:
    args = ["bud", "--layers", "--build-arg", f"PYTHON_IMAGE={base}", "-t", IMAGE]
    if ca := pip_ca():
        args += ["-v", f"{ca}:/etc/pip-ca.crt:ro", "--build-arg", "PIP_CERT=/etc/pip-ca.crt"]
    result = buildah(*args, str(context))
    return result.stdout + result.stderr


def copy_context(target: Path) -> Path:
    for name in CONTEXT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    context = copy_context(tmp_path_factory.mktemp("context"))
    base = base_image()
    first = build(context, base)
    # A code edit: the dependency layer comes from the cache.
    init = context / "extproc" / "__init__.py"
    init.write_text(init.read_text() + "\n# edited\n")
    second = build(context, base)
    yield {"first": first, "second": second}


@pytest.fixture
def container(built) -> Iterator[str]:
    name = buildah("from", IMAGE).stdout.strip()
    yield name
    buildah("rm", name, check=False)


def inspect() -> dict:
    return json.loads(buildah("inspect", "--type", "image", IMAGE).stdout)["OCIv1"]["config"]


def test_the_image_has_oci_labels_a_non_root_user_and_the_production_entrypoint(built) -> None:
    config = inspect()
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "extproc"
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["extproc", "serve"]
    assert "EXTPROC_CONFIG=/etc/extproc/policy.yaml" in config["Env"]


def test_a_code_edit_reuses_the_dependency_layer(built) -> None:
    lines = built["second"].splitlines()
    (step,) = [i for i, line in enumerate(lines) if "requirements.lock" in line and "RUN " in line]
    assert "Using cache" in "\n".join(lines[step : step + 3]), "\n".join(lines[step : step + 3])


def test_without_a_mounted_policy_the_image_refuses_to_start(container: str) -> None:
    result = buildah("run", container, "--", "extproc", "serve", check=False)
    assert result.returncode != 0
    assert "/etc/extproc/policy.yaml" in result.stdout + result.stderr


def test_the_runtime_holds_no_unused_dependencies_and_stays_small(container: str) -> None:
    script = (
        "import importlib.util as u; "
        "print([m for m in ('kubernetes', 'huggingface_hub', 'hf_xet', 'pydantic', 'aiohttp', 'pip') if u.find_spec(m)])"
    )
    assert buildah("run", container, "--", "python", "-c", script).stdout.strip() == "[]"
    megabytes = int(buildah("run", container, "--", "du", "-sm", "/opt/extproc").stdout.split()[0])
    assert megabytes < 300, megabytes  # 236 MB when written; the official Kubernetes client alone was 126


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_image_serves_a_mounted_policy_health_and_metrics(container: str, tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(
        "version: 1\ndefault_model: m\nmodels:\n  m: {replicas: {static: ['127.0.0.1:9']}}\n"
    )
    tmp_path.chmod(0o755)  # the image's user (uid 10001) reads it, as the kubelet's ConfigMap mount allows
    metrics, health = _free_port(), _free_port()
    process = subprocess.Popen(
        [
            *("buildah", "run", "-v", f"{tmp_path}:/etc/extproc:ro", container, "--", "extproc", "serve"),
            *(f"--metrics-port={metrics}", f"--health-listen=127.0.0.1:{health}", "--uds=/tmp/extproc.sock"),
        ],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with grpc.insecure_channel(f"127.0.0.1:{health}") as channel:
                    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if status.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, (
                process.stdout.read() if process.stdout else ""
            )
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert "extproc_config_last_reload_successful 1.0" in text
        assert "process_resident_memory_bytes" in text
    finally:
        process.terminate()
        process.wait(30)
