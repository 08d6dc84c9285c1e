"""From per-token BIO probabilities to character spans, confirmed by validators.

Pure functions over numpy arrays, so they test without a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import re2

from extproc.classifier.labels import PII_TAGS, PII_TYPES
from extproc.classifier.normalize import normalize
from extproc.classifier.validators import VALIDATORS


@dataclass(frozen=True, slots=True)
class PiiSpan:
    type: str  # e.g. "EMAIL_ADDRESS"
    start: int  # char offsets into the text given to classify
    end: int
    score: float


# Minimum mean tag probability over a span; structured types are also checked by a validator.
# PERSON needs more: its spans carry no checksum, and names of public figures and textbook
# characters in questions were most of the false positives. 0.75 was chosen on held-out data the
# evaluation never sees (fresh generator sentences, the MMLU-Pro validation split, other code
# chunks): the best generator F1 (0.883, as at 0.6) with the fewest flagged validation questions
# (13.8% at 0.5 -> 10.5%); above 0.8 PERSON recall falls faster than false positives do.
MIN_SCORE = {t: 0.75 if t == "PERSON" else 0.5 for t in PII_TYPES}
# Mean P(not O) a validated pattern match needs: the validator carries most of the evidence.
MIN_SUPPORT = 0.3
_TRIM = " \t\n\r.,;:!?()[]{}<>\"'`*"
_OPTIONS = re2.Options()
_OPTIONS.log_errors = False


def _re2(pattern: bytes) -> re2._Regexp:
    return re2.compile(pattern, _OPTIONS)


# Candidate shapes of the structured types, matched by RE2 (linear time: no backtracking) on the
# UTF-8 bytes of normalized text (normalize.py), so every digit and dash here is ASCII. RE2 has no
# look-around; a boundary the value must not touch is matched (group 1 is the value) and the
# next search starts at the value's end, so that boundary character can open the next match.
_CANDIDATES = {
    "EMAIL_ADDRESS": _re2(rb"()([A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+)"),
    "CREDIT_CARD": _re2(rb"(^|[^\d-])(\d(?:[ -]?\d){12,18})(?:[^\d-]|$)"),
    "IBAN_CODE": _re2(rb"(?i)()\b([a-z]{2}\d{2}(?: ?[a-z0-9]){8,30})\b"),
    "IP_ADDRESS": _re2(rb"(^|[^\d.])((?:\d{1,3}\.){3}\d{1,3})(?:[^\d.]|$)"),
    "IP_ADDRESS/6": _re2(rb"(?i)(^|[^\w:])((?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4})(?:[^\w:]|$)"),
    "US_SSN": _re2(rb"(^|[^\d-])(\d{3}-\d{2}-\d{4}|\d{3} \d{2} \d{4}|\d{9})(?:[^\d-]|$)"),
    "PHONE_NUMBER": _re2(rb"(^|[^\w+])((?:\+\d{1,3}[ .-]?)?\(?\d[\d ().-]{5,}\d)(?:\W|$)"),
}
STRUCTURED = frozenset(t.split("/")[0] for t in _CANDIDATES)
# Candidates examined per scan; past it the scan stops and says so (the rest is not checked).
MAX_CANDIDATES = 20_000


@dataclass(frozen=True, slots=True)
class Candidate:
    type: str
    start: int  # char offsets into the scanned text
    end: int


def candidates(
    text: str, types: frozenset[str] | None = None, limit: int = MAX_CANDIDATES
) -> tuple[list[Candidate], bool]:
    """Validated structured values in `text` (already normalized), and whether the whole text was
    examined (False: more than `limit` shapes were found and the rest was not looked at).

    Linear in len(text): RE2 scans, one bounded validator call per shape found.
    """
    data = text.encode("utf-8", "surrogatepass")
    char_at = None if len(data) == len(text) else _char_index(data)
    out: list[Candidate] = []
    seen = 0
    for key, pattern in _CANDIDATES.items():
        typ = key.split("/")[0]
        if types is not None and typ not in types:
            continue
        pos = 0
        while pos <= len(data):
            m = pattern.search(data, pos)
            if m is None:
                break
            a, b = m.span(2)
            pos = b if b > m.start() else m.start() + 1
            seen += 1
            if seen > limit:
                return out, False
            if char_at is not None:
                a, b = int(char_at[a]), int(char_at[b])
            a, b = _trim(text, a, b)
            if b > a and VALIDATORS[typ](text[a:b]):
                out.append(Candidate(typ, a, b))
    return out, True


def scan(text: str, types: frozenset[str] | None = None, limit: int = MAX_CANDIDATES) -> tuple[list[Candidate], bool]:
    """Validated structured values in `text` as sent: normalized first (normalize.py), offsets
    mapped back to `text`. Linear; what PII policies apply to the whole conversation."""
    norm = normalize(text)
    found, complete = candidates(norm.text, types, limit)
    if norm.starts is not None:
        found = [Candidate(c.type, *norm.span(c.start, c.end)) for c in found]
    return found, complete


# A structured value that is a whole JSON value under a key naming its type ({"ssn": "078-05-1120"},
# the shape of tool-call arguments) is that type by the sender's own label: with its validator
# passed, no words around it are needed (the tagger, reading context, scores such bare values low).
# The key is read in lower case with separators dropped; each type lists what its key contains.
_KEY_NAMES = {
    "US_SSN": ("ssn", "socialsecurity"),
    "EMAIL_ADDRESS": ("email", "mail"),
    "CREDIT_CARD": ("card", "ccnumber", "ccnum", "pan"),
    "IBAN_CODE": ("iban",),
    "PHONE_NUMBER": ("phone", "mobile", "telephone", "tel", "fax", "cell"),
    "IP_ADDRESS": ("ipaddr", "ipv4", "ipv6", "ip"),
}
# Short keys that must be the whole key (after separators are dropped), not part of a longer word.
_WHOLE_KEYS = frozenset({"pan", "tel", "fax", "cell", "ip", "mail"})
_KEY_BEFORE = re.compile(r'"([^"\\\n]{1,48})"\s*:\s*"?\Z')
_VALUE_AFTER = re.compile(r'"?\s{0,4}(?:[,}\]]|\Z)')
_KEY_SEPARATORS = re.compile(r"[^a-z0-9]")


def named_by_key(text: str, start: int, end: int, typ: str) -> bool:
    """True when text[start:end] is the whole value of a JSON member whose key names `typ`
    ({"ssn": "078-05-1120"}, {"contact_email": "a@b.io"}). Reads at most ~64 characters around."""
    before = _KEY_BEFORE.search(text, max(0, start - 64), start)
    if before is None or _VALUE_AFTER.match(text, end) is None:
        return False
    if (before.group(0).endswith('"')) != (text[end : end + 1] == '"'):
        return False  # an opening quote without its closing one: part of a longer string
    key = _KEY_SEPARATORS.sub("", before.group(1).lower())
    return any(key == name if name in _WHOLE_KEYS else name in key for name in _KEY_NAMES.get(typ, ()))


def _char_index(data: bytes) -> np.ndarray:
    """Char offset of every byte offset of UTF-8 `data` that starts a character (and of its end)."""
    starts = (np.frombuffer(data, np.uint8) & 0xC0) != 0x80
    return np.concatenate([[0], np.cumsum(starts)])


def type_probs(tag_probs: np.ndarray) -> np.ndarray:
    """[n, tags] BIO probabilities -> [n, types]: P(B-x) + P(I-x)."""
    return tag_probs[:, 1::2] + tag_probs[:, 2::2]


def merge_windows(n_tokens: int, windows: list[tuple[int, np.ndarray]]) -> np.ndarray:
    """Per-token tag probabilities for the whole text from overlapping windows.

    Each token takes its probabilities from the window in which it sits farthest from an edge,
    where it had the most context on both sides.
    """
    out = np.zeros((n_tokens, len(PII_TAGS)), np.float32)
    best = np.full(n_tokens, -1, np.int64)
    for start, probs in windows:
        n = len(probs)
        pos = np.arange(n)
        margin = np.minimum(pos, n - 1 - pos)
        idx = start + pos
        take = margin > best[idx]
        out[idx[take]] = probs[take]
        best[idx[take]] = margin[take]
    return out


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    span = text[start:end]
    inner = span.lstrip(_TRIM)
    start += len(span) - len(inner)
    return start, start + len(inner.rstrip(_TRIM))


_NAME_PARTICLES = frozenset(
    [
        "van",
        "von",
        "der",
        "den",
        "de",
        "del",
        "della",
        "di",
        "da",
        "dos",
        "das",
        "du",
        "la",
        "le",
        "bin",
        "ibn",
        "al",
        "el",
        "y",
        "e",
        "und",
        "and",
    ]
)


# No name or address has a longer word; a span inside a longer run of letters stays as tagged,
# and plausible() turns longer spans down, so no step walks a hostile 100,000-letter word.
MAX_WORD = 64
MAX_SPAN = {"PERSON": 120, "STREET_ADDRESS": 300}


def to_word_bounds(text: str, start: int, end: int) -> tuple[int, int]:
    """Widen a span that starts or ends inside a word (a sub-word token) to the whole word."""
    floor = max(0, start - MAX_WORD)
    while start > floor and text[start - 1].isalnum() and text[start].isalnum():
        start -= 1
    ceiling = min(len(text), end + MAX_WORD)
    while end < ceiling and text[end].isalnum() and text[end - 1].isalnum():
        end += 1
    return start, end


def plausible(text: str, start: int, end: int, typ: str) -> bool:
    """Shape checks for the types no checksum can confirm.

    A street address carries a number (house, suite, box or postcode) and a word: a bare number is
    not an address. A name does not cross a line break and is more than an option letter. In text
    that uses capital letters at all, every word of a name is capitalized (particles such as "van"
    or "de" aside); all-lowercase chat text is left to the tagger alone.
    """
    if end - start > MAX_SPAN.get(typ, 254):
        return False
    span = text[start:end]
    if typ == "STREET_ADDRESS":
        return any(c.isdigit() for c in span) and re.search(r"[^\W\d_]{2}", span) is not None
    if typ == "PERSON":
        words = re.findall(r"[^\W\d_]+", span)
        if "\n" in span or not any(len(w) > 1 for w in words):
            return False  # names do not cross lines; "G" is an option letter, not a name
        if _uses_capitals(text):
            return all(w[0].isupper() or w.lower() in _NAME_PARTICLES for w in words if len(w) > 1)
    return True


@lru_cache(maxsize=4)
def _uses_capitals(text: str) -> bool:
    """Once per text (decode asks for every span): str hashes are cached, so a hit is cheap."""
    return text.lower() != text


def tagged_spans(tag_probs: np.ndarray) -> list[tuple[int, int, int, float]]:
    """Greedy BIO decode: (type index, first token, last token + 1, mean type probability)."""
    tags = tag_probs.argmax(-1)
    tprobs = type_probs(tag_probs)
    spans = []
    i, n = 0, len(tags)
    while i < n:
        t = int(tags[i])
        if t == 0:
            i += 1
            continue
        typ = (t - 1) // 2
        j = i + 1
        while j < n and tags[j] == 2 + 2 * typ:  # I- of the same type
            j += 1
        spans.append((typ, i, j, float(tprobs[i:j, typ].mean())))
        i = j
    return spans


def decode(text: str, offsets: np.ndarray, tag_probs: np.ndarray) -> tuple[PiiSpan, ...]:
    """Character spans of PII in `text` from token offsets [n, 2] and tag probabilities [n, tags].

    Structured values come first: a pattern match that passes its validator is kept when the
    tagger sees PII there (of any type: the validator decides which), with the match's exact
    boundaries. Tagger spans fill in the rest; a structured-type tagger span must also validate.
    """
    if len(offsets) == 0:
        return ()
    confirmed = _confirmed(text, offsets, tag_probs)
    tagged: list[PiiSpan] = []
    for typ_i, a, b, score in tagged_spans(tag_probs):
        typ = PII_TYPES[typ_i]
        start, end = _trim(text, *to_word_bounds(text, int(offsets[a, 0]), int(offsets[b - 1, 1])))
        if end <= start or score < MIN_SCORE[typ] or not plausible(text, start, end, typ):
            continue
        check = VALIDATORS.get(typ)
        if check is not None and not check(text[start:end]):
            continue
        tagged.append(PiiSpan(typ, start, end, round(score, 4)))
    return _resolve(confirmed, tagged)


def _confirmed(text: str, offsets: np.ndarray, tag_probs: np.ndarray) -> list[PiiSpan]:
    any_pii = 1.0 - tag_probs[:, 0]
    tprobs = type_probs(tag_probs)
    out = []
    found, _ = candidates(text)
    for c in found:
        # A phone-number shape is too common (postcodes, house numbers) to accept on any PII tag.
        pii_prob = tprobs[:, PII_TYPES.index(c.type)] if c.type == "PHONE_NUMBER" else any_pii
        covered = (offsets[:, 0] < c.end) & (offsets[:, 1] > c.start)
        if not covered.any():
            continue
        support = float(pii_prob[covered].mean())
        if support >= MIN_SUPPORT:
            out.append(PiiSpan(c.type, c.start, c.end, round(support, 4)))
    return out


def _resolve(first: list[PiiSpan], then: list[PiiSpan]) -> tuple[PiiSpan, ...]:
    """Drop overlaps: every span of `first` beats `then`; within each, higher score, then longer."""
    kept: list[PiiSpan] = []
    for group in (first, then):
        for s in sorted(group, key=lambda s: (-s.score, s.start - s.end)):
            if all(s.end <= k.start or s.start >= k.end for k in kept):
                kept.append(s)
    return tuple(sorted(kept, key=lambda s: s.start))
