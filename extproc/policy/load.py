"""YAML text -> validated Policy, with errors that name the path, the line and the fix."""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from extproc.heads import Head, HeadError, parse_head
from extproc.policy import conditions
from extproc.policy.backends import POOL, Backend, FallbackSettings, Provider, SecretRef, StoreSettings
from extproc.policy.config import (
    Admission,
    CacheSettings,
    Capacity,
    ClassifierSettings,
    Decision,
    DecisionCache,
    HeaderNames,
    KubernetesReplicas,
    KvEvents,
    Model,
    OutlierDetection,
    PickingSettings,
    PiiPolicy,
    Policy,
    Pricing,
    Priority,
    Replicas,
    SessionSettings,
    Split,
    Switch,
    default_of,
)

DEFAULT_POLICY = Path(__file__).resolve().parent / "default.yaml"

JsonPath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    path: JsonPath
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = format_path(self.path) or "(top level)"
        at = f" (line {self.line})" if self.line else ""
        return f"{where}{at}: {self.message}"


class ConfigError(ValueError):
    """The policy cannot be used. ``problems`` lists every mistake found, each with its line."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid routing policy {source}:\n{lines}")


def format_path(path: JsonPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@cache
def schema() -> dict[str, Any]:
    return json.loads(resources.files("extproc.policy").joinpath("schema.json").read_text())


def load_policy(path: str | Path | None = None) -> Policy:
    """Read and validate a policy file (the bundled default when path is None)."""
    path = Path(path) if path is not None else DEFAULT_POLICY
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [Problem((), f"cannot read the file: {exc}")]) from None
    return parse_policy(text, str(path), path.parent)


def parse_policy(text: str, source: str = "<string>", base_dir: Path | None = None) -> Policy:
    """Validate policy text; `heads` files are read relative to `base_dir` (default: the
    current directory)."""
    data, lines = _read_yaml(text, source)
    problems = list(_schema_problems(data, lines))
    # Cross references too, where the schema found nothing wrong: every mistake in one pass.
    problems += _reference_problems(data, lines, skip=[p.path for p in problems])
    if not problems:
        heads, files, problems = _heads(data, lines, base_dir or Path.cwd())
    if not problems:
        digest = hashlib.sha256(text.encode())
        for f in files:
            digest.update(b"\0" + f.read_bytes())
        policy, problems = _build(data, lines, digest.hexdigest(), heads, tuple(str(f) for f in files))
        if not problems:
            return policy
    raise ConfigError(source, problems)


def _heads(
    data: dict[str, Any], lines: dict[JsonPath, int], base_dir: Path
) -> tuple[dict[str, Head], list[Path], list[Problem]]:
    """Fitted complexity heads: each inline (the JSON `extproc fit` writes) or `{file: path}`."""
    heads: dict[str, Head] = {}
    files: list[Path] = []
    problems: list[Problem] = []
    for name, spec in data.get("heads", {}).items():
        path: JsonPath = ("heads", name)
        doc = spec
        if "file" in spec:
            file = (base_dir / spec["file"]).resolve()
            try:
                doc = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                problems.append(Problem((*path, "file"), f"cannot read head {str(file)!r}: {exc}", _line(lines, path)))
                continue
            files.append(file)
        try:
            heads[name] = parse_head(doc, name)
        except HeadError as exc:
            problems.append(Problem(path, f"{exc}", _line(lines, path)))
    return heads, files, problems


# --- YAML with line numbers ---------------------------------------------------------------------


def _read_yaml(text: str, source: str) -> tuple[Any, dict[JsonPath, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # The context mark is where the broken construct began; the problem mark can be the end of the file.
        mark = getattr(exc, "context_mark", None) or getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        detail = f"{context}: {reason}" if context else reason
        raise ConfigError(source, [Problem((), f"not valid YAML ({detail})", line)]) from None
    if node is None:
        raise ConfigError(source, [Problem((), "the file is empty; it needs at least 'models' and 'default_model'")])
    lines: dict[JsonPath, int] = {}
    duplicates = list(_index_lines(node, (), lines))
    if duplicates:
        raise ConfigError(source, duplicates)
    return data, lines


def _index_lines(node: yaml.Node, path: JsonPath, lines: dict[JsonPath, int]) -> Iterator[Problem]:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                yield Problem(
                    (*path, key),
                    "duplicate key; YAML keeps only the last one, remove the other",
                    key_node.start_mark.line + 1,
                )
            seen.add(key)
            yield from _index_lines(value_node, (*path, key), lines)
            lines[(*path, key)] = key_node.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _index_lines(item, (*path, i), lines)


def _line(lines: dict[JsonPath, int], path: JsonPath) -> int | None:
    while path not in lines and path:
        path = path[:-1]
    return lines.get(path)


# --- schema ----------------------------------------------------------------------------------------


def _schema_problems(data: Any, lines: dict[JsonPath, int]) -> Iterator[Problem]:
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: (list(map(str, e.absolute_path)), e.message))
    for error in errors[:25]:
        path, message = _describe(error)
        yield Problem(path, message, _line(lines, path))


def _describe(error: jsonschema.ValidationError) -> tuple[JsonPath, str]:
    """The path to report and a message that says what to change."""
    path: JsonPath = tuple(error.absolute_path)
    kind, value = error.validator, error.instance
    if kind == "additionalProperties":
        allowed = list(error.schema.get("properties", {}))
        extra = [k for k in value if k not in allowed]
        hints = []
        for key in extra:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        where = (*path, extra[0]) if len(extra) == 1 else path
        return where, f"unknown key {', '.join(hints)}; allowed: {', '.join(allowed)}"
    if (
        kind in ("minProperties", "maxProperties")
        and "exactly one of: all" in str(error.schema.get("description")).lower()
    ):
        keys = ", ".join(map(str, value)) if isinstance(value, dict) and value else "none"
        return path, f"a condition has exactly one key, one of: {', '.join(conditions.KINDS)} (got: {keys})"
    if kind == "required":
        return path, error.message.replace("is a required property", "is required")
    if kind == "enum":
        return path, f"{value!r} is not one of: {', '.join(map(str, error.validator_value))}"
    if kind == "type":
        described = "pattern" in error.schema and "description" in error.schema
        form = f" ({error.schema['description']})" if described else ""
        return path, f"expected {_article(error.validator_value)}{form}, got {_article(_json_type(value))}"
    if kind == "oneOf":
        hint = _one_of_hint(path, value)
        if hint:
            return path, hint
        branch = _matching_branch(error)
        if branch is not None:
            return _describe(branch)
        return path, error.message
    if kind == "pattern":
        return (
            path,
            f"{value!r} does not match the expected form ({error.schema.get('description', error.validator_value)})",
        )
    if kind == "const":
        return path, f"must be {error.validator_value!r}"
    return path, error.message


def _one_of_hint(path: JsonPath, value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    if len(path) == 2 and path[0] == "decisions":
        return "set exactly one of 'model' or 'split'"
    if path and path[-1] == "replicas":
        return "set exactly one of 'static' or 'kubernetes'"
    if path and path[-1] == "kubernetes":
        return "set exactly one of 'service' or 'selector'"
    return None


def _matching_branch(error: jsonschema.ValidationError) -> jsonschema.ValidationError | None:
    """Of a oneOf's failed branches, the deepest error in a branch of the instance's own type."""
    own = _json_type(error.instance)
    candidates = [
        e
        for e in error.context or ()
        if e.validator != "type" and _branch_type(error, e) in (own, None, "number" if own == "integer" else own)
    ]
    if not candidates:
        return jsonschema.exceptions.best_match(error.context) if error.context else None
    return max(candidates, key=lambda e: len(e.absolute_path))


def _branch_type(parent: jsonschema.ValidationError, child: jsonschema.ValidationError) -> str | None:
    index = child.schema_path[0] if child.schema_path else None
    branches = parent.validator_value if isinstance(parent.validator_value, list) else []
    if isinstance(index, int) and index < len(branches):
        declared = branches[index].get("type")
        return declared if isinstance(declared, str) else None
    return None


def _json_type(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _article(kind: Any) -> str:
    if isinstance(kind, list):
        return " or ".join(_article(k) for k in kind)
    return f"an {kind}" if str(kind)[0] in "aeiou" else f"a {kind}"


# --- cross references --------------------------------------------------------------------------


def _reference_problems(data: Any, lines: dict[JsonPath, int], skip: Sequence[JsonPath] = ()) -> list[Problem]:
    """Names that must refer to something. Parts at, inside or around a path in ``skip`` (where
    the schema already found a mistake) are not checked: their shape is unknown."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        return []

    def clean(path: JsonPath) -> bool:
        return not any(bad and (bad[: len(path)] == path or path[: len(bad)] == bad) for bad in skip)

    return list(_references(data, lines, clean))


def _references(
    data: dict[str, Any], lines: dict[JsonPath, int], clean: Callable[[JsonPath], bool]
) -> Iterator[Problem]:
    models = data["models"]
    configured = ", ".join(sorted(map(str, models)))

    def check(path: JsonPath, name: Any) -> Iterator[Problem]:
        if clean(path) and name not in models:
            close = difflib.get_close_matches(str(name), list(map(str, models)), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            yield Problem(
                path, f"{name!r} is not a configured model{hint}; configured: {configured}", _line(lines, path)
            )

    if "default_model" in data:
        yield from check(("default_model",), data["default_model"])
    cost = data.get("cost")
    if isinstance(cost, dict) and cost.get("baseline_model") is not None:
        yield from check(("cost", "baseline_model"), cost["baseline_model"])
    auto_models = data.get("auto_models", sorted(default_of(Policy, "auto_models")))
    if clean(("auto_models",)) and isinstance(auto_models, list):
        for name in auto_models:
            if isinstance(name, str) and name in models:
                yield Problem(
                    ("auto_models",),
                    f"{name!r} is both an auto name and a model; rename one",
                    _line(lines, ("auto_models",)),
                )
    if data.get("unknown_models") == "passthrough" and not data.get("passthrough_cluster"):
        yield Problem(
            ("passthrough_cluster",), "required when unknown_models is 'passthrough'", _line(lines, ("unknown_models",))
        )
    for path, pii in _pii_policies(data):
        if not clean(path) or not isinstance(pii, dict):
            continue
        if pii.get("action") == "reroute":
            if "model" not in pii:
                yield Problem((*path, "model"), "'reroute' needs the model allowed to see PII", _line(lines, path))
            else:
                yield from check((*path, "model"), pii["model"])
        elif "model" in pii:
            yield Problem((*path, "model"), "only used with action 'reroute'", _line(lines, (*path, "model")))
    seen: dict[str, int] = {}
    decisions = data.get("decisions", [])
    for i, decision in enumerate(decisions if isinstance(decisions, list) else []):
        base: JsonPath = ("decisions", i)
        if not isinstance(decision, dict):
            continue
        name = decision.get("name")
        if isinstance(name, str) and clean((*base, "name")):
            if name in seen:
                yield Problem(
                    (*base, "name"),
                    f"decision name {name!r} is already used by decisions[{seen[name]}]",
                    _line(lines, (*base, "name")),
                )
            seen.setdefault(name, i)
        if "model" in decision:
            yield from check((*base, "model"), decision["model"])
        split, fallbacks = decision.get("split", []), decision.get("fallbacks", [])
        for j, part in enumerate(split if isinstance(split, list) and clean((*base, "split")) else []):
            yield from check((*base, "split", j, "model"), part["model"])
        for j, fallback in enumerate(fallbacks if isinstance(fallbacks, list) else []):
            yield from check((*base, "fallbacks", j), fallback)
        if "when" in decision and clean((*base, "when")):
            yield from _condition_problems(decision["when"], (*base, "when"), lines, data.get("heads", {}))
        switch = decision.get("switch")
        if isinstance(switch, dict) and "when" in switch and clean((*base, "switch", "when")):
            yield from _condition_problems(switch["when"], (*base, "switch", "when"), lines, data.get("heads", {}))


def _pii_policies(data: dict[str, Any]) -> Iterator[tuple[JsonPath, dict[str, Any]]]:
    if "pii" in data:
        yield ("pii",), data["pii"]
    for name, model in data["models"].items():
        if isinstance(model, dict) and "pii" in model:
            yield ("models", name, "pii"), model["pii"]
    decisions = data.get("decisions", [])
    for i, decision in enumerate(decisions if isinstance(decisions, list) else []):
        if isinstance(decision, dict) and "pii" in decision:
            yield ("decisions", i, "pii"), decision["pii"]


def _condition_problems(
    spec: dict[str, Any], path: JsonPath, lines: dict[JsonPath, int], heads: dict[str, Any]
) -> Iterator[Problem]:
    for relative, message in conditions.problems(spec, heads):
        here = (*path, *relative)
        yield Problem(here, message, _line(lines, here))


# --- build ---------------------------------------------------------------------------------------


def _given(spec: dict[str, Any], *names: str) -> dict[str, Any]:
    """The keys of spec among names: what is left out keeps its dataclass default."""
    return {k: spec[k] for k in names if k in spec}


def _pii_policy(spec: dict[str, Any] | None) -> PiiPolicy | None:
    if spec is None:
        return None
    types = spec.get("types")
    return PiiPolicy(
        spec["action"], frozenset(types) if types else None, **_given(spec, "min_score", "model", "on_error")
    )


def _decision_cache(spec: bool | dict[str, Any] | None) -> DecisionCache | None:
    if spec is None or spec is False:
        return None
    return DecisionCache() if spec is True else DecisionCache(**spec)


DURATIONS = ("interval", "base_ejection_time", "max_ejection_time")


def _outlier_detection(spec: dict[str, Any]) -> OutlierDetection:
    """Durations arrive as Envoy writes them ("30s"); the settings hold seconds."""
    settings = {k: float(v[:-1]) if k in DURATIONS else v for k, v in spec.items()}
    if "max_ejection_time" not in settings and "base_ejection_time" in settings:
        # As Envoy: an unset cap is the default or the base, whichever is longer.
        settings["max_ejection_time"] = max(
            default_of(OutlierDetection, "max_ejection_time"), settings["base_ejection_time"]
        )
    return OutlierDetection(**settings)


def _switch(spec: Any, heads: dict[str, Head]) -> Switch | None:
    if spec is None:
        return None
    if spec == "always":
        return Switch(always=True)
    return Switch(when=conditions.build(spec["when"], heads))


def _kv_events(spec: dict[str, Any]) -> KvEvents:
    fields = {k: v for k, v in spec.items() if k not in ("endpoints", "replay_endpoints")}
    return KvEvents(
        **fields,
        endpoints=tuple(sorted(spec.get("endpoints", {}).items())),
        replay_endpoints=tuple(sorted(spec.get("replay_endpoints", {}).items())),
    )


def _seconds(value: str) -> float:
    return float(value[:-1])


def _secret(spec: dict[str, Any] | None) -> SecretRef | None:
    return SecretRef(spec.get("file"), spec.get("env")) if spec else None


def _provider(name: str, spec: dict[str, Any]) -> Provider:
    durations = ("timeout", "connect_timeout")
    settings = {k: _seconds(v) if k in durations else v for k, v in spec.items() if k != "api_key"}
    return Provider(name=name, api_key=_secret(spec.get("api_key")), **settings)


def _fallback(spec: dict[str, Any]) -> FallbackSettings:
    durations = ("deadline", "replica_timeout", "cooldown", "max_cooldown", "base_ejection_time", "max_ejection_time")
    return FallbackSettings(**{k: _seconds(v) if k in durations else v for k, v in spec.items()})


def _store(spec: dict[str, Any] | None) -> StoreSettings | None:
    if spec is None:
        return None
    durations = ("timeout", "sync_interval")
    settings = {k: _seconds(v) if k in durations else v for k, v in spec.items() if k != "password"}
    return StoreSettings(password=_secret(spec.get("password")), **settings)


def _backends(spec: dict[str, Any], upstream_model: str) -> tuple[Backend, ...]:
    return tuple(
        Backend(None, upstream_model) if entry == POOL else Backend(entry["provider"], entry["model"])
        for entry in spec.get("backends", ())
    )


def _backend_problems(data: dict[str, Any], lines: dict[JsonPath, int]) -> Iterator[Problem]:
    """Backends name configured providers, once each; providers can authenticate; the store
    URL carries no credentials."""
    from extproc.store import check_url

    providers = data.get("providers", {})
    for name, model in data.get("models", {}).items():
        seen: set[str] = set()
        for i, entry in enumerate(model.get("backends", ())):
            path: JsonPath = ("models", name, "backends", i)
            key = entry if entry == POOL else f"{entry['provider']}/{entry['model']}"
            if key in seen:
                yield Problem(path, f"{key!r} is listed twice; each backend once", _line(lines, path))
            seen.add(key)
            if entry == POOL or entry["provider"] in providers:
                continue
            close = difflib.get_close_matches(entry["provider"], list(providers), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            defined = ", ".join(sorted(providers)) or "none"
            yield Problem(
                (*path, "provider"),
                f"{entry['provider']!r} is not a provider defined under providers{hint}; defined: {defined}",
                _line(lines, (*path, "provider")),
            )
    for name, spec in providers.items():
        path = ("providers", name)
        if spec.get("authorization", "replace") == "replace" and "api_key" not in spec:
            yield Problem(
                path,
                "authorization 'replace' needs api_key ({file: /path/of/the/mounted/secret} or {env: VAR}); "
                "or set authorization: forward (the client's own key) or strip",
                _line(lines, path),
            )
        if spec.get("authorization") in ("forward", "strip") and "api_key" in spec:
            yield Problem(
                (*path, "api_key"),
                f"is not used with authorization {spec['authorization']!r}; remove it or use 'replace'",
                _line(lines, (*path, "api_key")),
            )
    fallback = data.get("fallback", {})
    base = _seconds(fallback["base_ejection_time"]) if "base_ejection_time" in fallback else None
    if base is None:
        base = default_of(FallbackSettings, "base_ejection_time")
    if "max_ejection_time" in fallback and _seconds(fallback["max_ejection_time"]) < base:
        path = ("fallback", "max_ejection_time")
        yield Problem(path, "is shorter than base_ejection_time; raise it or lower the base", _line(lines, path))
    store = data.get("store")
    if store is not None:
        problem = check_url(store["url"])
        if problem:
            yield Problem(("store", "url"), problem, _line(lines, ("store", "url")))


def _model(name: str, spec: dict[str, Any]) -> Model:
    pricing = spec.get("pricing")
    replicas = spec.get("replicas")
    return Model(
        name=name,
        cluster=spec.get("cluster", name),
        upstream_model=spec.get("upstream_model", name),
        pricing=Pricing(pricing["input_per_million"], pricing["output_per_million"]) if pricing else None,
        replicas=Replicas(
            static=tuple(replicas.get("static", ())),
            kubernetes=KubernetesReplicas(**replicas["kubernetes"]) if "kubernetes" in replicas else None,
            kv_events=_kv_events(replicas["kv_events"]) if "kv_events" in replicas else None,
            **_given(replicas, "envoy", "metrics"),
        )
        if replicas
        else None,
        pii=_pii_policy(spec.get("pii")),
        capacity=Capacity(**spec["capacity"]) if "capacity" in spec else None,
        backends=_backends(spec, spec.get("upstream_model", name)),
    )


def _admission(spec: dict[str, Any]) -> Admission:
    fields = {k: v for k, v in spec.items() if k not in ("priorities", "retry_after")}
    if "retry_after" in spec:
        fields["retry_after"] = float(spec["retry_after"][:-1])
    if "priorities" in spec:
        fields["priorities"] = tuple(
            Priority(
                p["name"],
                frozenset([p["name"], *p.get("values", ())]),
                **({"max_wait": float(p["max_wait"][:-1])} if "max_wait" in p else {}),
                **_given(p, "max_queued", "share"),
            )
            for p in spec["priorities"]
        )
        fields.setdefault("default_priority", fields["priorities"][-1].name)
    return Admission(**fields)


def _build(
    data: dict[str, Any], lines: dict[JsonPath, int], digest: str, heads: dict[str, Head], head_files: tuple[str, ...]
) -> tuple[Policy, list[Problem]]:
    decisions = []
    for spec in data.get("decisions", []):
        decisions.append(
            Decision(
                name=spec["name"],
                when=conditions.build(spec["when"], heads) if "when" in spec else None,
                model=spec.get("model"),
                split=tuple(Split(s["model"], float(s["weight"])) for s in spec.get("split", ())),
                fallbacks=tuple(spec.get("fallbacks", ())),
                **_given(spec, "priority"),
                pii=_pii_policy(spec.get("pii")),
                switch=_switch(spec.get("switch"), heads),
                cache=_decision_cache(spec.get("cache")),
            )
        )
    # Higher priority first; sorted() is stable, so equal priorities keep file order.
    ordered = tuple(sorted(decisions, key=lambda d: -d.priority))
    classifier = ClassifierSettings(**data.get("classifier", {}))
    weights = data.get("picking", {}).get("weights", {})
    picking_spec = {k: v for k, v in data.get("picking", {}).items() if k not in ("weights", "outlier_detection")}
    if "outlier_detection" in data.get("picking", {}):
        picking_spec["outlier_detection"] = _outlier_detection(data["picking"]["outlier_detection"])
    # Weights by scorer name, as written: the picker resolves aliases and registered defaults.
    picking = PickingSettings(weights=dict(weights), **picking_spec)
    default_pii = _pii_policy(data.get("pii"))
    models = {name: _model(name, spec) for name, spec in data["models"].items()}
    # Every condition the policy evaluates: decisions', and their switch rules'.
    walked = [c for d in ordered for c in conditions.walk(d.when)]
    walked += [c for d in ordered if d.switch and d.switch.when for c in conditions.walk(d.switch.when)]
    needs_pii = (
        default_pii is not None
        or any(m.pii for m in models.values())
        or any(d.pii for d in ordered)
        or any(isinstance(c, conditions.Pii) for c in walked)
    )
    pii_types = _pii_types(
        [default_pii, *(m.pii for m in models.values()), *(d.pii for d in ordered)],
        [c for c in walked if isinstance(c, conditions.Pii)],
    )
    uses_tokens = any(isinstance(c, conditions.Tokens) for c in walked)
    uses_topic = any(isinstance(c, conditions.Domain | conditions.Complexity) for c in walked)
    text_rules = tuple(c for c in walked if isinstance(c, conditions.Keyword | conditions.Regex))
    uses_classifier = classifier.enabled is True or (
        classifier.enabled == "auto"
        and (needs_pii or any(c.needs_classifier for c in walked) or any(d.cache is not None for d in ordered))
    )
    cache = CacheSettings(**data.get("cache", {}))
    uses_cache = any(d.cache is not None for d in ordered)
    problems = list(_backend_problems(data, lines))
    if cache.backend == "redis" and not cache.redis_url and data.get("store") is None:
        problems.append(
            Problem(
                ("cache", "redis_url"),
                "required when backend is 'redis' and the policy has no `store` (whose url and password the "
                "cache would use)",
                _line(lines, ("cache", "backend")),
            )
        )
    if cache.redis_url:
        from extproc.store import check_url

        problem = check_url(cache.redis_url)
        if problem:
            problems.append(Problem(("cache", "redis_url"), problem, _line(lines, ("cache", "redis_url"))))
    if uses_cache and classifier.enabled is False:
        problems.append(
            Problem(
                ("classifier", "enabled"),
                "is false, but some decisions use the semantic cache, which needs the encoder; enable it or "
                "remove their `cache`",
                _line(lines, ("classifier",)),
            )
        )
    outliers = picking.outlier_detection
    if outliers.max_ejection_time < outliers.base_ejection_time:
        path = ("picking", "outlier_detection", "max_ejection_time")
        problems.append(
            Problem(
                path,
                f"{outliers.max_ejection_time:g}s is shorter than base_ejection_time "
                f"({outliers.base_ejection_time:g}s); raise it or lower the base",
                _line(lines, path),
            )
        )
    if classifier.enabled is False and any(d.needs_classifier for d in ordered):
        problems.append(
            Problem(
                ("classifier", "enabled"),
                "is false, but some decisions test domain, complexity or pii; enable it or remove them",
                _line(lines, ("classifier",)),
            )
        )
    top = _given(data, "unknown_models", "passthrough_cluster", "original_dst_cluster")
    if "auto_models" in data:
        top["auto_models"] = frozenset(data["auto_models"])
    policy = Policy(
        models=models,
        decisions=ordered,
        default_model=data["default_model"],
        **top,
        **_given(data.get("limits", {}), "max_body_bytes"),
        **_given(data.get("debug", {}), "explain"),
        headers=HeaderNames(**data.get("headers", {})),
        baseline_model=data.get("cost", {}).get("baseline_model"),
        classifier=classifier,
        picking=picking,
        sessions=SessionSettings(**data.get("sessions", {})),
        admission=_admission(data.get("admission", {})),
        pii=default_pii,
        cache=cache,
        uses_cache=uses_cache,
        digest=digest,
        needs_pii=needs_pii,
        pii_types=pii_types,
        uses_tokens=uses_tokens,
        uses_topic=uses_topic,
        text_rules=text_rules,
        uses_classifier=uses_classifier,
        heads=heads,
        head_files=head_files,
        providers={name: _provider(name, spec) for name, spec in data.get("providers", {}).items()},
        fallback=_fallback(data.get("fallback", {})),
        store=_store(data.get("store")),
    )
    return policy, problems


def _pii_types(policies: list[PiiPolicy | None], tests: list[conditions.Pii]) -> frozenset[str] | None:
    """Every PII type the policy looks for; None when some rule needs them all (no `types`, or an
    allow-list, which blocks every type it does not list)."""
    types: set[str] = set()
    for rule in policies:
        if rule is None:
            continue
        if rule.types is None or rule.action == "allow":
            return None
        types |= rule.types
    for test in tests:
        if test.types is None:
            return None
        types |= test.types
    return frozenset(types)
