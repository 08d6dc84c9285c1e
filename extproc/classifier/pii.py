"""From per-token BIO probabilities to character spans, confirmed by validators.

Pure functions over numpy arrays, so they test without a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from extproc.classifier.labels import PII_TAGS, PII_TYPES
from extproc.classifier.validators import VALIDATORS


@dataclass(frozen=True, slots=True)
class PiiSpan:
    type: str  # e.g. "EMAIL_ADDRESS"
    start: int  # char offsets into the text given to classify
    end: int
    score: float


# Minimum mean tag probability over a span; structured types are also checked by a validator.
MIN_SCORE = {t: 0.5 for t in PII_TYPES}
# Tagger support a validated regex candidate needs: the validator carries most of the evidence.
MIN_SUPPORT = 0.3
_TRIM = " \t\n\r.,;:!?()[]{}<>\"'`*"
_CANDIDATES = {
    "EMAIL_ADDRESS": re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+"),
    "CREDIT_CARD": re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"),
    "IBAN_CODE": re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){8,30}\b", re.IGNORECASE),
    "IP_ADDRESS": re.compile(
        r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])|(?<![\w:])(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}(?![\w:])",
        re.IGNORECASE,
    ),
    "US_SSN": re.compile(r"(?<![\d-])\d{3}([- ]?)\d{2}\1\d{4}(?![\d-])"),
}


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
    while start < end and text[start] in _TRIM:
        start += 1
    while end > start and text[end - 1] in _TRIM:
        end -= 1
    return start, end


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
    """Character spans of PII in `text` from token offsets [n, 2] and tag probabilities [n, tags]."""
    if len(offsets) == 0:
        return ()
    tprobs = type_probs(tag_probs)
    found: list[PiiSpan] = []
    for typ_i, a, b, score in tagged_spans(tag_probs):
        typ = PII_TYPES[typ_i]
        start, end = _trim(text, int(offsets[a, 0]), int(offsets[b - 1, 1]))
        if end <= start or score < MIN_SCORE[typ]:
            continue
        check = VALIDATORS.get(typ)
        if check is not None and not check(text[start:end]):
            continue  # a regex candidate inside may still confirm it below
        found.append(PiiSpan(typ, start, end, round(score, 4)))
    for typ, pattern in _CANDIDATES.items():
        ti = PII_TYPES.index(typ)
        for m in pattern.finditer(text):
            start, end = _trim(text, m.start(), m.end())
            if not VALIDATORS[typ](text[start:end]):
                continue
            covered = (offsets[:, 0] < end) & (offsets[:, 1] > start)
            if not covered.any():
                continue
            support = float(tprobs[covered, ti].mean())
            if support >= MIN_SUPPORT:
                found.append(PiiSpan(typ, start, end, round(support, 4)))
    return _resolve(found)


def _resolve(spans: list[PiiSpan]) -> tuple[PiiSpan, ...]:
    """Drop duplicates and overlaps, keeping the higher-scoring (then longer) span."""
    kept: list[PiiSpan] = []
    for s in sorted(spans, key=lambda s: (-s.score, s.start - s.end)):
        if all(s.end <= k.start or s.start >= k.end for k in kept):
            kept.append(s)
    return tuple(sorted(kept, key=lambda s: s.start))
