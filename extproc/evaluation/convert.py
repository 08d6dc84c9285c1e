"""Eval JSONL derived from the public data sets in ``../shared/data`` (never copied into the repo).

    python -m extproc.evaluation.convert mmlu-pro --data-dir ../shared/data --out mmlu_test.jsonl
    python -m extproc.evaluation.convert dcrouter --data-dir ../shared/data --out dcrouter_test.jsonl

**mmlu-pro**: the questions of the classifier's held-out split (``split_of(question) ==
"test"``, the split its training never saw), as question plus lettered options (the form
the models answered), scored 0/1 for Llama-3.1-8B-Instruct and Llama-3.1-70B-Instruct. A row
with either cell empty has no label and is dropped. Keys are the models' names as the bundled
policy's ``upstream_model`` spells them.

**dcrouter**: LLMRouter's dcrouter split, the question as the prompt and its nine models'
``scores`` as quality.

``--limit N --seed S`` keeps a fixed random sample of N lines (the CI gate's small set).
"""

from __future__ import annotations

import argparse
import ast
import csv
import gzip
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from extproc.classifier.train.data import split_of

MMLU_MODELS = {  # data column -> quality key
    "Meta-Llama-3_1-8B-Instruct": "llama-3.1-8b-instruct",
    "Meta-Llama-3_1-70B-Instruct": "llama-3.1-70b-instruct",
}


def mmlu_pro(data_dir: Path, split: str = "test") -> Iterator[dict[str, Any]]:
    with gzip.open(data_dir / "mmlu_pro.csv.gz", "rt", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if split_of(row["question"]) != split:
                continue
            cells = {key: row[column] for column, key in MMLU_MODELS.items()}
            if any(v not in ("True", "False") for v in cells.values()):
                continue  # no label
            options = ast.literal_eval(row["options"])
            prompt = row["question"].strip() + "\n" + "\n".join(f"{chr(65 + i)}) {o}" for i, o in enumerate(options))
            yield {
                "id": f"mmlu-pro-{row['question_id']}",
                "prompt": prompt,
                "quality": {key: int(v == "True") for key, v in cells.items()},
            }


def dcrouter(data_dir: Path, split: str = "test") -> Iterator[dict[str, Any]]:
    with gzip.open(data_dir / "llmrouter_dcrouter" / f"{split}.json.gz", "rt", encoding="utf-8") as f:
        rows = json.load(f)
    for i, row in enumerate(rows):
        yield {"id": f"dcrouter-{split}-{i}", "prompt": row["question"], "quality": row["scores"]}


SOURCES = {"mmlu-pro": mmlu_pro, "dcrouter": dcrouter}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m extproc.evaluation.convert", description=__doc__.split("\n\n")[0])
    p.add_argument("source", choices=sorted(SOURCES))
    p.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    p.add_argument("--split", default="test")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit", type=int, help="keep a random sample of this many lines")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = list(SOURCES[args.source](args.data_dir, args.split))
    if args.limit is not None and args.limit < len(rows):
        rows = sorted(random.Random(args.seed).sample(rows, args.limit), key=lambda r: r["id"])
    with open(args.out, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{args.out}: {len(rows)} prompts from {args.source} ({args.split})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
