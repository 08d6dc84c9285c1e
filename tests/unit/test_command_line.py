"""The command line: options and their environment variables, usage errors instead of crashes,
one-line errors for a cluster that is not there, and every policy the project ships checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from extproc.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES_POLICY = """
version: 1
default_model: small
models:
  small: {replicas: {kubernetes: {service: vllm, port: 8000}}}
"""


def serve_help() -> str:
    parser = build_parser()
    (serve,) = [a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" serve")]
    return serve.format_help()


def serve_options() -> list[str]:
    return [o for o in re.findall(r"^  (--[\w-]+)", serve_help(), re.M) if o != "--help"]


def test_every_serve_option_names_its_environment_variable() -> None:
    help_text = " ".join(serve_help().split())
    options = serve_options()
    assert len(options) == 18
    for option in options:
        described = re.search(rf"{option}\b.*?\((?:[^()]*; )?env (\w+)", help_text)
        assert described, f"{option} names no environment variable"


@pytest.mark.parametrize(
    ("env", "value", "attribute", "expected"),
    [
        ("EXTPROC_CONFIG", "/etc/extproc/policy.yaml", "config", Path("/etc/extproc/policy.yaml")),
        ("EXTPROC_UDS", "", "uds", ""),
        ("EXTPROC_LISTEN", "127.0.0.1:50051", "listen", "127.0.0.1:50051"),
        ("EXTPROC_HEALTH_LISTEN", "0.0.0.0:9091", "health_listen", "0.0.0.0:9091"),
        ("EXTPROC_METRICS_PORT", "9100", "metrics_port", 9100),
        ("EXTPROC_METRICS_ADDRESS", "127.0.0.1", "metrics_address", "127.0.0.1"),
        ("KUBECONFIG", "/k/config", "kubeconfig", "/k/config"),
        ("EXTPROC_TLS_CERT", "/tls/crt", "tls_cert", "/tls/crt"),
        ("EXTPROC_TLS_KEY", "/tls/key", "tls_key", "/tls/key"),
        ("EXTPROC_TLS_CLIENT_CA", "/tls/ca", "tls_client_ca", "/tls/ca"),
        ("EXTPROC_LEASE_TIMEOUT", "700", "lease_timeout", 700.0),
        ("EXTPROC_NO_RELOAD", "1", "no_reload", True),
        ("EXTPROC_LOG_LEVEL", "DEBUG", "log_level", "debug"),
        ("EXTPROC_XDS_DIR", "/etc/envoy", "xds_dir", Path("/etc/envoy")),
        ("EXTPROC_ENVOY_SETTINGS", "/etc/extproc/envoy.yaml", "envoy_settings", Path("/etc/extproc/envoy.yaml")),
        ("EXTPROC_ENVOY_LISTEN", "0.0.0.0:8000", "envoy_listen", "0.0.0.0:8000"),
        ("EXTPROC_ENVOY_ADMIN", "127.0.0.1:9901", "envoy_admin", "127.0.0.1:9901"),
        ("EXTPROC_WAIT_FOR_ENVOY", "615", "wait_for_envoy", 615.0),
    ],
)
def test_each_serve_option_reads_the_variable_its_help_names(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, attribute: str, expected: object
) -> None:
    assert f"env {env}" in " ".join(serve_help().split())
    monkeypatch.setenv(env, value)
    assert getattr(build_parser().parse_args(["serve"]), attribute) == expected


@pytest.mark.parametrize("source", ["flag", "env"])
def test_an_unknown_log_level_is_a_usage_error_not_a_crash(
    source: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--log-level", "verbose"] if source == "flag" else ["serve"]
    if source == "env":
        monkeypatch.setenv("EXTPROC_LOG_LEVEL", "verbose")
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "'verbose' is not a log level; use one of: debug, info, warning, error, critical" in capsys.readouterr().err


def _outside_a_cluster(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_")}
    env["KUBECONFIG"] = str(tmp_path / "no-kubeconfig")
    return env


@pytest.mark.parametrize("command", ["route", "serve"])
def test_a_kubernetes_policy_outside_a_cluster_is_one_clear_line(command: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(KUBERNETES_POLICY)
    request = tmp_path / "request.json"
    request.write_text('{"model": "auto", "messages": [{"role": "user", "content": "hi"}]}')
    argv = {
        "route": ["route", "--config", str(policy), str(request)],
        "serve": ["serve", "--config", str(policy), "--uds", str(tmp_path / "s.sock"), "--metrics-port", "0"],
    }[command]
    result = subprocess.run(
        [sys.executable, "-m", "extproc.cli", *argv],
        env=_outside_a_cluster(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if not line.startswith('{"ts"')]  # JSON log lines
    assert errors == [
        f"extproc {command}: cannot configure the Kubernetes client: no kubeconfig at {tmp_path / 'no-kubeconfig'} "
        "(outside a cluster, pass --kubeconfig or set KUBECONFIG)"
    ]
    assert "Traceback" not in result.stderr


def test_check_config_reports_schema_and_reference_mistakes_in_one_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\n"
        "default_model: smal\n"
        "models:\n"
        "  small: {replicas: {static: ['10.0.0.1']}}\n"
        "decisions:\n"
        "  - {name: a, when: {tokens: {min: many}}, model: small}\n"
        "  - {name: b, model: larg}\n"
    )
    assert main(["check-config", str(policy)]) == 1
    err = capsys.readouterr().err
    assert "models.small.replicas.static[0] (line 4): '10.0.0.1' does not match" in err  # schema
    assert "decisions[0].when.tokens.min (line 6): expected an integer" in err  # schema
    assert "default_model (line 2): 'smal' is not a configured model (did you mean 'small'?)" in err  # reference
    assert "decisions[1].model (line 7): 'larg' is not a configured model" in err  # reference


def _readme_policy() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"## Routing policy reference.*?\n```yaml\n(.*?)\n```\n", text, re.S).group(1)


SHIPPED = sorted(
    str(p.relative_to(ROOT))
    for pattern in ("extproc/**/*.yaml", "deploy/helm/extproc/files/*.yaml")
    for p in ROOT.glob(pattern)
    if "default_model:" in p.read_text()
)


@pytest.mark.parametrize("path", [*SHIPPED, "README.md#routing-policy-reference"])
def test_every_policy_the_project_ships_passes_check_config(
    path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if path.startswith("README.md"):
        file = tmp_path / "readme.yaml"
        file.write_text(_readme_policy())
    else:
        file = ROOT / path
    assert main(["check-config", str(file)]) == 0, capsys.readouterr().err


def test_the_shipped_policies_include_the_charts_example() -> None:
    assert "deploy/helm/extproc/files/routing-example.yaml" in SHIPPED
    assert "extproc/policy/default.yaml" in SHIPPED
