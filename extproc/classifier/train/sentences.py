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


@dataclass
class ChatSet:
    """Chat-style training text for the domain head (train/chat_style.py), train split only."""

    seqs: list[np.ndarray]
    domain: np.ndarray  # [n] class index
    src: list[str]  # auxiliary label: the question's MMLU-Pro source, "gsm8k" or "chat-topic"


def seqs_of(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    return [with_specials(head_tail(e.ids, TRAIN_TOKENS - 2)) for e in encode(tok, texts)]


def chat_set(
    tok: Tokenizer,
    questions: list[Question],
    gsm8k: list[str],
    topics_per_domain: int,
    seed: int,
    exclude: tuple[str, ...] = (),
) -> ChatSet:
    """Every train-split question rephrased once as a user would type it, `gsm8k` word problems
    likewise (as math), and `topics_per_domain` short topic requests per domain (topics found in
    `exclude`, the dev set's prompts, left out)."""
    import random

    from extproc.classifier.train import chat_style

    rng = random.Random(seed)
    texts, dom, src = [], [], []
    for q in questions:
        if q.split == "train":
            texts.append(chat_style.rephrase(q.text, rng))
            dom.append(q.domain)
            src.append(q.src)
    for t in gsm8k:
        texts.append(chat_style.rephrase(t, rng))
        dom.append(DOMAINS.index("math"))
        src.append("gsm8k")
    for t, d in chat_style.topic_prompts(topics_per_domain, seed + 1, exclude):
        texts.append(t)
        dom.append(d)
        src.append("chat-topic")
    return ChatSet(seqs_of(tok, texts), np.array(dom), src)
