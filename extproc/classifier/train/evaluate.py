"""Evaluation of an exported model directory through the runtime Classifier (windows,
validators and all), plus the reference outputs and held-out slices the tests use."""

from __future__ import annotations

import gzip
import json
import random
import re
import sysconfig
from pathlib import Path

import numpy as np
import torch

from extproc.classifier.classifier import GRAPH_OUTPUTS, Classifier, run_graphs
from extproc.classifier.labels import DOMAINS, PII_TYPES
from extproc.classifier.pii import PiiSpan
from extproc.classifier.text import encode, with_specials
from extproc.classifier.train.chat_prompts import CHAT_PROMPTS
from extproc.classifier.train.chat_style import CHAT_SETS
from extproc.classifier.train.data import STRONG, WEAK, Question
from extproc.classifier.train.encoder import Branch, build_trunk
from extproc.classifier.train.metrics import auc, confusion, match_spans, micro, routing_curve

STRUCTURED = ("EMAIL_ADDRESS", "CREDIT_CARD", "US_SSN", "IP_ADDRESS", "IBAN_CODE", "PHONE_NUMBER")
REFERENCE_TEXTS = [
    "What is the derivative of x^2 sin(x)?",
    "hey, email John Smith at john.smith@example.com or call 415-555-0132 about order 88231",
    "My card 4111 1111 1111 1111 was charged twice; IBAN DE89 3704 0044 0532 0130 00.",
    "Which of the following best describes the role of the Federal Reserve in setting interest rates?",
    "",
    "def f(x):\n    return x * 2  # version 1.2.3, build 4567",
]


def classify_all(clf: Classifier, texts: list[str], batch: int = 32):
    """Domain and complexity (the tagger is not run: PII is scored through the sidecar's path)."""
    out = []
    for i in range(0, len(texts), batch):
        out += clf.classify(texts[i : i + batch], pii_tokens=0)
    return out


def evaluate_all(model_dir: Path, questions: list[Question], data: Path, threads: int) -> dict:
    clf = Classifier.load(model_dir, threads=threads)
    test = [q for q in questions if q.split == "test"]
    res: dict = {"domain": {}, "complexity": {}, "pii": {}}
    y = np.array([q.domain for q in test])
    weak = np.array([q.correct[WEAK] for q in test])
    strong = np.array([q.correct[STRONG] for q in test])
    pair = np.array([q.pair_label for q in test])
    for variant, texts in (("question", [q.text for q in test]), ("with_options", [q.with_options() for q in test])):
        cs = classify_all(clf, texts)
        pred = np.array([DOMAINS.index(c.domain) for c in cs])
        cm = confusion(y, pred, len(DOMAINS))
        res["domain"][variant] = {
            "accuracy": float((pred == y).mean()),
            "per_class": {d: float(cm[i, i] / cm[i].sum()) for i, d in enumerate(DOMAINS)},
            "confusion": cm.tolist(),
            "n": len(test),
        }
        score = np.array([c.complexity for c in cs])
        curve = routing_curve(score, weak, strong)
        prior = _domain_prior(questions, test)
        prior_curve = routing_curve(prior, weak, strong)
        res["complexity"][variant] = {
            "auc": auc(pair, score),
            "apgr": curve.apgr,
            "cpt50": curve.cpt(0.5),
            "cpt80": curve.cpt(0.8),
            "weak_acc": curve.weak_acc,
            "strong_acc": curve.strong_acc,
            "curve": [[float(c), float(p)] for c, p in zip(curve.calls[::10], curve.pgr[::10], strict=True)],
            "domain_prior_apgr": prior_curve.apgr,
            "domain_prior_auc": auc(pair, prior),
            "random_apgr": 0.5,
            "n": len(test),
            "positives": int(pair.sum()),
        }
    res["pii"].update(pii_results(clf, data, questions))
    chat = classify_all(clf, [p for p, _ in CHAT_PROMPTS])
    hits = [c.domain == d for c, (_, d) in zip(chat, CHAT_PROMPTS, strict=True)]
    res["domain"]["chat"] = {
        "accuracy": float(np.mean(hits)),
        "n": len(hits),
        "misses": [[p, d, c.domain] for c, (p, d), h in zip(chat, CHAT_PROMPTS, hits, strict=True) if not h],
    }
    for name, path in CHAT_SETS.items():
        res["domain"][name] = chat_accuracy(clf, path)
    return res


# Chat-style domain sets (bench/eval): the final test, never tuned on, and the dev set that model
# selection reads. How each was made: bench/eval/RESULTS.md, section 5.
def chat_accuracy(clf: Classifier, path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    cs = classify_all(clf, [r["prompt"] for r in rows])
    hits = [c.domain == r["domain"] for c, r in zip(cs, rows, strict=True)]
    per = {d: float(np.mean([h for h, r in zip(hits, rows, strict=True) if r["domain"] == d])) for d in DOMAINS}
    return {"accuracy": float(np.mean(hits)), "n": len(hits), "per_class": per}


def pii_results(clf: Classifier, data: Path, questions: list[Question]) -> dict:
    """PII F1 on presidio_synth_v2 and false-positive rates on PII-free text, each text sent as a
    one-message request through the sidecar's own PII path (signals/classifier.py: normalization,
    RE2 patterns and validators over the whole text, the tagger within `classifier.pii_tokens`),
    hits at the policy's default min_score. Twice: a policy asking for every type (the tagger reads
    every text; the top-level figures), and the bundled policy's structured types (the tagger reads
    only texts holding a validated value; under "structured_policy")."""
    texts = [x["full_text"] for x in load_presidio(data)]
    test = [q.with_options() for q in questions if q.split == "test"]
    code = code_chunks()
    out: dict = {}
    for name, types in (("all_types", None), ("structured_policy", frozenset(STRUCTURED))):
        found = runtime_pii(clf, texts + test + code, types)
        a, b = len(texts), len(texts) + len(test)
        res = _presidio(found[:a], data)
        res["fp_mmlu"] = _fp_rate(found[a:b])
        res["fp_code"] = _fp_rate(found[b:])
        out[name] = res
    return {**out["all_types"], "structured_policy": out["structured_policy"]}


MIN_SCORE = 0.5  # the policy's default `pii.min_score`


def runtime_pii(clf: Classifier, texts: list[str], types: frozenset[str] | None) -> list[list[PiiSpan]]:
    """Each text's PII as the sidecar finds it in a one-message request asking for `types`."""
    import asyncio

    from extproc.classifier.batching import AsyncClassifier
    from extproc.request import Message
    from extproc.signals import Signals
    from extproc.signals.classifier import ClassifierSignal
    from extproc.signals.tokens import TokenCounter

    async def run() -> list[list[PiiSpan]]:
        ac = AsyncClassifier(clf, cache_size=0)
        signal = ClassifierSignal(ac, None)  # type: ignore[arg-type]  # no deadline: offline
        out = []
        try:
            for text in texts:
                signals = Signals((Message("user", text),), {}, TokenCounter())
                await signal.annotate(signals, pii=True, topic=False, pii_types=types)
                out.append(
                    [PiiSpan(h.type, h.start, h.end, h.score) for h in signals.pii or () if h.score >= MIN_SCORE]
                )
        finally:
            signal.close()
            await ac.aclose()
        return out

    return asyncio.run(run())


def _domain_prior(questions: list[Question], test: list[Question]) -> np.ndarray:
    """Baseline router: the training-split pair rate of the question's (true) domain."""
    rate = {}
    for d in range(len(DOMAINS)):
        labels = [q.pair_label for q in questions if q.split == "train" and q.domain == d]
        rate[d] = float(np.mean(labels))
    return np.array([rate[q.domain] for q in test]) + np.random.default_rng(0).uniform(0, 1e-6, len(test))


def _fp_rate(found: list[list[PiiSpan]]) -> dict:
    flagged = [spans for spans in found if spans]
    types: dict[str, int] = {}
    for spans in flagged:
        for t in {s.type for s in spans}:
            types[t] = types.get(t, 0) + 1
    return {"rate": len(flagged) / len(found), "n": len(found), "by_type": types}


def load_presidio(data: Path) -> list[dict]:
    with gzip.open(data / "presidio_synth_v2.json.gz", "rt") as f:
        return json.load(f)


def gold_spans(x: dict) -> list[tuple[int, int, str]]:
    return [
        (s["start_position"], s["end_position"], s["entity_type"]) for s in x["spans"] if s["entity_type"] in PII_TYPES
    ]


def _presidio(found: list[list[PiiSpan]], data: Path) -> dict:
    rows = load_presidio(data)
    out: dict = {}
    for mode in ("overlap", "exact"):
        counts: dict = {}
        for x, spans in zip(rows, found, strict=True):
            pred = [(s.start, s.end, s.type) for s in spans]
            match_spans(gold_spans(x), pred, PII_TYPES, counts, exact=mode == "exact")
        structured, everything = micro(counts, STRUCTURED), micro(counts, PII_TYPES)
        out[mode] = {
            "per_type": {
                t: {"p": c.precision, "r": c.recall, "f1": c.f1, "gold": c.n_gold, "pred": c.n_pred}
                for t, c in counts.items()
            },
            "structured_f1": structured.f1,
            "all_f1": everything.f1,
            "structured_p": structured.precision,
            "structured_r": structured.recall,
            "all_p": everything.precision,
            "all_r": everything.recall,
        }
    out["n_sentences"] = len(rows)
    return out


def code_chunks(n: int = 300, lines: int = 12, seed: int = 0) -> list[str]:
    """PII-free code: fixed chunks of the Python standard library on this machine.

    Chunks with e-mail addresses, author or copyright lines, or URLs are skipped: those name
    real people and are not PII-free.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        src = rng.choice(files).read_text(errors="replace").splitlines()
        if len(src) < lines:
            continue
        a = rng.randrange(0, len(src) - lines)
        chunk = "\n".join(src[a : a + lines])
        if re.search(r"@|author|copyright|https?://|\(c\)", chunk, re.IGNORECASE) or not chunk.strip():
            continue
        out.append(chunk)
    return out


def int8_keeps_accuracy(fp32: dict, int8: dict, tol: float = 0.01) -> bool:
    pairs = [
        (fp32["domain"]["question"]["accuracy"], int8["domain"]["question"]["accuracy"]),
        (fp32["domain"]["with_options"]["accuracy"], int8["domain"]["with_options"]["accuracy"]),
        (fp32["complexity"]["with_options"]["apgr"], int8["complexity"]["with_options"]["apgr"]),
        (fp32["pii"]["overlap"]["all_f1"], int8["pii"]["overlap"]["all_f1"]),
    ]
    return all(b >= a - tol for a, b in pairs)


# ---- reference outputs for the tests -----------------------------------------------------------
def reference_batch(tok) -> tuple[np.ndarray, np.ndarray]:
    """The fixed texts, padded into one batch."""
    seqs = [with_specials(e.ids) for e in encode(tok, REFERENCE_TEXTS)]
    n = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), n), np.int64)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def reference_outputs(sd_t, trunk_layers: int, branches: dict[str, Branch], ids, mask) -> dict:
    """Outputs of the torch training graph on the reference batch: each given branch's
    probabilities and the trunk's masked mean (`embedding`)."""
    trunk = build_trunk(sd_t, trunk_layers)
    out = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        x = trunk(torch.from_numpy(ids), torch.from_numpy(mask))
        m = torch.from_numpy(mask).float()
        out["embedding"] = ((x * m[..., None]).sum(1) / m.sum(1, keepdim=True)).numpy()
        for name, branch in branches.items():
            branch.eval()
            logits = branch(x, m)[0]
            out[f"{name}_probs"] = (logits.softmax(-1) if logits.shape[-1] > 1 else logits.sigmoid()).numpy()
    return out


def compare_reference(model_dir: Path, ref: dict, names: tuple[str, ...] = ("domain_probs", "pii_probs")) -> float:
    """Largest difference between the exported graphs and the torch reference (PII: real tokens)."""
    outs = run_graphs(model_dir, ref["input_ids"], ref["attention_mask"])
    mask = ref["attention_mask"].astype(bool)
    diffs = [
        np.abs(outs[n] - ref[n])[mask].max() if n == "pii_probs" else np.abs(outs[n] - ref[n]).max() for n in names
    ]
    return float(max(diffs))


def graph_outputs(model_dir: Path, ref: dict) -> dict:
    """The exported graphs' own outputs on the reference batch, as `graph_<name>`.

    Computed on the training machine and stored beside the torch outputs: a test compares the
    graphs on whatever CPU runs it with these, so an output that moves with the instruction set
    fails there (the torch comparison only bounds the quantization error).
    """
    outs = run_graphs(model_dir, ref["input_ids"], ref["attention_mask"])
    return {f"graph_{n}": outs[n] for n in GRAPH_OUTPUTS}


def write_reference(path: Path, ref: dict) -> None:
    np.savez_compressed(path, **ref)


def write_heldout(d: Path, questions: list[Question], data: Path, seed: int) -> None:
    """Small fixed slices of held-out data for the tests (provenance in the README beside them)."""
    rng = random.Random(seed)
    with (d / "heldout_domain.jsonl").open("w") as f:
        for di, name in enumerate(DOMAINS):
            pool = [q for q in questions if q.split == "test" and q.domain == di]
            for q in rng.sample(pool, 8):
                f.write(json.dumps({"question_id": q.qid, "prompt": q.text, "domain": name}) + "\n")
    rows = load_presidio(data)
    picked = [x for x in rows if gold_spans(x)]
    with (d / "heldout_pii.jsonl").open("w") as f:
        for x in rng.sample(picked, 60):
            spans = [{"type": t, "start": a, "end": b} for a, b, t in gold_spans(x)]
            f.write(json.dumps({"text": x["full_text"], "spans": spans}, ensure_ascii=False) + "\n")


def split_sizes(questions: list[Question], pooled) -> dict:
    sizes = {s: sum(q.split == s for q in questions) for s in ("train", "val", "test")}
    sizes["pooled_sequences"] = {s: int((pooled.split == s).sum()) for s in ("train", "val", "test")}
    return sizes
