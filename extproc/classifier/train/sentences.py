"""The training sequences for the pooled heads (domain, complexity)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from extproc.classifier.labels import DOMAINS
from extproc.classifier.text import encode, head_tail, with_specials
from extproc.classifier.train.data import Question

TRAIN_TOKENS = 128  # training-time head+tail cap (runtime reads up to 510): keeps the cache small


@dataclass
class PooledSet:
    seqs: list[np.ndarray]
    domain: np.ndarray  # [n] class index
    question: np.ndarray  # [n] index into the question list, -1 for GSM8K
    variant: np.ndarray  # [n] 0 = question only, 1 = with options, 2 = GSM8K
    split: np.ndarray  # [n] "train" | "val" | "test"


def pooled_set(tok: Tokenizer, questions: list[Question], gsm8k: list[str]) -> PooledSet:
    texts, dom, qi, var, split = [], [], [], [], []
    for i, q in enumerate(questions):
        for v, t in ((0, q.text), (1, q.with_options())):
            texts.append(t)
            dom.append(q.domain)
            qi.append(i)
            var.append(v)
            split.append(q.split)
    for t in gsm8k:
        texts.append(t)
        dom.append(DOMAINS.index("math"))
        qi.append(-1)
        var.append(2)
        split.append("train")
    seqs = [with_specials(head_tail(e.ids, TRAIN_TOKENS - 2)) for e in encode(tok, texts)]
    return PooledSet(seqs, np.array(dom), np.array(qi), np.array(var), np.array(split))
