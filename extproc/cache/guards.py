"""What a sentence embedding does not see, checked exactly.

all-MiniLM-L6-v2's mean-pooled embedding hardly moves when a number changes or a "not" appears:
on the paraphrase set (bench/cache_paraphrases.py) half of the number and negation look-alikes
score above 0.8, where 88-99% of the true paraphrases are. So the cache asks more than similarity:

* the numbers and the negations of the question are part of the scope (``markers``): "5 minutes"
  never serves "12 minutes", "is it safe" never serves "is it not safe";
* a question that differs from the stored one by swapping one or two content words and nothing
  else, or by the direction of the words they share (``lookalike``), is not served: that is how
  "read a file" becomes "write a file", "export" becomes "import" and "euros to yen" becomes
  "yen to euros", while paraphrases reword more than that, or only function words.

Both read the question only: nothing here stores prompt text (``words`` keeps 8-byte digests).
"""

from __future__ import annotations

import hashlib
import re

_TOKEN = re.compile(r"[0-9]+(?:[.,][0-9]+)*|[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)
_NUMBER_WORDS = frozenset(
    [
        "zero",
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "ten",
        "eleven",
        "twelve",
        "thirteen",
        "fourteen",
        "fifteen",
        "sixteen",
        "seventeen",
        "eighteen",
        "nineteen",
        "twenty",
        "thirty",
        "forty",
        "fifty",
        "sixty",
        "seventy",
        "eighty",
        "ninety",
        "hundred",
        "thousand",
        "million",
        "billion",
        "half",
        "twice",
        "dozen",
        "first",
        "second",
        "third",
        "once",
    ]
)
_NEGATIONS = frozenset(
    [
        "not",
        "no",
        "never",
        "none",
        "nothing",
        "nobody",
        "nowhere",
        "neither",
        "nor",
        "without",
        "cannot",
        "can't",
        "don't",
        "doesn't",
        "didn't",
        "isn't",
        "aren't",
        "wasn't",
        "weren't",
        "won't",
        "wouldn't",
        "shouldn't",
        "couldn't",
        "mustn't",
        "haven't",
        "hasn't",
        "hadn't",
        "unsafe",
        "unable",
    ]
)
# Function words: rewording them keeps the question (how do / how can / what is the way).
_FUNCTION = frozenset(
    [
        "a",
        "an",
        "the",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "am",
        "do",
        "does",
        "did",
        "done",
        "can",
        "could",
        "would",
        "should",
        "will",
        "shall",
        "may",
        "might",
        "must",
        "have",
        "has",
        "had",
        "i",
        "me",
        "my",
        "mine",
        "you",
        "your",
        "we",
        "our",
        "us",
        "they",
        "them",
        "their",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "what",
        "which",
        "who",
        "whom",
        "whose",
        "how",
        "why",
        "when",
        "where",
        "there",
        "here",
        "of",
        "to",
        "in",
        "on",
        "at",
        "for",
        "from",
        "by",
        "with",
        "about",
        "into",
        "onto",
        "over",
        "under",
        "as",
        "and",
        "or",
        "but",
        "if",
        "then",
        "so",
        "than",
        "too",
        "very",
        "just",
        "please",
        "tell",
        "give",
        "show",
        "me",
        "some",
        "any",
        "way",
        "ways",
        "get",
        "got",
        "make",
        "let's",
        "let",
        "out",
        "up",
        "down",
        "off",
    ]
)


def tokens(text: str) -> list[str]:
    return [t.lower().replace(",", "") for t in _TOKEN.findall(text)]


def markers(text: str) -> bytes:
    """The question's numbers and negations, in order: part of the exact scope."""
    toks = tokens(text)
    kept = [t for t in toks if t[0].isdigit() or t in _NUMBER_WORDS or t in _NEGATIONS or t.endswith("n't")]
    return "\0".join(kept).encode()


def _stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            return word[: -len(suffix)]
    return word


_DIRECTIONS = frozenset({"to", "into", "from"})


def words(text: str) -> tuple[int, ...]:
    """Digests of the question's content words (stemmed), in order of first use; a word that is
    the object of "to", "into" or "from" is marked by its lowest bit (0: to/into, the rest
    cleared; see lookalike). What the look-alike check compares."""
    out: dict[int, None] = {}
    role = 0
    for t in tokens(text):
        if t in _DIRECTIONS:
            role = 2 if t == "from" else 1
            continue
        if t in _FUNCTION:
            continue
        digest = int.from_bytes(hashlib.blake2b(_stem(t).encode(), digest_size=8).digest(), "big") & ~3
        out.setdefault(digest | role, None)
        role = 0
    return tuple(out)


def lookalike(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """True when b is a with one or two content words swapped for others and nothing else
    changed (another verb, object or degree), or when the words the two share go to (or come
    from) different places ("euros to yen" against "yen to euros"): look-alikes, not rewordings."""
    plain_a, plain_b = {w & ~3 for w in a}, {w & ~3 for w in b}
    gone, new = plain_a - plain_b, plain_b - plain_a
    if 1 <= len(gone) <= 2 and len(gone) == len(new) and len(plain_a & plain_b) >= len(gone):
        return True
    shared = plain_a & plain_b
    to_a, from_a = _with_role(a, 1, shared), _with_role(a, 2, shared)
    to_b, from_b = _with_role(b, 1, shared), _with_role(b, 2, shared)
    return (
        bool(to_a and to_b and to_a != to_b)
        or bool(from_a and from_b and from_a != from_b)
        or bool(to_a & from_b)
        or bool(from_a & to_b)
    )


def _with_role(ws: tuple[int, ...], role: int, among: set[int]) -> set[int]:
    return {w & ~3 for w in ws if w & 3 == role and w & ~3 in among}
