"""Decision conditions: facts about a request combined with all / any / not.

Each kind (the key of a `when:` mapping) is registered once, by name, in KINDS: its builder and
the checks the schema cannot make; the loader and the docs read the kinds from there.

Every condition answers True, False, or None ("not known yet"): classifier signals are None
until the encoder has run. Evaluation stops at the first decision whose answer is None, so the
encoder only runs when the decision that could match actually needs it.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import re2

from extproc.heads import Head, HeadError
from extproc.signals import Scope, Signals


class Condition(Protocol):
    needs_classifier: bool

    def evaluate(self, signals: Signals) -> bool | None: ...

    def explain(self, signals: Signals) -> dict[str, Any]: ...


def _explained(kind: str, detail: Any, result: bool | None) -> dict[str, Any]:
    return {kind: detail, "result": result}


# --- combinators (Kleene three-valued logic) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Combination:
    """all / any: evaluation stops at the first child that answers ``_decides`` (False for all,
    True for any); otherwise an unknown child makes the whole unknown."""

    conditions: tuple[Condition, ...]
    needs_classifier: bool
    _decides: ClassVar[bool]
    _kind: ClassVar[str]

    def evaluate(self, signals: Signals) -> bool | None:
        decides, unknown = self._decides, False
        for condition in self.conditions:
            result = condition.evaluate(signals)
            if result is decides:
                return decides
            unknown |= result is None
        return None if unknown else not decides

    def explain(self, signals: Signals) -> dict[str, Any]:
        return _explained(self._kind, [c.explain(signals) for c in self.conditions], self.evaluate(signals))


class All(_Combination):
    __slots__ = ()
    _decides, _kind = False, "all"


class Any_(_Combination):
    __slots__ = ()
    _decides, _kind = True, "any"


@dataclass(frozen=True, slots=True)
class Not:
    condition: Condition
    needs_classifier: bool

    def evaluate(self, signals: Signals) -> bool | None:
        result = self.condition.evaluate(signals)
        return None if result is None else not result

    def explain(self, signals: Signals) -> dict[str, Any]:
        return _explained("not", self.condition.explain(signals), self.evaluate(signals))


# --- cheap signals ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Keyword:
    """Literal words, found with str.find (fast substring search) rather than a regex: a long
    prompt costs microseconds, not a character-by-character regex walk. Whole words are found
    with one precompiled pattern per word (a literal between two one-character look-arounds:
    linear, in C), not by a Python loop over every occurrence."""

    any_of: tuple[str, ...]
    all_of: tuple[str, ...]
    scope: Scope
    case_sensitive: bool
    whole_word: bool
    needs_classifier: bool = False
    _words: dict[str, re.Pattern[str]] | None = field(default=None, compare=False, repr=False)

    def evaluate(self, signals: Signals) -> bool:
        known = signals.rule_results.get(id(self))
        if known is not None:
            return known
        text = signals.text(self.scope) if self.case_sensitive else signals.lowered(self.scope)
        if self.any_of and not any(self._found(text, w) for w in self.any_of):
            return False
        return all(self._found(text, w) for w in self.all_of)

    def _found(self, text: str, word: str) -> bool:
        if not self.whole_word:
            return word in text
        assert self._words is not None
        return self._words[word].search(text) is not None

    def explain(self, signals: Signals) -> dict[str, Any]:
        # The configured words are policy, not prompt text, so they may appear here.
        detail = {"words": [*self.any_of, *self.all_of], "scope": self.scope}
        return _explained("keyword", detail, self.evaluate(signals))


@dataclass(frozen=True, slots=True)
class Regex:
    """A policy's pattern, run by RE2: linear in the prompt's length whatever the pattern (Python's
    backtracking engine can take exponential time on prompt text an attacker chooses)."""

    pattern: Any  # re2._Regexp
    scope: Scope
    needs_classifier: bool = False

    def evaluate(self, signals: Signals) -> bool:
        known = signals.rule_results.get(id(self))
        if known is not None:
            return known
        return self.pattern.search(signals.text(self.scope)) is not None

    def explain(self, signals: Signals) -> dict[str, Any]:
        detail = {"pattern": self.pattern.pattern, "scope": self.scope}
        return _explained("regex", detail, self.evaluate(signals))


@dataclass(frozen=True, slots=True)
class Tokens:
    min: int | None
    max: int | None
    needs_classifier: bool = False

    def evaluate(self, signals: Signals) -> bool:
        n = signals.tokens
        return (self.min is None or n >= self.min) and (self.max is None or n < self.max)

    def explain(self, signals: Signals) -> dict[str, Any]:
        detail = {"min": self.min, "max": self.max, "tokens": signals.tokens}
        return _explained("tokens", detail, self.evaluate(signals))


@dataclass(frozen=True, slots=True)
class Header:
    name: str
    equals: str | None = None
    one_of: frozenset[str] | None = None
    matches: Any = None  # re2._Regexp
    present: bool | None = None
    needs_classifier: bool = False

    def evaluate(self, signals: Signals) -> bool:
        value = signals.headers.get(self.name)
        if self.present is not None:
            return (value is not None) == self.present
        if value is None:
            return False
        if self.equals is not None:
            return value == self.equals
        if self.one_of is not None:
            return value in self.one_of
        assert self.matches is not None
        return self.matches.search(value) is not None

    def explain(self, signals: Signals) -> dict[str, Any]:
        # Header values can identify a user: the explanation names the header, not its value.
        return _explained("header", {"name": self.name}, self.evaluate(signals))


# --- classifier signals -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Domain:
    domains: frozenset[str]
    min_probability: float | None
    needs_classifier: bool = True

    def evaluate(self, signals: Signals) -> bool | None:
        topic = signals.topic
        if topic is None:
            return None if signals.classifier_pending else False
        if self.min_probability is None:
            return topic.domain in self.domains
        return sum(topic.domain_probs.get(d, 0.0) for d in self.domains) >= self.min_probability

    def explain(self, signals: Signals) -> dict[str, Any]:
        detail = {"in": sorted(self.domains), "min_probability": self.min_probability}
        return _explained("domain", detail, self.evaluate(signals))


@dataclass(frozen=True, slots=True)
class Complexity:
    above: float | None
    below: float | None
    head: Head | None = None  # a fitted head (policy `heads:`); None: the shipped one
    needs_classifier: bool = True

    def evaluate(self, signals: Signals) -> bool | None:
        topic = signals.topic
        if topic is None:
            return None if signals.classifier_pending else False
        try:
            c = topic.complexity_of(self.head)
        except HeadError:
            return False  # the model gave no embedding: the head cannot speak, so it does not match
        return (self.above is None or c > self.above) and (self.below is None or c < self.below)

    def explain(self, signals: Signals) -> dict[str, Any]:
        detail: dict[str, Any] = {"above": self.above, "below": self.below}
        if self.head is not None:
            detail["head"] = self.head.name
            topic = signals.topic
            if topic is not None and topic.features is not None:
                detail["score"] = round(topic.complexity_of(self.head), 4)
        return _explained("complexity", detail, self.evaluate(signals))


@dataclass(frozen=True, slots=True)
class Pii:
    types: frozenset[str] | None
    min_score: float
    needs_classifier: bool = True

    def evaluate(self, signals: Signals) -> bool | None:
        spans = signals.pii
        if spans is None:
            return None if signals.classifier_pending else False
        return any(s.score >= self.min_score and (self.types is None or s.type in self.types) for s in spans)

    def explain(self, signals: Signals) -> dict[str, Any]:
        detail = {"types": sorted(self.types) if self.types else "any", "min_score": self.min_score}
        return _explained("pii", detail, self.evaluate(signals))


def walk(condition: Condition | None) -> list[Condition]:
    """The condition and every condition nested in it."""
    if condition is None:
        return []
    out = [condition]
    for child in getattr(condition, "conditions", ()):
        out.extend(walk(child))
    if isinstance(condition, Not):
        out.extend(walk(condition.condition))
    return out


# --- the kinds, registered by name ----------------------------------------------------------------

# The score a PII span needs to count, where a policy or condition does not say.
PII_MIN_SCORE = 0.5

Heads = Mapping[str, Head]
RelativePath = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Kind:
    """A condition kind: the key of a `when:` mapping."""

    name: str
    build: Callable[[Any, Heads], Condition]  # from the kind's schema-validated value
    # Mistakes the schema cannot see, as (path below the kind's key, message); None: build() is
    # the check (a ValueError it raises is the mistake).
    check: Callable[[Any, Heads], Iterator[tuple[RelativePath, str]]] | None = None


KINDS: dict[str, Kind] = {}  # by name, in the order the docs list them


def kind(
    name: str, check: Callable[[Any, Heads], Iterator[tuple[RelativePath, str]]] | None = None
) -> Callable[[Callable[[Any, Heads], Condition]], Callable[[Any, Heads], Condition]]:
    """Registers the decorated builder as condition kind ``name``."""

    def decorate(build: Callable[[Any, Heads], Condition]) -> Callable[[Any, Heads], Condition]:
        if name in KINDS:
            raise ValueError(f"condition kind {name!r} is registered twice")
        KINDS[name] = Kind(name, build, check)
        return build

    return decorate


def build(spec: dict[str, Any], heads: Heads | None = None) -> Condition:
    """A condition from its (schema-validated) config mapping; raises ValueError for bad regexes
    and for a complexity head that is not among `heads`."""
    ((name, value),) = spec.items()
    registered = KINDS.get(name)
    if registered is None:
        raise ValueError(f"unknown condition {name!r}")
    return registered.build(value, heads or {})


def problems(spec: dict[str, Any], heads: Heads) -> Iterator[tuple[RelativePath, str]]:
    """Every mistake in a schema-valid condition, as (path from the condition, message)."""
    ((name, value),) = spec.items()
    registered = KINDS[name]
    if registered.check is not None:
        for path, message in registered.check(value, heads):
            yield (name, *path), message
        return
    try:
        registered.build(value, heads)
    except ValueError as exc:
        yield (name,), str(exc)


def _children(value: Any, heads: Heads) -> Iterator[tuple[RelativePath, str]]:
    for i, child in enumerate(value):
        for path, message in problems(child, heads):
            yield (i, *path), message


def _combination(cls: type[_Combination]) -> Callable[[Any, Heads], Condition]:
    def build_combination(value: Any, heads: Heads) -> Condition:
        children = tuple(build(c, heads) for c in value)
        return cls(children, any(c.needs_classifier for c in children))

    return build_combination


kind("all", check=_children)(_combination(All))
kind("any", check=_children)(_combination(Any_))


@kind("not", check=lambda value, heads: problems(value, heads))
def _not(value: Any, heads: Heads) -> Condition:
    child = build(value, heads)
    return Not(child, child.needs_classifier)


@kind("keyword")
def _keyword(value: Any, heads: Heads) -> Keyword:
    spec = {"any": value} if isinstance(value, list) else value
    case_sensitive = spec.get("case_sensitive", False)

    def prepare(words: Sequence[str]) -> tuple[str, ...]:
        return tuple(words) if case_sensitive else tuple(w.lower() for w in words)

    any_of, all_of = prepare(spec.get("any", ())), prepare(spec.get("all", ()))
    whole_word = spec.get("whole_word", False)
    # A word character is alphanumeric or "_" (Unicode-aware, as str.isalnum).
    words = (
        {w: re.compile(rf"(?<![^\W])(?:{re.escape(w)})(?![^\W])") for w in (*any_of, *all_of)} if whole_word else None
    )
    return Keyword(any_of, all_of, spec.get("scope", "last_user"), case_sensitive, whole_word, _words=words)


@kind("regex")
def _regex(value: Any, heads: Heads) -> Condition:
    spec = {"pattern": value} if isinstance(value, str) else value
    return Regex(_compile(spec["pattern"], spec.get("case_sensitive", True)), spec.get("scope", "last_user"))


def _check_tokens(value: Any, heads: Heads) -> Iterator[tuple[RelativePath, str]]:
    if "min" in value and "max" in value and value["min"] >= value["max"]:
        yield (), f"min ({value['min']}) must be below max ({value['max']})"


@kind("tokens", check=_check_tokens)
def _tokens(value: Any, heads: Heads) -> Condition:
    return Tokens(value.get("min"), value.get("max"))


@kind("header")
def _header(spec: dict[str, Any], heads: Heads) -> Header:
    name = spec["name"]
    if "equals" in spec:
        return Header(name, equals=spec["equals"])
    if "in" in spec:
        return Header(name, one_of=frozenset(spec["in"]))
    if "matches" in spec:
        return Header(name, matches=_compile(spec["matches"], True))
    return Header(name, present=spec["present"])


@kind("domain")
def _domain(value: Any, heads: Heads) -> Condition:
    spec = {"in": value} if isinstance(value, list) else value
    return Domain(frozenset(spec["in"]), spec.get("min_probability"))


def _check_complexity(value: Any, heads: Heads) -> Iterator[tuple[RelativePath, str]]:
    if "above" in value and "below" in value and value["above"] >= value["below"]:
        yield (), f"above ({value['above']}) must be below below ({value['below']}); nothing would match"
    if "head" in value and value["head"] not in heads:
        close = difflib.get_close_matches(str(value["head"]), list(heads), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        defined = ", ".join(sorted(heads)) or "none"
        yield ("head",), f"{value['head']!r} is not a head defined under heads{hint}; defined: {defined}"


@kind("complexity", check=_check_complexity)
def _complexity(value: Any, heads: Heads) -> Condition:
    name = value.get("head")
    if name is not None and name not in heads:
        raise ValueError(f"complexity head {name!r} is not defined under heads")
    return Complexity(value.get("above"), value.get("below"), heads[name] if name else None)


@kind("pii")
def _pii(value: Any, heads: Heads) -> Condition:
    if isinstance(value, bool):
        condition = Pii(None, PII_MIN_SCORE)
        return condition if value else Not(condition, True)
    types = value.get("types")
    return Pii(frozenset(types) if types else None, value.get("min_score", PII_MIN_SCORE))


_RE2_HINT = (
    "patterns run in RE2 syntax, in linear time: no look-around ((?=...), (?!...), (?<=...), (?<!...)), "
    "no backreferences (\\1), no possessive or atomic groups, \\z instead of \\Z; "
    "\\d, \\w and \\b are ASCII (use \\p{N}, \\pL for Unicode)"
)


def _compile(pattern: str, case_sensitive: bool) -> Any:
    options = re2.Options()
    options.log_errors = False
    options.case_sensitive = case_sensitive
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        try:
            re.compile(pattern)
        except re.error:
            raise ValueError(f"invalid regular expression {pattern!r}: {reason}") from None
        raise ValueError(f"regular expression {pattern!r} is not supported ({reason}); {_RE2_HINT}") from None
