"""The soak benchmark, shortened for CI: its own pass criteria must hold (exit 0)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.e2e
def test_short_soak_passes_its_criteria() -> None:
    result = subprocess.run(
        [sys.executable, "bench/soak.py", "--duration", "20", "--rate", "20"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[PASS] zero unexpected errors" in result.stdout
