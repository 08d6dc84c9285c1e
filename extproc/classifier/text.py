"""Tokenization and the sequences each text becomes: PII windows and one pooled view.

PII is scanned over the whole text in overlapping windows, so nothing late in a long prompt is
missed. Domain and complexity read one sequence: the whole text when it fits in one window,
otherwise its first and last tokens (head + tail), where the topic and the actual ask usually are.
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
