"""Knob paths into the policy YAML."""

from __future__ import annotations

import pytest
import yaml

from extproc.evaluation import knobs
from tests.eval.conftest import COMPLEXITY_POLICY

DATA = yaml.safe_load(COMPLEXITY_POLICY)


def test_decisions_can_be_indexed_by_name_or_position():
    assert knobs.get(DATA, "decisions[hard].when.all[1].complexity.above") == 0.5
    assert knobs.get(DATA, "decisions[1].when.all[1].complexity.above") == 0.5


def test_replacing_a_value_leaves_the_original_alone():
    changed = knobs.replaced(DATA, "decisions[hard].when.all[1].complexity.above", 0.25)
    assert knobs.get(changed, "decisions[hard].when.all[1].complexity.above") == 0.25
    assert knobs.get(DATA, "decisions[hard].when.all[1].complexity.above") == 0.5


def test_the_default_knob_is_the_first_complexity_threshold():
    assert knobs.default_knob(DATA) == "decisions[hard].when.all[1].complexity.above"


def test_a_policy_without_a_complexity_threshold_asks_for_a_knob():
    with pytest.raises(knobs.KnobError, match="--sweep"):
        knobs.default_knob({"decisions": [{"name": "x", "when": {"tokens": {"min": 5}}}]})


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("decisions[easy].when", "no item named 'easy'; named items: code, hard"),
        ("decisions[hard].when.any", "no key 'any'; keys here: all"),
        ("decisions[7].when", "index 7 is out of range"),
    ],
)
def test_a_wrong_path_says_what_is_there(path, message):
    with pytest.raises(knobs.KnobError, match=message.replace("[", r"\[")):
        knobs.get(DATA, path)
