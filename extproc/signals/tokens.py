"""Prompt token counts for `tokens` conditions.

Counted with the encoder's WordPiece tokenizer, which ships with the package. Every served
model has its own tokenizer, so this is an estimate of the same order as theirs, not their
exact count; rules should use it for ranges (short / long / very long), not exact limits.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

TOKENIZER_PATH = Path(__file__).resolve().parent.parent / "classifier" / "model" / "tokenizer.json"


class TokenCounter:
    def __init__(self, tokenizer_path: Path = TOKENIZER_PATH, cache_size: int = 4096) -> None:
        self._tokenizer = None
        if tokenizer_path.exists():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tokenizer_path))
            tokenizer.no_truncation()
            tokenizer.no_padding()
            self._tokenizer = tokenizer
        # Messages repeat across the turns of a conversation; each is counted once.
        self.count = lru_cache(maxsize=cache_size)(self._count)

    def _count(self, text: str) -> int:
        if not text:
            return 0
        if self._tokenizer is None:
            return (len(text) + 3) // 4  # no tokenizer file: about four characters per token
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)
