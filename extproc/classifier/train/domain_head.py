"""Fit the domain head over the trunk's `embedding` output and its ensemble weight with the graph.

    python -m extproc.classifier.train.domain_head --data ../shared/data --out extproc/classifier/model

The graph is not touched: every text is run through the shipped `Classifier` (the runtime's own
windows, int8 graph and all), its `embedding` [384] and the graph's `domain_probs` are kept, and a
one-hidden-layer MLP (torch, training only) learns the 14 domains from the embedding over the same
text the domain branch was trained on: MMLU-Pro's train split (question only and with options),
GSM8K as math, and the chat-style rephrasings and topic requests of `chat_style.py` (`--short-asks`
adds its very short asks, `--balance` weights the loss by inverse class frequency: both measured,
not shipped: model card, "A second domain opinion from the free embedding"). The mixing
weight of the head against the graph is chosen on MMLU-Pro's validation split (question only and
with options) and the chat-style dev set; the test split and the chat-style test set are scored
once, after, through the runtime with the head installed. The head is written as
`domain_head.npz` (float32) and named in `config.json`; `extproc/classifier/domain_head.py` runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import time
from pathlib import Path

import numpy as np

from extproc.classifier.classifier import MODEL_DIR, Classifier
from extproc.classifier.labels import DOMAINS
from extproc.classifier.train import chat_style
from extproc.classifier.train.cache import keyed_path
from extproc.classifier.train.chat_style import CHAT_SETS
from extproc.classifier.train.data import load_gsm8k, load_mmlu

HIDDEN = 512
EPOCHS = 20
DROPOUT_IN, DROPOUT = 0.1, 0.3
LR, WEIGHT_DECAY, SMOOTHING, BATCH = 2e-3, 1e-2, 0.05, 128
WEIGHTS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # head weight against the graph's 1.0
TRAIN_SETS = ("mmlu_train_q", "mmlu_train_opt", "chat_rephrase", "gsm_plain", "gsm_chat", "topics")
SHORT_ASKS = "short_asks"  # measured, not in the shipped recipe (`--short-asks`; model card)
SELECT_SETS = ("mmlu_val_q", "mmlu_val_opt", "chat_dev")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def text_sets(data: Path, seed: int = 0) -> dict[str, tuple[list[str], list[int]]]:
    """The named text sets (texts, domain indices): the domain branch's training text
    (`__main__.DomainData`, same generators and seeds), the selection sets and the test sets."""
    questions, _ = load_mmlu(data)
    gsm = load_gsm8k(data, 4000, seed)
    dev = _rows(CHAT_SETS["chat_dev"])
    sets: dict[str, tuple[list[str], list[int]]] = {}
    for split in ("train", "val", "test"):
        qs = [q for q in questions if q.split == split]
        sets[f"mmlu_{split}_q"] = ([q.text for q in qs], [q.domain for q in qs])
        sets[f"mmlu_{split}_opt"] = ([q.with_options() for q in qs], [q.domain for q in qs])
    rng = random.Random(seed)
    train = [q for q in questions if q.split == "train"]
    sets["chat_rephrase"] = ([chat_style.rephrase(q.text, rng) for q in train], [q.domain for q in train])
    short_rng = random.Random(seed + 2)
    sets["short_asks"] = ([chat_style.short_ask(q.text, short_rng) for q in train], [q.domain for q in train])
    math = DOMAINS.index("math")
    sets["gsm_plain"] = (gsm[:2000], [math] * 2000)
    sets["gsm_chat"] = ([chat_style.rephrase(t, rng) for t in gsm[2000:]], [math] * 2000)
    topics = chat_style.topic_prompts(600, seed + 1, tuple(r["prompt"] for r in dev))
    sets["topics"] = ([t for t, _ in topics], [d for _, d in topics])
    sets["chat_dev"] = ([r["prompt"] for r in dev], [DOMAINS.index(r["domain"]) for r in dev])
    return sets


def features(clf: Classifier, texts: list[str], cache: Path | None, graph_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(embedding [n, 384], graph domain_probs [n, 14]) through the runtime, cached on disk. The
    graph's domain alone, even when `clf` has a domain head installed (the cache key names the
    graph only, and the head is fitted and weighed against the graph)."""
    clf = clf.without_domain_head()
    path = keyed_path(cache, "domain-features", graph_key.encode(), (t.encode() for t in texts), b"\0")
    if path and path.exists():
        z = np.load(path)
        return z["emb"], z["dp"]
    emb = np.zeros((len(texts), 384), np.float32)
    dp = np.zeros((len(texts), len(DOMAINS)), np.float32)
    order = np.argsort([len(t) for t in texts], kind="stable")
    for i in range(0, len(order), 32):
        sel = order[i : i + 32]
        for j, c in zip(sel, clf.classify([texts[j] for j in sel], pii_tokens=0), strict=True):
            emb[j] = c.embedding
            dp[j] = [c.domain_probs[d] for d in DOMAINS]
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, emb=emb, dp=dp)
    return emb, dp


def graph_key(model_dir: Path) -> str:
    """The graph's identity (features depend on classifier.onnx only, not on any head)."""
    return hashlib.sha1((model_dir / "classifier.onnx").read_bytes()).hexdigest()


def fit_mlp(x: np.ndarray, y: np.ndarray, seed: int, balance: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """One hidden layer (ReLU), AdamW with a one-cycle schedule, label smoothing; weights [in, out].
    `balance` weights the loss by inverse class frequency (every domain counts the same)."""
    import torch

    torch.manual_seed(seed)
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    counts = np.bincount(y, minlength=len(DOMAINS)).astype(np.float64)
    cw = torch.tensor(len(y) / (len(DOMAINS) * np.maximum(counts, 1)), dtype=torch.float32) if balance else None
    net = torch.nn.Sequential(
        torch.nn.Dropout(DROPOUT_IN),
        torch.nn.Linear(x.shape[1], HIDDEN),
        torch.nn.ReLU(),
        torch.nn.Dropout(DROPOUT),
        torch.nn.Linear(HIDDEN, len(DOMAINS)),
    )
    opt = torch.optim.AdamW(net.parameters(), lr=LR / 2, weight_decay=WEIGHT_DECAY)
    steps = EPOCHS * ((len(y) + BATCH - 1) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, LR, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(EPOCHS):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), BATCH):
            s = perm[i : i + BATCH]
            loss = torch.nn.functional.cross_entropy(net(xt[s]), yt[s], weight=cw, label_smoothing=SMOOTHING)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    lin = [m for m in net if isinstance(m, torch.nn.Linear)]
    return [(m.weight.detach().numpy().T.astype(np.float32), m.bias.detach().numpy().astype(np.float32)) for m in lin]


def write_head(path: Path, mean, scale, layers, head_weight: float, meta: dict) -> None:
    arrays = {"mean": np.asarray(mean, np.float32), "scale": np.asarray(scale, np.float32)}
    for i, (w, b) in enumerate(layers):
        arrays[f"w{i}"], arrays[f"b{i}"] = w, b
    arrays["weights"] = np.array([1.0, head_weight], np.float32)  # graph, head
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    with path.open("wb") as f:
        np.savez(f, **arrays)


def write_reference(model_dir: Path, path: Path) -> None:
    """Store the installed head's ensemble on the reference batch beside the graphs' own outputs
    (`graph_domain_ensemble`), as the branch exports do for theirs: the tests compare it on every CPU."""
    from extproc.classifier.classifier import run_graphs
    from extproc.classifier.domain_head import model_domain_head

    ref = dict(np.load(path))
    out = run_graphs(model_dir, ref["input_ids"], ref["attention_mask"])
    head = model_domain_head(model_dir)
    assert head is not None
    ref["graph_domain_ensemble"] = head.combine(out["domain_probs"], out["embedding"])
    np.savez_compressed(path, **ref)


def main(argv: list[str] | None = None) -> int:
    from extproc.classifier.domain_head import load_domain_head

    ap = argparse.ArgumentParser(prog="python -m extproc.classifier.train.domain_head")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=MODEL_DIR)
    ap.add_argument("--tests-data", type=Path, default=Path("tests/classifier/data"))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "extproc-train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--balance", action="store_true", help="weight the loss by inverse class frequency (measured, not shipped)"
    )
    ap.add_argument(
        "--short-asks", action="store_true", help="add the very short asks to the training text (measured, not shipped)"
    )
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    started = time.time()
    sets = text_sets(args.data, args.seed)
    clf = Classifier.load(args.out, threads=args.threads)
    gk = graph_key(args.out)
    feats = {}
    train_sets = TRAIN_SETS + ((SHORT_ASKS,) if args.short_asks else ())
    for name in train_sets + SELECT_SETS:
        t0 = time.time()
        feats[name] = (*features(clf, sets[name][0], args.cache, gk), np.array(sets[name][1]))
        print(f"  features {name}: {len(sets[name][0])} texts, {time.time() - t0:.0f}s", flush=True)
    x = np.concatenate([feats[n][0] for n in train_sets]).astype(np.float64)
    y = np.concatenate([feats[n][2] for n in train_sets])
    mean, scale = x.mean(0), np.where(x.std(0) < 1e-6, 1.0, x.std(0))
    t0 = time.time()
    layers = fit_mlp((x - mean) / scale, y, args.seed, balance=args.balance)
    fit_seconds = time.time() - t0
    print(f"  head fitted on {len(y)} texts in {fit_seconds:.0f}s", flush=True)
    tmp = args.cache / "domain_head.candidate.npz"
    args.cache.mkdir(parents=True, exist_ok=True)
    selection = {}
    for hw in (0.0, *WEIGHTS):
        write_head(tmp, mean, scale, layers, hw, {})
        head = load_domain_head(tmp)
        acc = {}
        for n in SELECT_SETS:
            emb, dp, yy = feats[n]
            acc[n] = float((head.combine(dp, emb).argmax(1) == yy).mean())
        acc["mean"] = float(np.mean([acc[n] for n in SELECT_SETS]))
        selection[str(hw)] = acc
        print(f"  head weight {hw}: {acc}", flush=True)
    head_only = {}
    write_head(tmp, mean, scale, layers, 1.0, {})
    head = load_domain_head(tmp)
    for n in SELECT_SETS:
        emb, _, yy = feats[n]
        head_only[n] = float((head.logits(emb).argmax(1) == yy).mean())
    best = max(WEIGHTS, key=lambda w: (selection[str(w)]["mean"], -abs(w - 1.0)))
    meta = {
        "what": "MLP over the trunk's embedding, ensembled with the graph's domain_probs (log-linear)",
        "hidden": HIDDEN,
        "epochs": EPOCHS,
        "dropout": [DROPOUT_IN, DROPOUT],
        "lr": LR,
        "weight_decay": WEIGHT_DECAY,
        "label_smoothing": SMOOTHING,
        "class_balanced": args.balance,
        "seed": args.seed,
        "train_sets": {n: len(feats[n][2]) for n in train_sets},
        "selection_sets": {n: len(feats[n][2]) for n in SELECT_SETS},
        "selection": selection,
        "head_alone": head_only,
        "head_weight": best,
        "graph_sha1": gk,
        "fit_seconds": fit_seconds,
        "total_seconds": time.time() - started,
    }
    write_head(args.out / "domain_head.npz", mean, scale, layers, best, meta)
    config = json.loads((args.out / "config.json").read_text())
    config["domain_head"] = "domain_head.npz"
    (args.out / "config.json").write_text(json.dumps(config, indent=1))
    tmp.unlink(missing_ok=True)
    write_reference(args.out, args.tests_data / "reference.npz")
    print(f"wrote {args.out / 'domain_head.npz'} (head weight {best}) in {time.time() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
