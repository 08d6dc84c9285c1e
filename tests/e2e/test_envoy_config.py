"""The Envoy configuration we ship and generate passes Envoy's own validation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from extproc.envoy.options import EnvoyOptions
from extproc.envoy.process import validate
from extproc.envoy.render.bootstrap import render
from extproc.policy import load_policy
from extproc.policy.load import DEFAULT_POLICY

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "deploy" / "envoy" / "envoy.yaml"
REGENERATE = [sys.executable, "-m", "extproc.cli", "envoy-config", "--cluster-endpoint", "private=127.0.0.1:18301"]


def test_shipped_envoy_yaml_is_what_the_generator_writes() -> None:
    fresh = subprocess.run(REGENERATE, capture_output=True, text=True, check=True).stdout
    assert SHIPPED.read_text() == fresh, f"deploy/envoy/envoy.yaml is stale; regenerate: {' '.join(REGENERATE[1:])}"


def test_shipped_envoy_yaml_passes_envoy_validate() -> None:
    result = subprocess.run(
        ["envoy", "--mode", "validate", "-c", str(SHIPPED), "-l", "error"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "options",
    [
        EnvoyOptions(two_round_trips=True, cluster_endpoints={"private": ["10.0.0.9:8000"]}),
        EnvoyOptions(
            extproc_uds=None,
            extproc_address=("127.0.0.1", 50051),
            usage=False,
            cluster_endpoints={"private": ["private.llm.svc.cluster.local:8000"]},
        ),
    ],
    ids=["two-round-trips", "tcp-no-usage-dns"],
)
def test_generated_variants_pass_envoy_validate(options: EnvoyOptions, tmp_path: Path) -> None:
    ok, output = validate(render(load_policy(DEFAULT_POLICY), options), str(tmp_path))
    assert ok, output
