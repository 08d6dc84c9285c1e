"""Every default is written once, in the code (the settings dataclasses, the plugin registry,
the condition kinds); the policy schema's `default`s, the chart's copy of that schema and the
README's policy reference are checked against it here."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.policy import conditions, parse_policy
from extproc.policy.backends import FallbackSettings, Provider, StoreSettings
from extproc.policy.config import (
    Admission,
    CacheSettings,
    ClassifierSettings,
    Decision,
    DecisionCache,
    HeaderNames,
    KvEvents,
    OutlierDetection,
    PickingSettings,
    PiiPolicy,
    Policy,
    Priority,
    Replicas,
    SessionSettings,
    default_of,
)
from extproc.policy.load import schema
from extproc.replicas import picking

ROOT = Path(__file__).resolve().parents[2]
DURATION = re.compile(r"^(\d+(?:\.\d+)?)s$")

# Schema objects and the dataclass whose fields they set: (where in the schema, class, schema
# key -> field name where they differ, keys that are not a field of that class).
SECTIONS: list[tuple[tuple[str, ...], type, dict[str, str], set[str]]] = [
    (
        ("properties",),
        Policy,
        {},
        {
            "version",
            "default_model",
            "limits",
            "debug",
            "admission",
            "sessions",
            "headers",
            "cost",
            "classifier",
            "picking",
            "pii",
            "models",
            "heads",
            "decisions",
            "cache",
            "providers",
            "fallback",
            "store",
        },
    ),
    (("properties", "limits"), Policy, {}, set()),
    (("properties", "debug"), Policy, {}, set()),
    (("properties", "admission"), Admission, {}, set()),
    (("properties", "admission", "properties", "priorities", "items"), Priority, {}, {"name", "values"}),
    (("properties", "sessions"), SessionSettings, {}, set()),
    (("properties", "headers"), HeaderNames, {}, set()),
    (("properties", "classifier"), ClassifierSettings, {}, set()),
    (("$defs", "picking"), PickingSettings, {}, {"outlier_detection"}),
    (("$defs", "outlier_detection"), OutlierDetection, {}, set()),
    (("$defs", "pii_policy"), PiiPolicy, {}, set()),
    (("$defs", "replicas"), Replicas, {}, set()),
    (("$defs", "replicas", "properties", "kv_events"), KvEvents, {}, set()),
    (("$defs", "decision"), Decision, {}, {"cache"}),
    (("properties", "cache"), CacheSettings, {}, set()),
    (("properties", "fallback"), FallbackSettings, {}, set()),
    (("properties", "store"), StoreSettings, {}, set()),
    (("$defs", "provider"), Provider, {}, set()),
    (("$defs", "decision", "properties", "cache", "oneOf", 1), DecisionCache, {}, set()),
]


def _node(path: tuple[str, ...]) -> dict[str, Any]:
    node: Any = schema()
    for key in path:
        node = node[key]
    return node if path == ("properties",) else node["properties"]


def _as_code(value: Any, default: Any) -> Any:
    """A schema default in the form the code holds it: durations in seconds, sets for lists."""
    if isinstance(value, str) and DURATION.match(value) and isinstance(default, float):
        return float(value[:-1])
    if isinstance(value, list) and isinstance(default, frozenset | tuple):
        return type(default)(value)
    return value


@pytest.mark.parametrize(
    ("path", "cls", "renamed", "not_fields"),
    SECTIONS,
    ids=lambda v: "/".join(map(str, v)) if isinstance(v, tuple) else None,
)
def test_the_schemas_defaults_are_the_codes(
    path: tuple[str, ...], cls: type, renamed: dict[str, str], not_fields: set[str]
) -> None:
    checked = 0
    for key, spec in _node(path).items():
        if key in not_fields or key == "weights":  # weights: the registry's (test_picking.py)
            continue
        name = renamed.get(key, key)
        if "default" in spec:
            code = default_of(cls, name)
            assert _as_code(spec["default"], code) == code, f"{'/'.join(map(str, path))}.{key}"
            checked += 1
        else:
            # A setting the schema gives no default for has none in the code either (None: unset),
            # or one the loader computes (documented in the description).
            try:
                code = default_of(cls, name)
            except LookupError:
                continue
            assert code in (None, (), "") or "default" in spec.get("description", "").lower(), (
                f"{'/'.join(map(str, path))}.{key}: the code defaults to {code!r}, the schema says nothing"
            )
    assert checked or path == ("$defs", "replicas", "properties", "kv_events")


def test_the_scorer_weights_and_the_condition_kinds_are_the_registered_ones() -> None:
    declared = schema()["$defs"]["condition"]
    assert list(declared["properties"]) == list(conditions.KINDS)
    assert declared["description"] == "Exactly one of: " + ", ".join(conditions.KINDS) + "."
    weights = schema()["$defs"]["picking"]["properties"]["weights"]["properties"]
    assert {k: v["default"] for k, v in weights.items() if "default" in v} == picking.default_weights()


def test_the_condition_builders_defaults_are_the_schemas() -> None:
    kinds = schema()["$defs"]["condition"]["properties"]
    keyword = conditions.build({"keyword": ["x"]})
    keyword_spec = kinds["keyword"]["oneOf"][1]["properties"]
    assert keyword.case_sensitive == keyword_spec["case_sensitive"]["default"]  # type: ignore[attr-defined]
    assert keyword.whole_word == keyword_spec["whole_word"]["default"]  # type: ignore[attr-defined]
    regex = conditions.build({"regex": "x"})
    assert regex.pattern.options.case_sensitive == kinds["regex"]["oneOf"][1]["properties"]["case_sensitive"]["default"]  # type: ignore[attr-defined]
    pii = conditions.build({"pii": {}})
    assert pii.min_score == kinds["pii"]["oneOf"][1]["properties"]["min_score"]["default"]  # type: ignore[attr-defined]
    assert pii.min_score == default_of(PiiPolicy, "min_score") == conditions.PII_MIN_SCORE  # type: ignore[attr-defined]


def test_a_policy_without_settings_has_the_codes_defaults() -> None:
    policy = parse_policy("version: 1\ndefault_model: m\nmodels: {m: {replicas: {static: ['10.0.0.1:80']}}}\n")
    for cls, value in (
        (ClassifierSettings, policy.classifier),
        (PickingSettings, policy.picking),
        (SessionSettings, policy.sessions),
        (Admission, policy.admission),
        (HeaderNames, policy.headers),
    ):
        assert value == cls(), cls.__name__
    for name in ("auto_models", "unknown_models", "original_dst_cluster", "max_body_bytes", "explain"):
        assert getattr(policy, name) == default_of(Policy, name), name
    assert policy.models["m"].replicas == Replicas(static=("10.0.0.1:80",))
    pii = parse_policy("version: 1\ndefault_model: m\nmodels: {m: {}}\npii: {action: block}\n").pii
    assert pii == PiiPolicy("block")


def test_the_readmes_policy_reference_shows_the_codes_defaults() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Routing policy reference") :]
    start = section.index("```yaml\n") + 8
    block = yaml.safe_load(section[start : section.index("\n```\n", start)])
    for key, cls in (("classifier", ClassifierSettings), ("sessions", SessionSettings)):
        for name, value in block[key].items():
            assert value == default_of(cls, name), f"{key}.{name}"
    shown = block["picking"]
    assert shown["weights"] == picking.default_weights()
    for name, value in shown.items():
        if name == "outlier_detection":
            for k, v in value.items():
                assert _as_code(v, default_of(OutlierDetection, k)) == default_of(OutlierDetection, k), k
        elif name != "weights":
            assert value == default_of(PickingSettings, name), f"picking.{name}"
    assert block["limits"]["max_body_bytes"] == default_of(Policy, "max_body_bytes")
    assert block["debug"]["explain"] == default_of(Policy, "explain")


def test_the_readme_documents_every_condition_kind_and_picking_plugin() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("Conditions (each a mapping with exactly one key)") :]
    table = table[: table.index("\n\n", table.index("| condition |"))]
    for name in conditions.KINDS:
        assert f"`{name}:" in table or f"`{name}: " in table, name
    plugins = readme[readme.index("**Replica picking plugins.**") :]
    plugins = plugins[: plugins.index("\n\n", plugins.index("| plugin |"))]
    for plugin in picking.PLUGINS.values():
        assert f"| `{plugin.name}` | {plugin.kind}" in plugins, plugin.name
        for alias in plugin.aliases:
            assert f"`{alias}`" in plugins
