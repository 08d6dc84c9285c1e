"""Prompt token counts for `tokens` conditions.

Counted with the encoder's WordPiece tokenizer, which ships with the package. Every served
model has its own tokenizer, so this is an estimate of the same order as theirs, not their
exact count; rules should use it for ranges (short / long / very long), not exact limits.

The count is bounded work whatever the prompt: the first `EXACT_CHARS` characters of a request
(newest messages first, at most `EXACT_MESSAGES` of them) are tokenized exactly; the rest is
estimated at the ratio of tokens to characters measured on what was tokenized (sampled from the
head and tail of a long message).
A 500 KB conversation costs what 32 KB does, and its count is within a few percent for prose.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

TOKENIZER_PATH = Path(__file__).resolve().parent.parent / "classifier" / "model" / "tokenizer.json"
EXACT_CHARS = 32_768  # characters per request counted exactly
EXACT_MESSAGES = 256  # messages per request counted exactly (each is a tokenizer call)
SAMPLE_CHARS = 8_192  # of a longer message: this much of its head and of its tail
_DEFAULT_RATIO = 0.25  # tokens per character when nothing could be measured (~4 characters a token)


class TokenCounter:
    def __init__(self, tokenizer_path: Path = TOKENIZER_PATH, cache_size: int = 4096) -> None:
        self._tokenizer = None
        if tokenizer_path.exists():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(tokenizer_path))
            tokenizer.no_truncation()
            tokenizer.no_padding()
            self._tokenizer = tokenizer
        # Messages repeat across the turns of a conversation; each is counted once. Keyed by a
        # digest: the cache never holds prompt text.
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._cache_size = cache_size

    def count(self, text: str) -> int:
        """Exact tokens of `text` (keep it short: this is linear in its length)."""
        if not text:
            return 0
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        if self._tokenizer is None:
            n = (len(text) + 3) // 4  # no tokenizer file: about four characters per token
        else:
            # encode_batch releases the GIL while the Rust side works; encode does not.
            [e] = self._tokenizer.encode_batch([text], add_special_tokens=False)
            n = len(e.ids)
        self._cache[key] = n
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return n

    def count_all(self, texts: Sequence[str]) -> tuple[int, bool]:
        """(tokens of all texts, whether part of that was estimated)."""
        left = EXACT_CHARS
        measured_tokens = measured_chars = 0  # what was tokenized, for the ratio
        total = 0
        rest = 0  # characters of messages left to estimate at the ratio
        estimated = False
        for i, text in enumerate(reversed(texts)):
            if i >= EXACT_MESSAGES:
                rest += sum(map(len, texts[: len(texts) - i]))
                break
            if len(text) <= left:
                n = self.count(text)
                total += n
                measured_tokens += n
                measured_chars += len(text)
                left -= len(text)
            elif len(text) > 2 * SAMPLE_CHARS and left >= 2 * SAMPLE_CHARS:
                # One long message: its own head and tail give its ratio.
                sampled = self.count(text[:SAMPLE_CHARS]) + self.count(text[-SAMPLE_CHARS:])
                total += round(sampled * len(text) / (2 * SAMPLE_CHARS))
                measured_tokens += sampled
                measured_chars += 2 * SAMPLE_CHARS
                left -= 2 * SAMPLE_CHARS
                estimated = True
            else:
                rest += len(text)
        if rest:
            ratio = measured_tokens / measured_chars if measured_chars else _DEFAULT_RATIO
            total += round(rest * ratio)
            estimated = True
        return total, estimated
