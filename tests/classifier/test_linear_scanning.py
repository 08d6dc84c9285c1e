"""Every text-scanning step of PII detection is linear and bounded, on hostile inputs a megabyte
long (a quadratic step would take hours on them, so a regression hangs here rather than passing).
The bounds are asserted as work the engines are given, never as wall-clock time."""

from __future__ import annotations

import re

import numpy as np
import pytest
import re2
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.classifier import Classifier, pii
from extproc.classifier import classifier as classifier_module
from extproc.classifier.labels import PII_TAGS
from extproc.classifier.normalize import normalize
from extproc.classifier.text import CHARS_PER_TOKEN, WINDOW
from extproc.classifier.validators import VALIDATORS

MEGA = 1_000_000
HOSTILE = {
    "letters": "a" * MEGA,
    "digits": "7" * MEGA,
    "at signs": "@" * MEGA,
    "dots": "." * MEGA,
    "dashes": "-" * MEGA,
    "spaces": " " * MEGA,
    "letter-at": "a@" * (MEGA // 2),
    "letter-dot": "a." * (MEGA // 2),
    "digit-space": "1 " * (MEGA // 2),
    "digit-dash": "1-" * (MEGA // 2),
    "hex-colon": "a:" * (MEGA // 2),
    "digit-dot": "1." * (MEGA // 2),
    "accents": "é" * MEGA,
    "full-width digits": "\uff17" * MEGA,
    "zero-width spaces": "7\u200b" * (MEGA // 2),
    "cards": "4111 1111 1111 1111 " * (MEGA // 20),
}


class Counting:
    """An RE2 pattern that counts the searches it is asked for."""

    def __init__(self, inner: re2._Regexp) -> None:
        self.inner, self.calls = inner, 0

    def search(self, data: bytes, pos: int = 0):
        self.calls += 1
        return self.inner.search(data, pos)


def test_candidate_patterns_are_all_re2() -> None:
    assert all(isinstance(p, re2._Regexp) for p in pii._CANDIDATES.values())


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_structured_scan_of_a_megabyte_does_one_search_per_shape_found(text: str, monkeypatch) -> None:
    counted = {k: Counting(p) for k, p in pii._CANDIDATES.items()}
    monkeypatch.setattr(pii, "_CANDIDATES", counted)
    found, complete = pii.scan(text, limit=pii.MAX_CANDIDATES)
    searches = sum(c.calls for c in counted.values())
    # RE2 is linear per search; each search either ends the scan of a type or yields a shape
    # (at most MAX_CANDIDATES of them in all), so the total work is linear in the text.
    assert searches <= len(counted) + min(pii.MAX_CANDIDATES, len(text)) + 1
    # Incomplete only where the shape limit was reached (then PII policies fail closed).
    assert complete or searches > pii.MAX_CANDIDATES
    if text.startswith("4111"):
        assert found  # a megabyte of card numbers: found
    else:
        assert found == []


@pytest.mark.parametrize("typ", sorted(VALIDATORS))
def test_validators_turn_down_a_megabyte_at_once(typ: str) -> None:
    for text in ("7" * MEGA, "a" * MEGA + "@example.com", "1." * MEGA):
        assert VALIDATORS[typ](text) is False


def test_span_helpers_never_walk_a_hostile_word() -> None:
    text = "x" * MEGA
    start, end = pii.to_word_bounds(text, MEGA // 2, MEGA // 2 + 3)
    assert end - start <= 3 + 2 * pii.MAX_WORD
    assert not pii.plausible(text, 0, MEGA, "PERSON") and not pii.plausible(text, 0, MEGA, "STREET_ADDRESS")
    assert pii._trim("." * MEGA + "ab" + "," * MEGA, 0, 2 * MEGA + 2) == (MEGA, MEGA + 2)


def test_decode_of_a_hostile_text_tagged_as_one_long_name_is_bounded() -> None:
    text = "Qx" * (MEGA // 2)
    offsets = np.array([[0, MEGA]])  # one [UNK] token over the whole word
    probs = np.zeros((1, len(PII_TAGS)), np.float32)
    probs[0, PII_TAGS.index("B-PERSON")] = 1.0
    assert pii.decode(text, offsets, probs) == ()


@pytest.mark.parametrize("text", [HOSTILE["letters"], HOSTILE["at signs"], HOSTILE["accents"]], ids=["a", "@", "é"])
def test_the_tokenizer_sees_bounded_slices_of_a_long_text(
    classifier: Classifier, text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int] = []
    real = classifier_module.encode

    def recording(tok, texts):
        seen.extend(len(t) for t in texts)
        return real(tok, texts)

    monkeypatch.setattr(classifier_module, "encode", recording)
    [c] = classifier.classify([text], pii_tokens=510)
    assert max(seen) <= 510 * CHARS_PER_TOKEN
    assert sum(seen) <= (510 + WINDOW) * CHARS_PER_TOKEN
    assert c.pii_chars <= 510 * CHARS_PER_TOKEN and c.pii == ()


# --- the RE2 rewrite finds what the look-around patterns it replaced found ----------------------

REFERENCE = {  # the Python `re` patterns used before (look-arounds, one backreference)
    "EMAIL_ADDRESS": re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+"),
    "CREDIT_CARD": re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"),
    "IBAN_CODE": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){8,30}\b", re.IGNORECASE),
    # (one pattern for both before; now each is looked for on its own, so an IPv4 address that
    # overlaps an IPv6-looking run is found too)
    "IP_ADDRESS": re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])"),
    "IP_ADDRESS/6": re.compile(r"(?<![\w:])(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?![\w:])", re.IGNORECASE),
    "US_SSN": re.compile(r"(?<![\d-])\d{3}([- ]?)\d{2}\1\d{4}(?![\d-])"),
    "PHONE_NUMBER": re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?\(?\d[\d ().-]{5,}\d(?!\w)"),
}


def reference(text: str) -> set[tuple[str, int, int]]:
    out = set()
    for key, pattern in REFERENCE.items():
        typ = key.split("/")[0]
        for m in pattern.finditer(text):
            a, b = pii._trim(text, m.start(), m.end())
            if b > a and VALIDATORS[typ](text[a:b]):
                out.add((typ, a, b))
    return out


VALUES = ["078-05-1120", "4111 1111 1111 1111", "DE89 3704 0044 0532 0130 00", "10.1.2.3", "fe80::1:2",
          "jane.doe@example.com", "+1 415-555-0132", "219099999", "5500-0000-0000-0004"]  # fmt: skip
PIECES = st.sampled_from([*VALUES, " ", "-", ".", ":", "@", "x", "7", "12", "ab", "\n", "(", ")"])


@settings(max_examples=400, deadline=None)
@given(st.lists(PIECES, min_size=1, max_size=12))
def test_re2_candidates_match_the_lookaround_patterns_on_ascii_text(pieces: list[str]) -> None:
    text = "".join(pieces)
    # The SSN's two separators must match (the reference's backreference); RE2's alternation
    # spells them out. Email local parts and \w boundaries are ASCII in both on ASCII text.
    found, complete = pii.candidates(text)
    assert complete
    assert {(c.type, c.start, c.end) for c in found} == reference(text)


def test_normalized_offsets_map_back_to_the_original() -> None:
    text = "id \uff10\uff17\uff18\u200b-05\u00ad-1120 end"
    norm = normalize(text)
    assert norm.text == "id 078-05-1120 end"
    [c], _ = pii.candidates(norm.text, frozenset({"US_SSN"}))
    start, end = norm.span(c.start, c.end)
    assert text[start:end] == "\uff10\uff17\uff18\u200b-05\u00ad-1120"
