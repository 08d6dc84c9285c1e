"""False positives of the labelled-value rule (a structured value under a JSON key naming its
type counts on its validator; extproc/classifier/pii.py ``named_by_key``) on PII-free text.

Each text gets the PII check as the bundled policy runs it (the six structured types,
min_score 0.5, the shipped encoder), once with the rule and once without (same run). Only texts
holding a validated structured shape can change; the others are counted but need no encoder.
Sets: MMLU-Pro questions with their options, dcrouter's mixed-task prompts (code and JSON among
them), Arena-Bench prompts, GSM8K questions (all from /work/shared/data, PII-free by design).

    python bench/pii_labelled_fp.py
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_model
from extproc.classifier import AsyncClassifier, Classifier
from extproc.classifier.pii import STRUCTURED, scan
from extproc.request import Message
from extproc.signals import Signals
from extproc.signals import classifier as signal_module
from extproc.signals.classifier import ClassifierSignal
from extproc.signals.tokens import TokenCounter

DATA = Path("/work/shared/data")


def sets() -> dict[str, list[str]]:
    with gzip.open(DATA / "mmlu_pro.csv.gz", "rt") as f:
        mmlu = [f"{r['question']}\n{r['options']}" for r in csv.DictReader(f)]
    with gzip.open(DATA / "llmrouter_dcrouter/train.json.gz") as f:
        dcrouter = [r["question"] for r in json.loads(f.read())]
    with gzip.open(DATA / "arena_bench_v1/scores.jsonl.gz") as f:
        arena = [json.loads(line)["prompt"] for line in f]
    with gzip.open(DATA / "gsm8k_train.jsonl.gz") as f:
        gsm8k = [json.loads(line)["question"] for line in f]
    return {"MMLU-Pro": mmlu, "dcrouter": dcrouter, "Arena-Bench": arena, "GSM8K": gsm8k}


async def flagged(signal: ClassifierSignal, counter: TokenCounter, text: str) -> bool:
    signals = Signals((Message("user", text),), {}, counter)
    await signal.annotate(signals, pii=True, topic=False, pii_types=STRUCTURED)
    return bool(signals.pii_types(0.5))


async def main() -> None:
    signal = ClassifierSignal(AsyncClassifier(Classifier.load()), None)
    counter = TokenCounter()
    real = signal_module.named_by_key
    print(f"CPU: {cpu_model()}")
    print(f"{'set':<12} {'texts':>6} {'with a shape':>12} {'flagged, without the rule':>26} {'with it':>8}")
    for name, texts in sets().items():
        shaped = [t for t in texts if scan(t, STRUCTURED)[0]]
        counts = []
        for rule in (lambda *a: False, real):
            signal_module.named_by_key = rule
            counts.append(sum([await flagged(signal, counter, t) for t in shaped]))
        signal_module.named_by_key = real
        n = len(texts)
        print(
            f"{name:<12} {n:>6} {len(shaped):>12} {counts[0]:>10} ({counts[0] / n:6.2%}) {counts[1]:>10} ({counts[1] / n:6.2%})"
        )


if __name__ == "__main__":
    asyncio.run(main())
