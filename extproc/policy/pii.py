"""What a PII policy does with a request: pure functions of the rule and what the check found.

``enforce`` answers allow, block, redact or reroute, and fails closed where the check could not
run, did not read everything the rule asks about, or cannot read the input at all (token ids).
It does no I/O and counts nothing: the router applies the ``Verdict`` (raises its error, counts
its ``counts``, redacts, reroutes)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from extproc import errors
from extproc.policy.config import PiiPolicy
from extproc.signals import PiiHit

UNCHECKED = "unchecked"  # the metric's type label for requests the check could not decide

Redactions = Mapping[int, tuple[tuple[int, int, str], ...]]  # message -> (start, end, replacement)


@dataclass(frozen=True, slots=True)
class Detections:
    """What the PII check found in one request."""

    hits: Sequence[PiiHit] | None  # None: the check could not run (failed, too slow)
    unchecked: frozenset[str] = frozenset()  # types not looked for over the whole text (budget)
    unreadable: tuple[str, ...] = ()  # body fields the model reads and no check can (token ids)


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str = ""  # "" (nothing found) | allow | block | redact | reroute | <action>-unchecked
    counts: tuple[tuple[str, str], ...] = ()  # (type, action) per detection counted
    reroute: str | None = None  # the model the request must go to instead
    redactions: Redactions | None = None
    error: errors.RouterError | None = field(default=None, compare=False)  # the request is refused


def enforce(rule: PiiPolicy, found: Detections, decision: str, pii_tokens: int) -> Verdict:
    """The rule applied to what was found. ``decision`` names the decision in refusals;
    ``pii_tokens`` is the tagger's budget, named when the check did not read everything."""
    checks_anything = rule.action != "allow" or rule.types is not None  # allowing everything needs no check
    if found.unreadable and checks_anything:
        return _unreadable(rule, found.unreadable[0])
    if found.hits is None:
        return _unchecked(rule, decision, pii_tokens) if checks_anything else Verdict()
    hits = [h for h in found.hits if h.score >= rule.min_score]
    if found.unchecked and open_question(rule, hits, found.unchecked):
        return _unchecked(rule, decision, pii_tokens, incomplete=True)
    if not hits:
        return Verdict()
    if rule.action == "allow":
        # Only the listed types may pass; anything else is blocked.
        hits = [h for h in hits if rule.types is not None and h.type not in rule.types]
        action = "block" if hits else "allow"
    else:
        hits = [h for h in hits if rule.applies_to(h.type)]
        action = rule.action if hits else "allow"
    types = sorted({h.type for h in hits}) or sorted({h.type for h in found.hits})
    counts = tuple((t, action) for t in types)
    if action == "block":
        refusal = errors.Forbidden(
            f"the request contains personal data ({', '.join(types)}) that {decision!r} does not accept; "
            "remove it and retry",
            code="pii_blocked",
        )
        return Verdict(action, counts, error=refusal)
    if action == "redact":
        spans: dict[int, list[tuple[int, int, str]]] = {}
        for h in hits:
            spans.setdefault(h.message, []).append((h.start, h.end, f"<{h.type}>"))
        return Verdict(action, counts, redactions={m: tuple(s) for m, s in spans.items()})
    if action == "reroute":
        return Verdict(action, counts, reroute=rule.model)
    return Verdict(action, counts)


def open_question(rule: PiiPolicy, hits: Sequence[PiiHit], unchecked: frozenset[str]) -> bool:
    """Could what the check did not look at change this rule's outcome?"""
    if rule.action == "allow":
        return rule.types is None or bool(unchecked - rule.types)  # an allow-list blocks the rest
    if not any(rule.applies_to(t) for t in unchecked):
        return False
    # Blocking or rerouting on what was found already decides; redaction needs every span.
    return rule.action == "redact" or not any(rule.applies_to(h.type) for h in hits)


def _unchecked(rule: PiiPolicy, decision: str, pii_tokens: int, *, incomplete: bool = False) -> Verdict:
    """The check could not run (or not over all the text). Unless the rule says otherwise, act
    as if PII were there: a privacy rule must not open up because the encoder was slow or the
    prompt long."""
    if rule.on_error == "allow":
        return Verdict("", ((UNCHECKED, "allow"),))
    counts = ((UNCHECKED, rule.action),)
    action = f"{rule.action}-unchecked"
    if rule.action == "reroute":
        return Verdict(action, counts, reroute=rule.model)
    if incomplete:
        refusal: errors.RouterError = errors.PayloadTooLarge(
            f"the request is too long for {decision!r}'s personal-data check, which reads "
            f"{pii_tokens} tokens for names and addresses: shorten the conversation "
            "(or raise classifier.pii_tokens)",
            code="pii_check_incomplete",
        )
    else:
        refusal = errors.PiiCheckUnavailable(
            "the request could not be checked for personal data in time; retry shortly"
        )
    return Verdict(action, counts, error=refusal)


def _unreadable(rule: PiiPolicy, field_name: str) -> Verdict:
    """The model would read input no check can (token ids): fail closed as for a check that could
    not run, except that retrying would not help, so a refusal says what to send."""
    if rule.on_error == "allow" or rule.action == "reroute":
        return _unchecked(rule, "", 0)
    refusal = errors.BadRequest(
        f"the personal-data check cannot read the token ids or embeddings in '{field_name}'; send the prompt as text",
        code="pii_unreadable",
        param=field_name,
    )
    return Verdict("", ((UNCHECKED, rule.action),), error=refusal)
