"""The README's second command, `extproc demo`: the bundled policy and model, real Envoy, no cluster."""

from __future__ import annotations

import pytest

from extproc.demo import run_demo


def test_demo_routes_every_sample_as_the_bundled_policy_says(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_demo() == 0  # every sample got the status it should
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if len(cells) >= 2 and cells[-1].replace(".", "").isdigit():
            label_end = next(i for i, c in enumerate(cells) if c.isdigit() and len(c) == 3)
            rows[" ".join(cells[:label_end])] = cells[label_end:]
    assert rows["code question"][1:2] == ["large"] and "code" in rows["code question"]
    assert "hard-stem" in rows["multi-step physics"]  # domain and complexity from the shipped encoder
    assert "premium-tier" in rows["premium user"]
    assert rows["contains an SSN"][1] == "private"  # PII reroute
    assert rows["session, turn 1"][2] == rows["session, turn 2"][2]  # same replica for the session
    assert rows["unknown model"][0] == "404" and rows["malformed JSON"][0] == "400"
