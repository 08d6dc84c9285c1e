"""The Dockerfile builds the image the chart runs. These checks need no container engine;
tests/helm/test_image.py builds and runs the image with buildah (optional), and
tests/helm/test_chart_pod.py runs its ENTRYPOINT with the chart's arguments."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from tests.helm.chart import ROOT, render

DOCKERFILE = (ROOT / "Dockerfile").read_text()
INSTRUCTIONS = [line for line in DOCKERFILE.splitlines() if line and not line.startswith((" ", "#"))]


def _ignored(path: str) -> bool:
    """Docker's .dockerignore rules: patterns in order, the last match wins, '!' re-includes;
    a pattern matching a directory covers everything under it."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            ignored = not negate
    return ignored


def test_both_stages_use_the_slim_python_base() -> None:
    (default,) = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", DOCKERFILE, re.M)
    assert default == "python:3.11-slim"
    stages = [line for line in INSTRUCTIONS if line.startswith("FROM ")]
    assert stages == ["FROM ${PYTHON_IMAGE} AS build", "FROM ${PYTHON_IMAGE}"]


LOCK = ROOT / "deploy" / "image" / "requirements.lock"


def _pins(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, hashes) of a pip requirements file in the lock's format."""
    text = path.read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            requirement, *options = line.split()
            name, _, version = requirement.partition("==")
            pins[name] = (version, [o.removeprefix("--hash=sha256:") for o in options])
    return pins


def test_dependencies_come_from_the_lock_before_the_source_is_copied() -> None:
    build, final = DOCKERFILE.split("\nFROM ${PYTHON_IMAGE}\n")
    lock_install = build.index("--require-hashes --only-binary=:all: -r /tmp/lock/requirements.lock")
    assert build.index("COPY deploy/image/requirements.lock") < lock_install < build.index("COPY extproc")
    # The package itself adds no dependency of its own, and no extra.
    assert "pip install --no-deps /tmp/wheel/extproc-*.whl" in build
    assert "[" not in re.search(r"pip wheel (.*)", build).group(1)
    assert "Classifier.load" in build  # a missing model fails the build, not the pod
    copies = [line for line in final.splitlines() if line.startswith("COPY")]
    assert copies == ["COPY --from=build /opt/extproc /opt/extproc"]


def test_the_lock_pins_every_package_with_a_hash_and_satisfies_pyproject() -> None:
    from packaging.requirements import Requirement

    pins = _pins(LOCK)
    for name, (version, hashes) in pins.items():
        assert version and hashes and all(re.fullmatch(r"[0-9a-f]{64}", h) for h in hashes), name
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for text in project["project"]["dependencies"]:
        requirement = Requirement(text)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is a dependency but not in the lock: run deploy/image/lock.py"
        assert requirement.specifier.contains(pins[name][0]), f"{name}=={pins[name][0]} does not satisfy {text}"
    # What the package never imports stays out of the image (see deploy/image/lock.py).
    assert not {"kubernetes", "huggingface-hub", "hf-xet", "pydantic", "aiohttp"} & set(pins)
    build_pins = _pins(ROOT / "deploy" / "image" / "build-requirements.lock")
    for text in project["build-system"]["requires"]:
        requirement = Requirement(text)
        assert requirement.specifier.contains(build_pins[requirement.name][0])


def test_oci_labels_name_the_packages_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert re.search(rf"^ARG VERSION={re.escape(version)}$", DOCKERFILE, re.M)
    for label in ("title", "description", "version", "revision", "created", "licenses"):
        assert f"org.opencontainers.image.{label}=" in DOCKERFILE, label


def test_runs_as_the_non_root_user_the_chart_expects() -> None:
    (user,) = [line.split()[1] for line in INSTRUCTIONS if line.startswith("USER ")]
    uid, gid = (int(x) for x in user.split(":"))
    assert uid != 0 and gid != 0
    pod = render({}).pod["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (uid, gid)


def test_entrypoint_serves_the_policy_where_the_chart_mounts_it() -> None:
    (entrypoint,) = [line for line in INSTRUCTIONS if line.startswith("ENTRYPOINT ")]
    assert entrypoint == 'ENTRYPOINT ["extproc", "serve"]'
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["extproc"] == "extproc.cli:main"
    # No demo policy by default: the image reads the mounted file (and fails without one).
    (configured,) = re.findall(r"EXTPROC_CONFIG=(\S+)", DOCKERFILE)
    assert f"--config={configured}" in render({}).container("extproc")["args"]


def test_build_context_holds_the_package_and_nothing_else() -> None:
    for path in [
        "pyproject.toml",
        "README.md",
        "deploy/image/requirements.lock",
        "deploy/image/build-requirements.lock",
        "extproc/__init__.py",
        "extproc/policy/schema.json",
        "extproc/classifier/model/config.json",
    ]:
        assert not _ignored(path), path
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/harness.py",
        "bench/latency.py",
        "deploy/image/lock.py",
        "deploy/helm/extproc/values.yaml",
        "extproc/__pycache__/app.cpython-311.pyc",
    ]:
        assert _ignored(path), path
    for line in INSTRUCTIONS:
        if line.startswith("COPY ") and "--from" not in line:
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists() and not _ignored(source), source
