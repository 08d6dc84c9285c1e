"""`extproc classify [FILE|-]`: JSONL prompts in, one JSONL classification per prompt out."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from extproc.classifier.classifier import Classification, Classifier


def _prompts(stream: TextIO) -> Iterator[str]:
    for line in stream:
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            yield line  # a plain text line is one prompt
            continue
        if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
            yield obj["prompt"]
        else:
            yield line


def to_json(prompt: str, c: Classification) -> dict:
    return {
        "prompt": prompt,
        "domain": c.domain,
        "domain_probs": {k: round(v, 6) for k, v in c.domain_probs.items()},
        "complexity": round(c.complexity, 6),
        "pii": [{"type": s.type, "start": s.start, "end": s.end, "score": s.score} for s in c.pii],
    }


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["classify"]:  # accept being called with or without the subcommand name
        args = args[1:]
    parser = argparse.ArgumentParser(prog="extproc classify", description=__doc__)
    parser.add_argument("file", nargs="?", default="-", help="JSONL or plain-text prompts; - for stdin")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="prompts per onnxruntime batch")
    ns = parser.parse_args(args)
    clf = Classifier.load(ns.model_dir, threads=ns.threads)
    source = sys.stdin if ns.file == "-" else open(ns.file, encoding="utf-8")  # noqa: SIM115
    try:
        batch: list[str] = []
        for prompt in _prompts(source):
            batch.append(prompt)
            if len(batch) >= ns.batch:
                _emit(clf, batch)
                batch = []
        if batch:
            _emit(clf, batch)
    finally:
        if source is not sys.stdin:
            source.close()
    return 0


def _emit(clf: Classifier, batch: list[str]) -> None:
    for prompt, c in zip(batch, clf.classify(batch), strict=True):
        sys.stdout.write(json.dumps(to_json(prompt, c), ensure_ascii=False) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
