"""Does the complexity signal transfer? Leave-pair-out and leave-dataset-out routing tables.

    python bench/transfer.py --data ../shared/data [--out bench/eval/transfer.json] [--litellm PYTHON]

For every held-out (data set, weak, strong) pair the head is fitted again without what it must not
see, then scored on the pair's test prompts:

- **leave-pair-out**: the pair's two models are removed from every data set's item-response fit
  (their labels are never read, in any data set where a model of that name appears); the head trains
  on the train splits of all training data sets and is scored on the data set's test split.
- **leave-dataset-out**: the whole data set is left out of training; scored on its test split.
  alpaca_eval (CC BY-NC) is only ever scored, so every alpaca_eval row is leave-dataset-out.

Beside ours, in the same run: random (APGR 0.5), the prompt's length, and litellm's keyword
`ComplexityRouter` (`--litellm` names a Python that has litellm installed, a scratch environment:
litellm is not a dependency of this project; its scores are computed there, see `litellm_scores`).
Metrics (RouteLLM's, share of strong calls on the x axis): APGR, CPT(50%), CPT(80%), and the share
of strong calls saved at 95% of the strong model's quality.

The trunk embeddings come from the shipped classifier, per prompt as the runtime computes them, and
are cached in ~/.cache/extproc-train.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extproc.classifier.train import difficulty, routing_data
from extproc.evaluation import fitting
from extproc.heads import form_features

INPUTS = ("embedding", "form")
L2 = 0.003
WITHIN_CATEGORY = 1.0
LABEL = "gain"
TRAIN_SETS = ("mmlu_pro", "dcrouter", "arena", "gsm8k")
# The shipped head never reads these models' labels, so the bundled MMLU-Pro pair (and the CI
# gate on it) is a leave-pair-out measurement.
SHIPPED_EXCLUDES = ("Meta-Llama-3_1-8B-Instruct", "Meta-Llama-3_1-70B-Instruct")
# (data set, weak, strong, set): the pairs scored; the first MMLU-Pro pair is the bundled policy's
PAIRS = [
    ("mmlu_pro", "Meta-Llama-3_1-8B-Instruct", "Meta-Llama-3_1-70B-Instruct", "exam"),
    ("mmlu_pro", "Mixtral-8x7B-Instruct-v0.1", "gemini-1.5-pro-002", "exam"),
    ("mmlu_pro", "Mistral-7B-Instruct-v0.2", "Qwen1.5-72B-Chat", "exam"),
    ("mmlu_pro", "Phi-3-mini-4k-instruct", "gemini-1.5-flash-002", "exam"),
    ("dcrouter", "gemma-2-9b-it", "llama-3.1-nemotron-51b-instruct", "exam"),
    ("dcrouter", "mistral-7b-instruct-v0.3", "llama-3.3-nemotron-super-49b-v1", "exam"),
    ("dcrouter", "qwen2.5-7b-instruct", "llama-3.1-nemotron-51b-instruct", "exam"),
    ("arena", "Mixtral-8x7B-Instruct-v0.1", "gpt-4-turbo", "chat+code"),
    ("arena", "Llama-2-70b-chat", "gpt-4-0314", "chat+code"),
    ("arena", "gpt-3.5-turbo-1106", "gpt-4-turbo", "chat+code"),
    # alpaca_eval: open weak models against API models, no "_concise"/"_verbose" variants (outputs of
    # models told how long to answer, not models), gap in mean preference >= 0.09
    ("alpaca", "vicuna-13b-v1.5", "claude-2", "chat+code"),
    ("alpaca", "alpaca-7b", "gpt-3.5-turbo-1106", "chat+code"),
    ("alpaca", "gemma-7b-it", "FuseChat-Gemma-2-9B-Instruct", "chat+code"),
]


def embeddings(items: list[routing_data.Item], cache: Path) -> np.ndarray:
    from extproc.classifier import Classifier
    from extproc.classifier.classifier import MODEL_DIR

    model = hashlib.sha256((MODEL_DIR / "classifier.onnx").read_bytes()).hexdigest()[:16]
    key = hashlib.sha1("\n\x00".join(it.text for it in items).encode()).hexdigest()[:16]
    path = cache / f"routing-embeddings-{model}-{key}.npy"
    if path.exists():
        return np.load(path)
    clf = Classifier.load(threads=2)
    out = np.zeros((len(items), 384), np.float32)
    t0 = time.time()
    for i, it in enumerate(items):
        out[i] = clf.classify([it.text])[0].embedding
        if i % 2000 == 1999:
            print(f"  embeddings {i + 1}/{len(items)} ({time.time() - t0:.0f}s)", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


_LITELLM = """
import json, sys
from litellm.router_strategy.complexity_router.complexity_router import ComplexityRouter
router = ComplexityRouter(model_name="bench", litellm_router_instance=None,
    complexity_router_config={"tiers": {"SIMPLE": "s", "MEDIUM": "m", "COMPLEX": "c", "REASONING": "r"}})
rank = {"SIMPLE": 0, "MEDIUM": 1, "COMPLEX": 2, "REASONING": 3}
for line in sys.stdin:
    tier, score, *_ = router.classify(json.loads(line))
    tier = getattr(tier, "value", tier)
    print(json.dumps([rank.get(str(tier).upper(), 0), float(score)]))
"""


def litellm_scores(python: str, texts: list[str], cache: Path) -> np.ndarray | None:
    """litellm's ComplexityRouter in another interpreter: tier, then its weighted score to order
    within a tier. None if that Python cannot run it."""
    key = hashlib.sha1("\n\x00".join(texts).encode()).hexdigest()[:16]
    path = cache / f"litellm-complexity-{key}.npy"
    if path.exists():
        return np.load(path)
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(_LITELLM)
    try:
        run = subprocess.run(
            [python, f.name],
            input="".join(json.dumps(t) + "\n" for t in texts),
            capture_output=True,
            text=True,
            timeout=1800,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"  litellm baseline unavailable: {exc}", file=sys.stderr)
        return None
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    out = np.array([tier * 10.0 + score for tier, score in rows])
    np.save(path, out)
    return out


def features(items: list[routing_data.Item], emb: np.ndarray) -> np.ndarray:
    return np.hstack([emb, np.stack([form_features(it.text) for it in items])])


def train_head(items, x, exclude_models=(), exclude_sets=(), splits=("train", "val")):
    """A head fitted on every training data set's `splits` except those excluded."""
    idx = [i for i, it in enumerate(items) if it.dataset in TRAIN_SETS and it.dataset not in exclude_sets]
    sub = [items[i] for i in idx]
    y = difficulty.targets(sub, exclude_models, WITHIN_CATEGORY, LABEL)
    keep = np.array([it.split in splits for it in sub]) & ~np.isnan(y)
    rows = np.array(idx)[keep]
    # every data set weighs the same in total, whatever its size
    sets = [items[i].dataset for i in rows]
    counts = {s: sets.count(s) for s in set(sets)}
    weight = np.array([1.0 / counts[s] for s in sets])
    return fitting.fit_head("default", x[rows], y[keep], INPUTS, L2, weight)


def pair_rows(items, dataset, weak, strong, split="test"):
    rows = [
        i
        for i, it in enumerate(items)
        if it.dataset == dataset and (split is None or it.split == split) and weak in it.scores and strong in it.scores
    ]
    w = np.array([items[i].scores[weak] for i in rows])
    s = np.array([items[i].scores[strong] for i in rows])
    return np.array(rows), w, s


def table_row(score, w, s) -> dict:
    return fitting.routing(score, w, s).as_dict()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("bench/eval/transfer.json"))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "extproc-train")
    ap.add_argument("--litellm", default=None, help="a Python with litellm installed (scratch venv)")
    ap.add_argument(
        "--write-head",
        type=Path,
        default=None,
        help="also fit the shipped head (all training data sets, without SHIPPED_EXCLUDES' labels) and write it here",
    )
    ap.add_argument("--within-category", type=float, default=None)
    ap.add_argument("--label", default=None, choices=("gain", "difficulty"))
    ap.add_argument("--l2", type=float, default=None)
    ap.add_argument("--pairs", default=None, help="comma-separated data sets to score (default: all)")
    ap.add_argument("--inputs", default=None, help="embedding,form (default) or form")
    ap.add_argument("--markdown", type=Path, default=None, help="only print the model card's tables from this JSON")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown))
        return 0
    global WITHIN_CATEGORY, LABEL, L2, INPUTS
    WITHIN_CATEGORY = WITHIN_CATEGORY if args.within_category is None else args.within_category
    LABEL = args.label or LABEL
    L2 = L2 if args.l2 is None else args.l2
    items = routing_data.load(args.data, include_alpaca=True)
    x = features(items, embeddings(items, args.cache))
    length = x[:, 384].copy()  # log characters
    if args.inputs:
        INPUTS = tuple(args.inputs.split(","))
        if INPUTS == ("form",):
            x = x[:, 384:]
    lite = litellm_scores(args.litellm, [it.text for it in items], args.cache) if args.litellm else None
    results = []
    for dataset, weak, strong, group in PAIRS:
        if args.pairs and dataset not in args.pairs.split(","):
            continue
        for mode in ("leave-pair-out", "leave-dataset-out"):
            if dataset == "alpaca" and mode == "leave-pair-out":
                continue  # alpaca_eval never trains: its rows are all leave-dataset-out
            t0 = time.time()
            if mode == "leave-pair-out":
                head = train_head(items, x, exclude_models=(weak, strong))
                split = "test"
            else:
                head = train_head(items, x, exclude_sets=(dataset,))
                split = None if dataset in ("arena", "alpaca") else "test"  # never trained on: all of it
            rows, w, s = pair_rows(items, dataset, weak, strong, split)
            kinds = {
                it: [j for j, r in enumerate(rows) if items[r].kind == it] for it in ("exam", "math", "code", "chat")
            }
            entry = {
                "dataset": dataset,
                "weak": weak,
                "strong": strong,
                "set": group,
                "mode": mode,
                "n": len(rows),
                "ours": table_row(head.score_features(x[rows]), w, s),
                "length": table_row(length[rows], w, s),
                "random": {"apgr": 0.5},
            }
            if lite is not None:
                entry["litellm"] = table_row(lite[rows], w, s)
            entry["by_kind"] = {}
            for kind, js in kinds.items():
                if len(js) >= 30 and len(js) < len(rows):
                    js = np.array(js)
                    entry["by_kind"][kind] = {
                        "n": len(js),
                        "ours": fitting.routing(head.score_features(x[rows[js]]), w[js], s[js]).apgr,
                        "length": fitting.routing(length[rows[js]], w[js], s[js]).apgr,
                        **({"litellm": fitting.routing(lite[rows[js]], w[js], s[js]).apgr} if lite is not None else {}),
                    }
            results.append(entry)
            lt = entry.get("litellm", {}).get("apgr", float("nan"))
            o = entry["ours"]
            print(
                f"{mode:18s} {dataset:9s} {weak[:22]:22s} -> {strong[:24]:24s} n={len(rows):5d} "
                f"ours {o['apgr']:.3f} (cpt50 {o['cpt50'] or float('nan'):.2f} cpt80 {o['cpt80'] or float('nan'):.2f} "
                f"save95 {o['saving95'] or 0:.2f}) litellm {lt:.3f} length {entry['length']['apgr']:.3f} "
                f"[{time.time() - t0:.0f}s]",
                flush=True,
            )
    if args.write_head:
        head = train_head(items, x, exclude_models=SHIPPED_EXCLUDES)
        meta = {
            "label": "percentile of item-response difficulty within data set and category (train/difficulty.py)",
            "trained_on": list(TRAIN_SETS),
            "models_left_out": list(SHIPPED_EXCLUDES),
            "l2": L2,
            "within_category": WITHIN_CATEGORY,
            "label_kind": LABEL,
        }
        head = fitting.Head("default", head.inputs, head.mean, head.scale, head.weights, head.bias, meta)
        args.write_head.write_text(json.dumps(head.to_json()) + "\n")
        print(f"wrote {args.write_head}")
    summary = {"inputs": INPUTS, "l2": L2, "within_category": WITHIN_CATEGORY, "label": LABEL, "rows": results}
    args.out.write_text(json.dumps(summary, indent=1))
    return 0


def markdown(path: Path) -> str:
    """The model card's Transfer tables from a transfer.json."""
    rows = json.loads(path.read_text())["rows"]
    out = []
    for mode in ("leave-pair-out", "leave-dataset-out"):
        out += [
            f"**{mode}**",
            "",
            "| data set (set) | weak → strong | n | ours APGR | CPT(50%) | CPT(80%) | saved at 95% | litellm APGR | length APGR | random | target |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["mode"] != mode:
                continue
            o, lt = r["ours"], r.get("litellm", {}).get("apgr")

            def f(x):
                return "—" if x is None else f"{x:.2f}"

            ok = o["apgr"] >= 0.58 and (lt is None or o["apgr"] >= lt + 0.05)
            if r["dataset"] == "mmlu_pro" and mode == "leave-pair-out":
                ok = ok and (o["saving95"] or 0) >= 0.25
            out.append(
                f"| {r['dataset']} ({r['set']}) | {r['weak']} → {r['strong']} | {r['n']} | **{o['apgr']:.3f}** | "
                f"{f(o['cpt50'])} | {f(o['cpt80'])} | {f(o['saving95'])} | {f(lt)} | {r['length']['apgr']:.3f} | 0.500 | "
                f"{'met' if ok else 'missed'} |"
            )
        out.append("")
    kinds = []
    for r in rows:
        for kind, k in r.get("by_kind", {}).items():
            kinds.append(
                f"| {r['mode']} | {r['dataset']} | {r['weak']} → {r['strong']} | {kind} | {k['n']} | {k['ours']:.3f} | "
                f"{k.get('litellm', float('nan')):.3f} | {k['length']:.3f} |"
            )
    if kinds:
        out += [
            "By kind of prompt within a data set (APGR; ≥ 30 prompts):",
            "",
            "| mode | data set | pair | kind | n | ours | litellm | length |",
            "|---|---|---|---|---|---|---|---|",
            *kinds,
            "",
        ]
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
