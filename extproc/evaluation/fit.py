"""`extproc fit`: a complexity head for your own weak/strong pair, from your own labelled prompts.

    extproc fit --data evals.jsonl --weak small --strong large --name my-pair --out my-pair.json \
        [--target-quality 95%] [--folds 5] [--model-dir DIR]

The data is `extproc eval`'s JSONL (a prompt or messages, and a score per model). Each prompt's
latest user message goes through the shipped encoder once (as routing does), and a logistic head
on its embedding and the prompt's form features learns how much the strong model adds over the weak
one (max(0, strong - weak), so 0/1 scores give P(weak fails and strong succeeds)). The L2 strength
is chosen by k-fold cross-validation; the APGR printed is the cross-validated one, what to expect
on new prompts like these, and the threshold is calibrated on the out-of-fold scores for the
target quality. numpy and onnxruntime only: a few hundred prompts take seconds to a minute.

The head is a small JSON file. Reference it from the policy and use it in a decision:

    heads:
      my-pair: {file: my-pair.json}        # beside the policy (or paste the JSON here)
    decisions:
      - name: hard
        when: {complexity: {head: my-pair, above: 0.42}}
        model: large
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from extproc.evaluation import fitting
from extproc.evaluation.data import DataError, load_examples
from extproc.heads import form_features

L2_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1)  # on the mean loss, standardized features
INPUTS = ("embedding", "form")


def _last_user_text(messages) -> str:
    from extproc.request import Api, parse

    body = json.dumps({"model": "m", "messages": list(messages)}).encode()
    req = parse(Api.CHAT, body)
    users = [m for m in req.messages if m.role == "user"]
    return (users[-1] if users else req.messages[-1]).text if req.messages else ""


def _target(value: str, strong_quality: float) -> float:
    value = value.strip()
    if value.endswith("%"):
        return float(value[:-1]) / 100 * strong_quality
    return float(value)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="extproc fit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", required=True, type=Path, help="labelled prompts (extproc eval's JSONL)")
    ap.add_argument("--weak", required=True, help="the cheaper model's key in `quality`")
    ap.add_argument("--strong", required=True, help="the better model's key in `quality`")
    ap.add_argument("--name", default=None, help="the head's name (default: WEAK-STRONG)")
    ap.add_argument("--out", type=Path, default=None, help="where to write the head (default: NAME.json)")
    ap.add_argument("--target-quality", default="95%", help="'95%%' of the strong model's quality, or absolute")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-dir", type=Path, default=None, help="default: the shipped model")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    name = args.name or f"{args.weak}-{args.strong}"
    out = args.out or Path(f"{name}.json")
    try:
        examples = load_examples(args.data)
    except DataError as exc:
        print(f"extproc fit: {exc}", file=sys.stderr)
        return 2
    rows = [e for e in examples if args.weak in e.quality and args.strong in e.quality]
    if len(rows) < 4 * args.folds:
        print(
            f"extproc fit: {len(rows)} prompts score both {args.weak!r} and {args.strong!r}; "
            f"need at least {4 * args.folds} (100-500 is a good size)",
            file=sys.stderr,
        )
        return 2
    from extproc.classifier import Classifier
    from extproc.classifier.classifier import MODEL_DIR

    t0 = time.time()
    clf = Classifier.load(args.model_dir, threads=args.threads)
    texts = [_last_user_text(e.messages) for e in rows]
    emb = []
    for t in texts:
        [c] = clf.classify([t])
        if c.embedding is None:
            print("extproc fit: this model directory gives no embedding; use the shipped model", file=sys.stderr)
            return 2
        emb.append(c.embedding)
    x = np.hstack([np.stack(emb), np.stack([form_features(t) for t in texts])])
    w = np.array([e.quality[args.weak] for e in rows])
    s = np.array([e.quality[args.strong] for e in rows])
    y = np.clip(s - w, 0.0, 1.0)
    encoded = time.time() - t0

    best = None
    for l2 in L2_GRID:
        oof = np.zeros(len(y))
        for test in fitting.folds(len(y), args.folds, args.seed):
            train = np.setdiff1d(np.arange(len(y)), test)
            oof[test] = fitting.fit_head("cv", x[train], y[train], INPUTS, l2).score_features(x[test])
        r = fitting.routing(oof, w, s)
        if best is None or r.apgr > best[1].apgr:
            best = (l2, r, oof)
    assert best is not None
    l2, cv, oof = best
    target = _target(args.target_quality, float(s.mean()))
    threshold, reached, share = fitting.threshold_for(oof, w, s, target)
    model_dir = args.model_dir or MODEL_DIR
    meta = {
        "weak": args.weak,
        "strong": args.strong,
        "prompts": len(rows),
        "l2": l2,
        "cv": {"folds": args.folds, **{k: v for k, v in cv.as_dict().items()}},
        "threshold": {
            "above": round(threshold, 4),
            "target_quality": target,
            "quality": reached,
            "strong_share": share,
        },
        "classifier_sha256": hashlib.sha256((model_dir / "classifier.onnx").read_bytes()).hexdigest(),
        "data_sha256": hashlib.sha256(args.data.read_bytes()).hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    head = fitting.fit_head(name, x, y, INPUTS, l2, meta=meta)
    out.write_text(json.dumps(head.to_json()) + "\n")
    c = cv
    fitted = time.time() - t0 - encoded
    print(f"fitted head {name!r} on {len(rows)} prompts ({encoded:.1f}s encoding, {fitted:.1f}s fitting)")
    print(f"  weak {args.weak}: quality {c.weak:.3f}   strong {args.strong}: quality {c.strong:.3f}")
    print(
        f"  expected on new prompts ({args.folds}-fold cross-validation): APGR {c.apgr:.3f} (random 0.500), "
        f"CPT(50%) {_pct(c.cpt50)}, CPT(80%) {_pct(c.cpt80)}, strong calls saved at 95% quality {_pct(c.saving95)}"
    )
    print(
        f"  threshold for quality {target:.3f}: above {threshold:.4f} "
        f"(cross-validated: quality {reached:.3f}, {share:.0%} of prompts to {args.strong})"
    )
    print(f"wrote {out} ({out.stat().st_size:,} bytes). In the policy:")
    print(f"  heads:\n    {name}: {{file: {out.name}}}")
    print(f"  ... when: {{complexity: {{head: {name}, above: {round(threshold, 4)}}}}}")
    return 0


def _pct(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.0%}"


if __name__ == "__main__":
    raise SystemExit(main())
