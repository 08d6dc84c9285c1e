"""The soak benchmark with its attack mix, shortened for CI: its criteria that a short run can judge hold."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_short_soak_with_an_attack_mix_passes_its_criteria() -> None:
    # Clean and attack windows alternate (4 s each, 10% hostile in the attack ones). The p99 and
    # the RSS criteria need the full run's samples; here the ones that hold on any run must pass.
    result = subprocess.run(
        [sys.executable, "bench/soak.py", "--duration", "12", "--rate", "20", "--attack", "0.1", "--window", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = result.stdout
    for criterion in (
        "zero unexpected errors",
        "every hostile request got its documented answer",
        "in-flight back to zero",
        "no task growth",
    ):
        assert f"[PASS] {criterion}" in out, out[-3000:] + result.stderr[-3000:]
    assert "hostile requests: 0" not in out and "normal requests, attack windows: 0 " not in out
