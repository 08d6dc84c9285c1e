"""The PII policy's verdict as a pure function of the rule and the detections (no router)."""

from __future__ import annotations

import pytest

from extproc.policy.config import PiiPolicy
from extproc.policy.pii import Detections, Verdict, enforce
from extproc.signals import PiiHit

SSN = PiiHit(0, "US_SSN", 10, 21, 0.99)
EMAIL = PiiHit(1, "EMAIL_ADDRESS", 0, 12, 0.9)
WEAK_PERSON = PiiHit(0, "PERSON", 0, 5, 0.3)


def verdict(rule: PiiPolicy, hits: tuple[PiiHit, ...] | None, **found: object) -> Verdict:
    return enforce(rule, Detections(hits, **found), "chat", 510)  # type: ignore[arg-type]


def refusal(v: Verdict) -> tuple[int, str]:
    assert v.error is not None
    return v.error.status, v.error.code


def test_nothing_found_changes_nothing() -> None:
    assert verdict(PiiPolicy("block"), ()) == Verdict()


def test_block_refuses_naming_the_types_but_never_the_values() -> None:
    v = verdict(PiiPolicy("block"), (SSN, EMAIL))
    assert refusal(v) == (403, "pii_blocked")
    assert "EMAIL_ADDRESS, US_SSN" in str(v.error) and "'chat'" in str(v.error)
    assert v.counts == (("EMAIL_ADDRESS", "block"), ("US_SSN", "block"))


def test_redact_replaces_each_span_in_its_message() -> None:
    v = verdict(PiiPolicy("redact"), (SSN, EMAIL))
    assert v.action == "redact" and v.error is None
    assert v.redactions == {0: ((10, 21, "<US_SSN>"),), 1: ((0, 12, "<EMAIL_ADDRESS>"),)}


def test_reroute_names_the_model_allowed_to_see_pii() -> None:
    v = verdict(PiiPolicy("reroute", model="private"), (SSN,))
    assert (v.action, v.reroute, v.error) == ("reroute", "private", None)


def test_only_the_rules_types_and_scores_count() -> None:
    rule = PiiPolicy("block", frozenset({"US_SSN"}))
    assert verdict(rule, (EMAIL,)).action == "allow"  # found, but not a type the rule is about
    assert verdict(rule, (EMAIL,)).counts == (("EMAIL_ADDRESS", "allow"),)
    assert verdict(PiiPolicy("block"), (WEAK_PERSON,)) == Verdict()  # below min_score
    assert verdict(PiiPolicy("block", min_score=0.2), (WEAK_PERSON,)).action == "block"


def test_an_allow_list_blocks_every_other_type() -> None:
    rule = PiiPolicy("allow", frozenset({"EMAIL_ADDRESS"}))
    assert verdict(rule, (EMAIL,)).action == "allow"
    assert refusal(verdict(rule, (EMAIL, SSN))) == (403, "pii_blocked")


@pytest.mark.parametrize("action", ["block", "redact"])
def test_a_check_that_could_not_run_fails_closed(action: str) -> None:
    v = verdict(PiiPolicy(action), None)
    assert refusal(v) == (503, "pii_check_unavailable")
    assert v.counts == (("unchecked", action),)


def test_a_check_that_could_not_run_still_reroutes_or_lets_through_if_told() -> None:
    rerouted = verdict(PiiPolicy("reroute", model="private"), None)
    assert (rerouted.action, rerouted.reroute, rerouted.error) == ("reroute-unchecked", "private", None)
    allowed = verdict(PiiPolicy("block", on_error="allow"), None)
    assert (allowed.action, allowed.error, allowed.counts) == ("", None, (("unchecked", "allow"),))
    assert verdict(PiiPolicy("allow"), None) == Verdict()  # allowing everything needs no check


def test_types_the_check_did_not_read_fail_closed_only_where_they_could_change_the_outcome() -> None:
    person = frozenset({"PERSON"})
    v = verdict(PiiPolicy("block", person), (), unchecked=person)
    assert refusal(v) == (413, "pii_check_incomplete") and "510 tokens" in str(v.error)
    assert verdict(PiiPolicy("block", frozenset({"US_SSN"})), (), unchecked=person) == Verdict()
    assert verdict(PiiPolicy("block"), (SSN,), unchecked=person).action == "block"  # already decided
    assert refusal(verdict(PiiPolicy("redact"), (SSN,), unchecked=person))[1] == "pii_check_incomplete"
    assert verdict(PiiPolicy("reroute", model="p"), (), unchecked=person).reroute == "p"


def test_input_no_check_can_read_is_refused_with_what_to_send() -> None:
    v = verdict(PiiPolicy("block"), (), unreadable=("prompt",))
    assert refusal(v) == (400, "pii_unreadable") and v.error.param == "prompt"  # type: ignore[union-attr]
    assert verdict(PiiPolicy("reroute", model="p"), (), unreadable=("prompt",)).reroute == "p"
    assert verdict(PiiPolicy("block", on_error="allow"), (), unreadable=("prompt",)).error is None
    assert verdict(PiiPolicy("allow"), (), unreadable=("prompt",)) == Verdict()
