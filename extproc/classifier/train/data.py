"""Loading MMLU-Pro and GSM8K, the split by question text, and the complexity labels."""

from __future__ import annotations

import ast
import csv
import gzip
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from extproc.classifier.labels import DOMAINS

WEAK = "Meta-Llama-3_1-8B-Instruct"
STRONG = "Meta-Llama-3_1-70B-Instruct"
META_COLUMNS = ("question_id", "category", "src", "question", "options", "answer")


@dataclass(frozen=True)
class Question:
    qid: str
    text: str
    options: tuple[str, ...]
    domain: int  # index into DOMAINS
    src: str
    correct: dict[str, bool]  # model -> answered correctly (empty cells left out)
    split: str  # "train" | "val" | "test"

    @property
    def pair_label(self) -> int | None:
        """1 when the weak model fails and the strong one succeeds; None if a cell is empty."""
        if WEAK not in self.correct or STRONG not in self.correct:
            return None
        return int(not self.correct[WEAK] and self.correct[STRONG])

    def with_options(self) -> str:
        return self.text + "\n" + "\n".join(f"{chr(65 + i)}) {o}" for i, o in enumerate(self.options))


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def split_of(text: str) -> str:
    """Deterministic 80/10/10 split keyed on the normalized question text.

    Keying on the text (not the row) keeps duplicated questions on one side.
    """
    h = int(hashlib.sha1(normalize(text).encode()).hexdigest()[:8], 16) % 100
    return "test" if h < 10 else "val" if h < 20 else "train"


def load_mmlu(data: Path) -> tuple[list[Question], list[str]]:
    with gzip.open(data / "mmlu_pro.csv.gz", "rt", newline="") as f:
        reader = csv.DictReader(f)
        models = [c for c in reader.fieldnames or [] if c not in META_COLUMNS]
        out = []
        for r in reader:
            correct = {m: r[m] == "True" for m in models if r[m] in ("True", "False")}
            out.append(
                Question(
                    qid=r["question_id"],
                    text=r["question"].strip(),
                    options=tuple(str(o) for o in ast.literal_eval(r["options"])),
                    domain=DOMAINS.index(r["category"]),
                    src=r["src"],
                    correct=correct,
                    split=split_of(r["question"]),
                )
            )
    return out, models


def load_gsm8k(data: Path, limit: int, seed: int) -> list[str]:
    with gzip.open(data / "gsm8k_train.jsonl.gz", "rt") as f:
        qs = [json.loads(line)["question"].strip() for line in f]
    random.Random(seed).shuffle(qs)
    return qs[:limit]
