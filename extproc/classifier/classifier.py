"""The synchronous classifier: tokenizer + one onnxruntime session + the three heads."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from extproc.classifier.labels import DOMAINS, PII_TAGS
from extproc.classifier.pii import PiiSpan, decode, merge_windows
from extproc.classifier.text import (
    WINDOW,
    encode,
    head_tail,
    load_tokenizer,
    window_starts,
    with_specials,
)

MODEL_DIR = Path(__file__).parent / "model"
# A run pads every sequence to its longest; start a new run rather than pad short ones past this.
_MAX_PAD_RATIO = 1.5
_MAX_RUN_TOKENS = 4096


class ModelError(RuntimeError):
    """The model directory is missing files or does not match this code's label sets."""


@dataclass(frozen=True, slots=True)
class Classification:
    domain: str  # argmax category
    domain_probs: dict[str, float]  # all 14 categories
    complexity: float  # [0, 1]
    pii: tuple[PiiSpan, ...]


@dataclass(slots=True)
class _Seq:
    text: int  # index of the text it came from
    ids: np.ndarray  # with [CLS] and [SEP]
    pooled: bool  # domain/complexity are read from this sequence
    pii_start: int  # token index of its first content token in the text, -1: no PII read


class Classifier:
    """Synchronous and thread-safe: one onnxruntime session shared by all callers."""

    def __init__(self, session: ort.InferenceSession, model_dir: Path) -> None:
        self._session = session
        self._tok = load_tokenizer(model_dir / "tokenizer.json")

    @classmethod
    def load(cls, model_dir: Path | None = None, *, threads: int = 2) -> Classifier:
        """Load the shipped model (or one from `model_dir`); `threads` is onnxruntime's intra-op count."""
        model_dir = Path(model_dir) if model_dir is not None else MODEL_DIR
        try:
            config = json.loads((model_dir / "config.json").read_text())
        except FileNotFoundError as e:
            raise ModelError(f"no config.json in {model_dir}: is the classifier model shipped?") from e
        if tuple(config["domains"]) != DOMAINS or tuple(config["pii_tags"]) != PII_TAGS:
            raise ModelError(f"{model_dir} was trained for other label sets than this code")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The arena keeps the peak of every run (long texts: several 512-token windows) for the life
        # of the process; without it RSS stays near 200 MB instead of 500+.
        so.enable_cpu_mem_arena = False
        # onnxruntime's intra-op threads busy-wait for work by default; beside Envoy on two cores
        # that doubled the sidecar's CPU per classified request (bench/RESULTS.md, table 4), so
        # they sleep instead unless EXTPROC_ORT_SPINNING=1.
        spinning = os.environ.get("EXTPROC_ORT_SPINNING", "0") == "1"
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        session = ort.InferenceSession(str(model_dir / config["onnx"]), so, providers=["CPUExecutionProvider"])
        return cls(session, model_dir)

    def classify(self, texts: Sequence[str]) -> list[Classification]:
        """Classify a batch of texts in as few onnxruntime runs as padding allows."""
        if not texts:
            return []
        encoded = encode(self._tok, list(texts))
        seqs = [s for i, e in enumerate(encoded) for s in _sequences(i, e.ids)]
        domain = np.zeros((len(texts), len(DOMAINS)), np.float32)
        complexity = np.zeros(len(texts), np.float32)
        windows: list[list[tuple[int, np.ndarray]]] = [[] for _ in texts]
        for run in _runs(seqs):
            ids, mask = _pad([s.ids for s in run])
            d, c, p = self._session.run(
                ["domain_probs", "complexity_probs", "pii_probs"],
                {"input_ids": ids, "attention_mask": mask},
            )
            for j, s in enumerate(run):
                if s.pooled:
                    domain[s.text] = d[j]
                    complexity[s.text] = c[j, 0]
                if s.pii_start >= 0:
                    windows[s.text].append((s.pii_start, p[j, 1 : len(s.ids) - 1]))
        out = []
        for i, text in enumerate(texts):
            e = encoded[i]
            probs = merge_windows(len(e.ids), windows[i]) if len(e.ids) else np.zeros((0, len(PII_TAGS)))
            out.append(
                Classification(
                    domain=DOMAINS[int(domain[i].argmax())],
                    domain_probs={name: float(p) for name, p in zip(DOMAINS, domain[i], strict=True)},
                    complexity=float(complexity[i]),
                    pii=decode(text, e.offsets, probs),
                )
            )
        return out


def _sequences(text: int, ids: np.ndarray) -> list[_Seq]:
    """A text that fits one window is one sequence for all heads; a longer one becomes
    overlapping PII windows plus one head+tail sequence for the pooled heads."""
    if len(ids) <= WINDOW:
        return [_Seq(text, with_specials(ids), True, 0)]
    seqs = [_Seq(text, with_specials(ids[a : a + WINDOW]), False, a) for a in window_starts(len(ids))]
    seqs.append(_Seq(text, with_specials(head_tail(ids)), True, -1))
    return seqs


def _runs(seqs: list[_Seq]) -> list[list[_Seq]]:
    """Group a text's sequences (its windows) by similar length so that padding stays small.

    Sequences of different texts never share a run: int8 dynamic quantization takes one scale
    per input tensor, so batch-mates (and their padding) would shift a text's outputs (its
    complexity by 0.013 in one measured case), and a request's route would depend on what else
    was in flight. On this CPU a padded batch of short texts of equal length was at most ~8%
    faster than running them one by one (model card, "Run time"), a price worth a route that
    depends on the request alone.
    """
    runs: list[list[_Seq]] = []
    for s in sorted(seqs, key=lambda s: (s.text, len(s.ids))):
        if runs and runs[-1][0].text == s.text:
            run = runs[-1]
            n = len(s.ids)
            real = sum(len(r.ids) for r in run) + n
            padded = n * (len(run) + 1)
            if padded <= _MAX_PAD_RATIO * real and padded <= _MAX_RUN_TOKENS:
                run.append(s)
                continue
        runs.append([s])
    return runs


def _pad(seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    n = max(len(s) for s in seqs)
    ids = np.zeros((len(seqs), n), np.int64)
    mask = np.zeros((len(seqs), n), np.int64)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask
