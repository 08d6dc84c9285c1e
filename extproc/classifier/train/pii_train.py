"""PII training set: generated examples -> token sequences with BIO tag ids."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from extproc.classifier.labels import PII_TAGS
from extproc.classifier.text import WINDOW, encode, with_specials
from extproc.classifier.train.pii_data import Example

IGNORE = -100


def bio_labels(offsets: np.ndarray, spans: list[tuple[int, int, str]]) -> np.ndarray:
    """A token inside a span is B- when it is the span's first token, else I-."""
    tags = np.zeros(len(offsets), np.int64)
    for start, end, typ in spans:
        inside = np.nonzero((offsets[:, 0] < end) & (offsets[:, 1] > start))[0]
        if len(inside) == 0:
            continue
        tags[inside[0]] = PII_TAGS.index(f"B-{typ}")
        tags[inside[1:]] = PII_TAGS.index(f"I-{typ}")
    return tags


def pii_sequences(tok: Tokenizer, examples: list[Example]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Token ids with specials and tag ids (IGNORE on [CLS]/[SEP]), cut to one window."""
    seqs, labels = [], []
    for ex, e in zip(examples, encode(tok, [x.text for x in examples]), strict=True):
        tags = bio_labels(e.offsets, ex.spans)[:WINDOW]
        seqs.append(with_specials(e.ids[:WINDOW]))
        labels.append(np.concatenate([[IGNORE], tags, [IGNORE]]))
    return seqs, labels
