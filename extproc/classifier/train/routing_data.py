"""Prompts with per-model quality from every shared data set, in one shape, for the complexity head.

Each item: a prompt, a score in [0, 1] per model (None: not measured), the split it belongs to,
its kind (exam, math, code or chat) and a category. Judge scores become [0, 1] linearly:
arena_bench_v1's 1-10 GPT-4 grades as (s - 1) / 9, alpaca_eval's weighted preference p in [1, 2]
against gpt4_1106_preview as p - 1 (the probability the model's answer won).

alpaca_eval is CC BY-NC: `load(..., include_alpaca=True)` is for evaluation only and nothing trained
here reads it. MMLU's own splits, MT-bench and RouteLLM's evaluation data are not read at all.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from extproc.classifier.labels import DOMAINS
from extproc.classifier.train.data import load_gsm8k, load_mmlu, normalize

_CODE = re.compile(
    r"```|\bdef \w+\(|\bclass \w+[:(]|\bfunction\b|\bpython\b|\bjavascript\b|\bjava\b|\bc\+\+|\bsql\b|\brust\b|"
    r"\bbash\b|\bcode\b|\bscript\b|\bregex\b|\bapi\b|\bcompile|\bprogram\b|\bhtml\b|\bcss\b|#include|\bimport \w+",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Item:
    dataset: str  # mmlu_pro | dcrouter | arena | alpaca | gsm8k
    id: str
    text: str
    scores: dict[str, float]  # model -> quality in [0, 1]; models not measured are absent
    split: str  # train | val | test
    kind: str  # exam | math | code | chat
    category: str
    steps: int = 0  # gsm8k only: calculation steps in the reference solution


def _split(text: str, test_share: int = 10, val_share: int = 10) -> str:
    h = int(hashlib.sha1(normalize(text).encode()).hexdigest()[:8], 16) % 100
    return "test" if h < test_share else "val" if h < test_share + val_share else "train"


def _is_code(text: str) -> bool:
    return _CODE.search(text) is not None


def mmlu_pro(data: Path) -> list[Item]:
    questions, _ = load_mmlu(data)
    return [
        Item(
            "mmlu_pro",
            f"mmlu-pro-{q.qid}",
            q.with_options(),
            {m: float(v) for m, v in q.correct.items()},
            q.split,
            "exam",
            DOMAINS[q.domain],
        )
        for q in questions
    ]


def _dcrouter_task(text: str) -> str:
    if text.startswith("Q: There are") and "house" in text[:200]:
        return "puzzle"
    if "\\boxed" in text or "$" in text:
        return "math"
    if re.match(r"^([a-z]+, ){5,}", text):
        return "wordlist"
    if len(text) > 600:
        return "reading"
    return "qa"


def dcrouter(data: Path) -> list[Item]:
    out = []
    for split in ("train", "test"):
        with gzip.open(data / "llmrouter_dcrouter" / f"{split}.json.gz", "rt", encoding="utf-8") as f:
            rows = json.load(f)
        for i, r in enumerate(rows):
            task = _dcrouter_task(r["question"])
            # dcrouter's own split; its train part also gives a validation share by text hash
            sp = "test" if split == "test" else ("val" if _split(r["question"], 0, 10) == "val" else "train")
            out.append(
                Item(
                    "dcrouter",
                    f"dcrouter-{split}-{i}",
                    r["question"],
                    {m: float(v) for m, v in r["scores"].items()},
                    sp,
                    "math" if task == "math" else "exam",
                    task,
                )
            )
    return out


def arena(data: Path) -> list[Item]:
    out = []
    with gzip.open(data / "arena_bench_v1" / "scores.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            scores = {
                m: (float(s) - 1.0) / 9.0 for m, s in r["scores"].items() if m != "gpt-4_single" and s is not None
            }
            kind = "code" if _is_code(r["prompt"]) else "chat"
            out.append(
                Item("arena", f"arena-{r['question_id']}", r["prompt"], scores, _split(r["prompt"], 50, 0), kind, kind)
            )
    return out


def alpaca(data: Path) -> list[Item]:
    """Evaluation only (CC BY-NC 4.0)."""
    out = []
    with gzip.open(data / "alpaca_eval" / "preferences.jsonl.gz", "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            r = json.loads(line)
            scores = {
                m: float(p) - 1.0
                for m, p in r["preference_vs_gpt4_turbo"].items()
                if m != "NullModel" and p is not None
            }
            kind = "code" if _is_code(r["prompt"]) else "chat"
            out.append(Item("alpaca", f"alpaca-{i}", r["prompt"], scores, "test", kind, kind))
    return out


def gsm8k(data: Path) -> list[Item]:
    """GSM8K train questions with no model scores: their label is the number of calculation steps
    (`<<...>>` annotations) in the reference solution, a model-free difficulty."""
    with gzip.open(data / "gsm8k_train.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [
        Item(
            "gsm8k",
            f"gsm8k-{i}",
            r["question"].strip(),
            {},
            _split(r["question"], 0, 10),
            "math",
            "math",
            max(1, r["answer"].count("<<")),
        )
        for i, r in enumerate(rows)
    ]


def load(data: Path, *, include_alpaca: bool = False) -> list[Item]:
    items = mmlu_pro(data) + dcrouter(data) + arena(data) + gsm8k(data)
    if include_alpaca:
        items += alpaca(data)
    return items


__all__ = ["Item", "alpaca", "arena", "dcrouter", "gsm8k", "load", "load_gsm8k", "mmlu_pro"]
