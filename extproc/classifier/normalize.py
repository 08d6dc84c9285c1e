"""Text as PII detection reads it: one canonical spelling per character, invisible ones removed,
with every character of the result mapped back to where it came from.

Each character is replaced on its own (so offsets map back exactly) by:
- NFKC compatibility forms: full-width and mathematical digits, circled and superscript numbers,
  ligatures, non-breaking and other spaces;
- its digit value, for decimal digits of any script (Arabic-Indic, Devanagari, Thai, ...);
- '-', for dashes and minus signs (Unicode category Pd, U+2212 and friends);
- nothing, for format controls (category Cf: zero-width space, joiners, word joiner, soft hyphen,
  BOM, bidi embeddings and isolates, tag characters) and combining marks (Mn, Me: accents
  stacked on digits; the encoder's uncased tokenizer strips accents anyway).

Not covered: letters of other scripts that look like Latin ones (a Cyrillic a in an e-mail),
HTML or URL escapes, digits spelled out in words, values split by ordinary spaces or across
messages. ASCII text is returned as it is, without any work.
"""

from __future__ import annotations

import sys
import unicodedata
from dataclasses import dataclass
from functools import cache

import numpy as np

_MINUS_LIKE = "\u2212\u2796\ufe63\uff0d\u02d7\u2043"


@dataclass(frozen=True, slots=True)
class Normalized:
    text: str
    # Source index of each character of `text`, and one past the last source index it covers
    # (a removed source character belongs to no output character). None: the identity map.
    starts: np.ndarray | None = None
    ends: np.ndarray | None = None

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The source span of `text[start:end]` (end > start)."""
        if self.starts is None or self.ends is None:
            return start, end
        return int(self.starts[start]), int(self.ends[end - 1])


def _replacement(c: str) -> str:
    category = unicodedata.category(c)
    if category in ("Cf", "Mn", "Me"):
        return ""
    if category == "Nd":
        return str(unicodedata.digit(c))
    if category == "Pd" or c in _MINUS_LIKE:
        return "-"
    folded = unicodedata.normalize("NFKC", c)
    # Compatibility forms may carry marks or digits of their own ("①" -> "1", "ǆ" stays letters).
    return "".join(_replacement(f) if f != c else f for f in folded) if folded != c else c


_CHUNK = 1 << 20  # characters per step: each numpy call on a chunk takes milliseconds


@dataclass(frozen=True, slots=True)
class _Tables:
    length: np.ndarray  # [code point] -> length of its replacement (1 for unchanged ones)
    first: np.ndarray  # [code point] -> first code point of its replacement (itself if unchanged)
    multi_row: np.ndarray  # [code point] -> row of `multi` for replacements of 2+ characters
    multi: np.ndarray  # [row, k] -> k-th code point of that replacement


@cache
def _tables() -> _Tables:
    length = np.ones(sys.maxunicode + 1, np.int8)
    first = np.arange(sys.maxunicode + 1, dtype=np.uint32)
    multi_row = np.zeros(sys.maxunicode + 1, np.int32)
    rows: list[str] = [""]
    for cp in range(0x80, sys.maxunicode + 1):
        if 0xD800 <= cp < 0xE000:
            continue
        c = chr(cp)
        if unicodedata.category(c) == "Cn":
            continue  # unassigned: left as it is
        out = _replacement(c)
        if out == c:
            continue
        length[cp] = len(out)
        if out:
            first[cp] = ord(out[0])
        if len(out) > 1:
            multi_row[cp] = len(rows)
            rows.append(out)
    width = max(len(r) for r in rows)
    multi = np.zeros((len(rows), width), np.uint32)
    for i, r in enumerate(rows):
        multi[i, : len(r)] = [ord(c) for c in r]
    return _Tables(length, first, multi_row, multi)


def warm() -> None:
    """Build the tables now (under a second, once per process) rather than on the first request."""
    _tables()


def normalize(text: str) -> Normalized:
    """`text` with each character replaced as the module docstring says. Linear, in numpy steps of
    at most a million characters (so no single step holds the interpreter for long)."""
    if text.isascii():
        return Normalized(text)
    tables = _tables()
    parts, starts, ends = [], [], []
    changed = False
    for at in range(0, len(text), _CHUNK):
        chunk = text[at : at + _CHUNK]
        cps = np.frombuffer(chunk.encode("utf-32-le", "surrogatepass"), np.uint32)
        n = tables.length[cps]
        if not changed and (n == 1).all() and (tables.first[cps] == cps).all():
            parts.append(chunk)
            starts.append(None)
            continue
        changed = True
        if (n == 1).all():  # one for one (full-width or other-script digits): no shifts
            src = np.arange(len(chunk), dtype=np.int32)
            out = tables.first[cps]
            end = src + 1
        else:
            src = np.repeat(np.arange(len(chunk), dtype=np.int32), n)
            out = tables.first[cps[src]]
            if (n > 1).any():
                offsets = (np.cumsum(n) - n).astype(np.int32)
                several = np.flatnonzero(n[src] > 1)
                rank = several - offsets[src[several]]
                out[several] = tables.multi[tables.multi_row[cps[src[several]]], rank]
            # A character's span ends where the next kept source character starts: removed ones
            # belong to the character before them, so a redaction takes them along.
            kept = np.flatnonzero(n).astype(np.int32)
            end_of = np.empty(len(chunk), np.int32)
            end_of[kept] = np.append(kept[1:], np.int32(len(chunk)))
            end = end_of[src]
        parts.append(out.tobytes().decode("utf-32-le", "surrogatepass"))
        starts.append(src.astype(np.int64) + at)
        ends.append(end.astype(np.int64) + at)
    if not changed:
        return Normalized(text)
    # Chunks before the first change were kept whole: give them the identity map.
    full_starts, full_ends = [], []
    pos = 0
    for part, s in zip(parts, starts, strict=True):
        if s is None:
            ident = np.arange(pos, pos + len(part), dtype=np.int64)
            full_starts.append(ident)
            full_ends.append(ident + 1)
        pos += _CHUNK
    full_starts.extend(s for s in starts if s is not None)
    full_ends.extend(ends)
    st, en = np.concatenate(full_starts), np.concatenate(full_ends)
    # A chunk's last kept character ends at the chunk's end; the next chunk may begin with removed
    # characters, which then belong to it. Good enough: they are invisible either way.
    return Normalized("".join(parts), st, en)
