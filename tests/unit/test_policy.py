"""Policy loading: schema, cross references, and errors that name the path, the line and the fix."""

from __future__ import annotations

import textwrap

import pytest

from extproc.policy import ConfigError, load_policy, parse_policy
from extproc.policy.config import PickingSettings
from extproc.policy.load import DEFAULT_POLICY
from extproc.replicas.picking import weights

BASE = """\
models:
  small: {}
  large:
    upstream_model: llama-70b
    pricing: {input_per_million: 1, output_per_million: 2}
default_model: small
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_policy(textwrap.dedent(text))
    return [str(p) for p in caught.value.problems]


def test_the_bundled_policy_is_valid() -> None:
    policy = load_policy(DEFAULT_POLICY)
    assert policy.default_model in policy.models
    assert policy.uses_classifier and policy.needs_pii


def test_defaults_fill_in_what_the_file_leaves_out() -> None:
    policy = parse_policy(BASE)
    assert policy.auto_models == {"auto"}
    assert policy.models["small"].cluster == "small" and policy.models["small"].upstream_model == "small"
    assert policy.models["large"].pricing.cost(1_000_000, 500_000) == pytest.approx(2.0)
    assert policy.decisions == () and not policy.uses_classifier


def test_picking_settings_from_yaml_keep_unset_defaults() -> None:
    picking = parse_policy(
        BASE
        + """\
picking:
  weights: {leader: 5, load: 1}
  load_bound: 0.3
  sticky_load_bound: null
  sticky_move_blocks: 20
"""
    ).picking
    assert picking.weights == {"leader": 5, "load": 1}
    resolved = weights(picking)  # `leader` is prefix_leader's alias; unset scorers keep their defaults
    assert (resolved["prefix_leader"], resolved["load"]) == (5, 1)
    assert (resolved["prefix"], resolved["session"], resolved["kv_cache"]) == (3.0, 4.0, 3.0)
    assert (picking.load_bound, picking.sticky_load_bound, picking.sticky_move_blocks) == (0.3, None, 20)
    assert parse_policy(BASE).picking == PickingSettings()


def test_unknown_model_reference_names_path_line_and_choices() -> None:
    found = problems(
        BASE
        + """\
decisions:
  - name: a
    model: small
  - name: b
    when: {keyword: [x]}
    model: gpt5
"""
    )
    assert found == ["decisions[1].model (line 12): 'gpt5' is not a configured model; configured: large, small"]


def test_typo_in_a_key_suggests_the_right_one() -> None:
    (found,) = problems(BASE + "decisons: []\n")
    assert found.startswith("decisons (line 7): unknown key 'decisons' (did you mean 'decisions'?)")


def test_condition_with_two_kinds_is_rejected_with_the_list_of_kinds() -> None:
    found = problems(
        BASE
        + """\
decisions:
  - name: a
    model: large
    when: {keyword: [x], regex: y}
"""
    )
    assert any("a condition has exactly one key" in p and "decisions[0].when" in p for p in found)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("decisions:\n  - name: a\n    model: large\n    when: {regex: '(unclosed'}\n", "invalid regular expression"),
        (
            "decisions:\n  - name: a\n    model: large\n    when: {tokens: {min: 10, max: 5}}\n",
            "min (10) must be below max (5)",
        ),
        ("decisions:\n  - name: a\n    model: large\n    when: {domain: [cooking]}\n", "'cooking' is not one of"),
        ("decisions:\n  - name: a\n    model: large\n  - name: a\n    model: small\n", "already used by decisions[0]"),
        ("decisions:\n  - name: a\n", "set exactly one of 'model' or 'split'"),
        ("auto_models: [small]\n", "both an auto name and a model"),
        ("unknown_models: passthrough\n", "required when unknown_models is 'passthrough'"),
        ("pii: {action: reroute}\n", "'reroute' needs the model"),
        ("pii: {action: block, model: large}\n", "only used with action 'reroute'"),
        ("limits: {max_body_bytes: 'big'}\n", "expected an integer, got a string"),
        (
            "classifier: {enabled: false}\ndecisions:\n  - name: a\n    model: large\n    when: {complexity: {above: 0.5}}\n",
            "is false, but some decisions test",
        ),
    ],
)
def test_mistakes_are_reported_with_a_fix(extra: str, fragment: str) -> None:
    found = problems(BASE + extra)
    assert any(fragment in p for p in found), found


def test_yaml_syntax_errors_and_duplicate_keys_have_lines() -> None:
    assert (
        "(line 2): not valid YAML (while parsing a flow mapping"
        in problems("models:\n  small: {\ndefault_model: small\n")[0]
    )
    found = problems(BASE + "default_model: large\n")
    assert found == ["default_model (line 7): duplicate key; YAML keeps only the last one, remove the other"]


def test_empty_and_missing_files() -> None:
    assert "empty" in problems("")[0]
    with pytest.raises(ConfigError, match="cannot read"):
        load_policy("/nonexistent/policy.yaml")


def test_decisions_run_by_priority_then_file_order() -> None:
    policy = parse_policy(
        BASE
        + """\
decisions:
  - {name: a, model: small}
  - {name: b, model: large, priority: 5}
  - {name: c, model: small, priority: 5}
"""
    )
    assert [d.name for d in policy.decisions] == ["b", "c", "a"]
