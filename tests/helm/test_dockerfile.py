"""The Dockerfile builds the image the chart runs. No container engine runs here, so this checks
what can be checked without one; tests/helm/test_chart_pod.py runs its ENTRYPOINT with the
chart's arguments."""

from __future__ import annotations

import re
import tomllib

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


def test_installs_the_project_like_ci_without_extras_and_ships_only_the_venv() -> None:
    build, final = DOCKERFILE.split("\nFROM ${PYTHON_IMAGE}\n")
    assert "RUN /opt/extproc/bin/pip install .\n" in build
    assert "[" not in re.search(r"pip install (.*)", build).group(1)  # no test or train extra
    assert "Classifier.load" in build  # a missing model fails the build, not the pod
    copies = [line for line in final.splitlines() if line.startswith("COPY")]
    assert copies == ["COPY --from=build /opt/extproc /opt/extproc"]


def test_runs_as_the_non_root_user_the_chart_expects() -> None:
    (user,) = [line.split()[1] for line in INSTRUCTIONS if line.startswith("USER ")]
    uid, gid = (int(x) for x in user.split(":"))
    assert uid != 0 and gid != 0
    pod = render({}).pod["securityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"]) == (uid, gid)


def test_entrypoint_is_the_packages_serve_command() -> None:
    (entrypoint,) = [line for line in INSTRUCTIONS if line.startswith("ENTRYPOINT ")]
    assert entrypoint == 'ENTRYPOINT ["extproc", "serve"]'
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["extproc"] == "extproc.cli:main"


def test_build_context_holds_the_package_and_nothing_else() -> None:
    for path in [
        "pyproject.toml",
        "README.md",
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
        "extproc/__pycache__/app.cpython-311.pyc",
    ]:
        assert _ignored(path), path
    for line in INSTRUCTIONS:
        if line.startswith("COPY ") and "--from" not in line:
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists() and not _ignored(source), source
