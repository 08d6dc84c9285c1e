"""Experiment: would a shallower trunk (MiniLM's first 3 or 4 layers instead of 5) keep accuracy,
and what would it save? Nothing here changes the shipped model.

    python bench/shallow_trunk.py --data ../shared/data [--out bench/eval/shallow_trunk.json]

Cost: plain int8 graphs of k = 3, 4, 5, 6 MiniLM layers (the same builder and quantization as the
shipped model), timed interleaved at 64 and 128 tokens, as a share of the 6-layer plain pass. The
shipped graph costs ~5.2 layers (5 shared + the domain branch's pooled sixth); a k-layer trunk
with the same branch would cost ~k + 1/6.

Accuracy, with heads re-trained the same way at every depth so that only the depth differs (the
shipped model's own LoRA-adapted sixth layer is not re-trained here: that needs torch and the
training run, model card "Training run"):

- domain: a multinomial logistic probe on [CLS ; masked mean] of the shipped int8 graph's hidden
  states after base layer k, trained on a sample of MMLU-Pro's train split (question only and with
  options; `--train-questions`), GSM8K train questions as math and chat-style topic prompts
  (train/chat_style.py),
  its L2 picked on MMLU-Pro's val split; scored on MMLU-Pro's test split and the chat-style test
  set (bench/eval/chat_domains.jsonl);
- complexity: `extproc fit`'s head (logistic over the masked mean and the 18 form features, L2 by
  5-fold cross-validation) for one dcrouter pair, fitted on the train split and scored (APGR) on
  the test split, with the layer-k mean in place of the shipped embedding (k = 5 is the shipped
  embedding exactly).

PII is not measured: the tagger is a LoRA-adapted layer over the trunk's states and would have
to be re-trained over a k-layer trunk (torch, ~40 min on two idle cores).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.classifier_latency import base_dir, session
from extproc.classifier.classifier import MODEL_DIR
from extproc.classifier.labels import DOMAINS
from extproc.classifier.text import encode, head_tail, load_tokenizer, with_specials
from extproc.classifier.train.chat_style import CHAT_SETS, topic_prompts
from extproc.classifier.train.data import load_gsm8k, load_mmlu
from extproc.classifier.train.graph import build, quantize_int8
from extproc.evaluation import fitting
from extproc.evaluation.data import load_examples
from extproc.evaluation.fit import L2_GRID, _last_user_text
from extproc.heads import form_features

DEPTHS = (3, 4, 5)
READ_TOKENS = 128  # head + tail, as training read them (train/sentences.py TRAIN_TOKENS)
PAIR = ("gemma-2-9b-it", "llama-3.1-nemotron-51b-instruct")  # bench/eval/run.sh's extproc fit pair


def layer_outputs(model: onnx.ModelProto) -> dict[int, str]:
    """Hidden states after each base layer of the shipped trunk graph (its second LayerNorm)."""
    out = {}
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and node.output[0].startswith("trunk") and "_ln2_" in node.output[0]:
            out[int(node.output[0][5 : node.output[0].index("_")]) + 1] = node.output[0]
    return out


class Features:
    """[CLS ; masked mean] after base layer k, for every k in DEPTHS, from one run of the shipped graph."""

    def __init__(self, threads: int) -> None:
        model = onnx.load(str(MODEL_DIR / "classifier.onnx"))
        self.names = layer_outputs(model)
        for k in DEPTHS:
            model.graph.output.append(onnx.helper.make_tensor_value_info(self.names[k], onnx.TensorProto.FLOAT, None))
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        self.tok = load_tokenizer(MODEL_DIR / "tokenizer.json")

    def __call__(self, texts: list[str]) -> dict[int, np.ndarray]:
        out: dict[int, list[np.ndarray]] = {k: [] for k in DEPTHS}
        for e in encode(self.tok, texts):
            ids = with_specials(head_tail(e.ids, READ_TOKENS))[None, :]
            states = self.session.run(
                [self.names[k] for k in DEPTHS], {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            )
            for k, h in zip(DEPTHS, states, strict=True):
                out[k].append(np.concatenate([h[0, 0], h[0].mean(0)]))
        return {k: np.stack(v) for k, v in out.items()}


def cost(threads: int, runs: int) -> dict:
    sd = load_file(str(base_dir() / "model.safetensors"))
    sessions = {}
    with tempfile.TemporaryDirectory() as work:
        for k in (*DEPTHS, 6):
            p, q = Path(work) / f"plain{k}.onnx", Path(work) / f"plain{k}_int8.onnx"
            onnx.save(build(sd, k, [], extra_outputs=("embedding",)), str(p))
            quantize_int8(str(p), str(q))
            sessions[k] = session(str(q), threads)
    out = {}
    for length in (64, 128):
        ids = np.random.default_rng(length).integers(1000, 29000, (1, length)).astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        times: dict[int, list[float]] = {k: [] for k in sessions}
        for i in range(runs + 5):
            for k, s in sessions.items():  # interleaved, so noise hits all alike
                t = time.perf_counter()
                s.run(None, feed)
                if i >= 5:
                    times[k].append(time.perf_counter() - t)
        plain = float(np.median(times[6]))
        out[str(length)] = {str(k): float(np.median(v)) / plain for k, v in times.items()}
        out[str(length)]["plain_ms"] = plain * 1000
    return out


def domain_sets(data: Path, per_split: int, seed: int) -> dict[str, tuple[list[str], np.ndarray]]:
    questions, _ = load_mmlu(data)
    rng = random.Random(seed)
    train = [q for q in questions if q.split == "train"]
    train = rng.sample(train, min(per_split, len(train)))
    val = rng.sample([q for q in questions if q.split == "val"], 400)
    test = [q for q in questions if q.split == "test"]
    math = DOMAINS.index("math")
    gsm = load_gsm8k(data, per_split // 5, seed)
    dev = [json.loads(line)["prompt"] for line in CHAT_SETS["chat_dev"].read_text().splitlines()]
    chat_train = topic_prompts(max(1, per_split // 30), seed, tuple(dev))
    chat_test = [json.loads(line) for line in CHAT_SETS["chat_test"].read_text().splitlines()]
    train_texts = [q.text for q in train] + [q.with_options() for q in train] + gsm + [t for t, _ in chat_train]
    train_y = [q.domain for q in train] * 2 + [math] * len(gsm) + [d for _, d in chat_train]
    return {
        "train": (train_texts, np.array(train_y)),
        "val": ([q.text for q in val] + [q.with_options() for q in val], np.array([q.domain for q in val] * 2)),
        "mmlu_pro_question": ([q.text for q in test], np.array([q.domain for q in test])),
        "mmlu_pro_with_options": ([q.with_options() for q in test], np.array([q.domain for q in test])),
        "chat_test": ([r["prompt"] for r in chat_test], np.array([DOMAINS.index(r["domain"]) for r in chat_test])),
    }


def domain_probe(feats: dict[str, dict[int, np.ndarray]], labels: dict[str, np.ndarray]) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    out = {}
    for k in DEPTHS:
        scaler = StandardScaler().fit(feats["train"][k])
        x = {name: scaler.transform(f[k]) for name, f in feats.items()}
        best = None
        for c in (0.01, 0.03, 0.1, 0.3, 1.0):
            m = LogisticRegression(C=c, max_iter=500).fit(x["train"], labels["train"])
            acc = float((m.predict(x["val"]) == labels["val"]).mean())
            if best is None or acc > best[0]:
                best = (acc, c, m)
        assert best is not None
        _, c, m = best
        out[k] = {"C": c, **{n: float((m.predict(x[n]) == labels[n]).mean()) for n in x if n != "train"}}
        print(f"  domain probe, {k} layers: {out[k]}", flush=True)
    return out


def complexity(data: Path, extract: Features, limit: int) -> dict:
    weak, strong = PAIR
    out = {}
    splits = {}
    for split in ("train", "test"):
        rows = [e for e in load_examples(data / f"dcrouter_{split}.jsonl") if weak in e.quality and strong in e.quality]
        rows = random.Random(0).sample(rows, min(limit, len(rows)))
        texts = [_last_user_text(e.messages) for e in rows]
        f = extract(texts)
        form = np.stack([form_features(t) for t in texts])
        w = np.array([e.quality[weak] for e in rows])
        s = np.array([e.quality[strong] for e in rows])
        splits[split] = (f, form, w, s)
    for k in DEPTHS:
        (f, form, w, s), (ft, formt, wt, st) = splits["train"], splits["test"]
        x, xt = np.hstack([f[k][:, 384:], form]), np.hstack([ft[k][:, 384:], formt])
        y = np.clip(s - w, 0.0, 1.0)
        best = None
        for l2 in L2_GRID:
            oof = np.zeros(len(y))
            for held in fitting.folds(len(y), 5, 0):
                train = np.setdiff1d(np.arange(len(y)), held)
                oof[held] = fitting.fit_head("cv", x[train], y[train], ("embedding", "form"), l2).score_features(
                    x[held]
                )
            r = fitting.routing(oof, w, s)
            if best is None or r.apgr > best[1]:
                best = (l2, r.apgr)
        assert best is not None
        head = fitting.fit_head("k", x, y, ("embedding", "form"), best[0])
        r = fitting.routing(head.score_features(xt), wt, st)
        out[k] = {"l2": best[0], "cv_apgr": best[1], "test_apgr": r.apgr, "test_saving95": r.saving95}
        print(f"  complexity ({weak} -> {strong}), {k} layers: {out[k]}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument(
        "--eval-data", type=Path, help="folder with dcrouter_{train,test}.jsonl (extproc.evaluation.convert)"
    )
    ap.add_argument("--train-questions", type=int, default=3000, help="MMLU-Pro train questions sampled")
    ap.add_argument("--pair-prompts", type=int, default=2000, help="dcrouter prompts sampled per split")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    print(f"CPU {cpu()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    result: dict = {"cpu": cpu(), "load_before": os.getloadavg()[0]}
    result["cost"] = cost(args.threads, args.runs)
    print(f"  cost as a share of a plain 6-layer pass: {result['cost']}", flush=True)
    extract = Features(args.threads)
    sets = domain_sets(args.data, args.train_questions, 0)
    t = time.time()
    feats = {name: extract(texts) for name, (texts, _) in sets.items()}
    print(f"  features for {sum(len(v[0]) for v in sets.values())} texts in {time.time() - t:.0f}s", flush=True)
    result["domain"] = domain_probe(feats, {name: y for name, (_, y) in sets.items()})
    if args.eval_data:
        result["complexity"] = complexity(args.eval_data, extract, args.pair_prompts)
    result["load_after"] = os.getloadavg()[0]
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


def cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return "unknown CPU"


if __name__ == "__main__":
    raise SystemExit(main())
