"""Tokenization and the sequences each text becomes: PII windows and one pooled view.

Both are bounded, whatever the text's length (the classifier's token budget, README "Routing
policy reference"). Domain and complexity read one sequence: the whole text when it fits in one
window, otherwise its first and last tokens (head + tail), where the topic and the actual ask
usually are. The PII tagger reads the text's first `pii_tokens` tokens in overlapping windows.
Only slices of a long text are tokenized: at most `CHARS_PER_TOKEN` characters per token wanted,
so a megabyte prompt costs what a few kilobytes do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

CLS_ID = 101
SEP_ID = 102
MAX_TOKENS = 512  # the encoder's position table
WINDOW = MAX_TOKENS - 2  # content tokens per sequence
OVERLAP = 64  # tokens shared by consecutive PII windows
# Tokens the PII tagger reads per request (policy: classifier.pii_tokens): one window. With the
# pooled head + tail of a long message that is two encoder runs, ~250 ms on two busy cores,
# inside the default 300 ms deadline.
DEFAULT_PII_TOKENS = 510
# Characters read per token wanted. English prose averages ~4.5 per WordPiece token and code ~3;
# a slice of 8 per token yields the tokens wanted for nearly all text, and bounds the work for
# text that does not (long words and runs of symbols become few tokens).
CHARS_PER_TOKEN = 8


def load_tokenizer(path: Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    # The base model's tokenizer.json pads and truncates to 128; windowing is ours to do.
    tok.no_padding()
    tok.no_truncation()
    return tok


@dataclass(frozen=True, slots=True)
class Encoded:
    ids: np.ndarray  # int64 [n] without special tokens
    offsets: np.ndarray  # int64 [n, 2] character offsets into the text


def encode(tok: Tokenizer, texts: list[str]) -> list[Encoded]:
    out = []
    for e in tok.encode_batch(texts, add_special_tokens=False):
        ids = np.asarray(e.ids, dtype=np.int64)
        offs = np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2)
        out.append(Encoded(ids, offs))
    return out


def head_slice(text: str, tokens: int) -> str:
    """The start of `text` long enough for `tokens` tokens (nearly always), cut at a space."""
    limit = tokens * CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", limit - 64, limit)
    return text[: cut if cut > 0 else limit]


def tail_slice(text: str, tokens: int) -> tuple[int, str]:
    """(offset, slice): the end of `text` long enough for `tokens` tokens, cut at a space."""
    limit = tokens * CHARS_PER_TOKEN
    if len(text) <= limit:
        return 0, text
    at = len(text) - limit
    cut = text.find(" ", at, at + 64)
    at = cut + 1 if cut >= 0 else at
    return at, text[at:]


def window_starts(n: int, window: int = WINDOW, overlap: int = OVERLAP) -> list[int]:
    """Token start of every window so that windows cover [0, n) with `overlap` shared tokens."""
    if n <= window:
        return [0]
    stride = window - overlap
    starts = list(range(0, n - window, stride))
    starts.append(n - window)
    return starts


def head_tail(ids: np.ndarray, budget: int = WINDOW) -> np.ndarray:
    if len(ids) <= budget:
        return ids
    head = budget // 2
    return np.concatenate([ids[:head], ids[len(ids) - (budget - head) :]])


def with_specials(ids: np.ndarray) -> np.ndarray:
    return np.concatenate([[CLS_ID], ids, [SEP_ID]]).astype(np.int64)
