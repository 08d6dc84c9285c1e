"""The synchronous classifier: tokenizer + one onnxruntime session + the three heads."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from extproc.classifier.domain_head import DomainHead, DomainHeadError, load_domain_head
from extproc.classifier.labels import DOMAINS, PII_TAGS
from extproc.classifier.normalize import Normalized, normalize
from extproc.classifier.pii import PiiSpan, decode, merge_windows
from extproc.classifier.text import (
    DEFAULT_PII_TOKENS,
    WINDOW,
    Encoded,
    encode,
    head_slice,
    head_tail,
    load_tokenizer,
    tail_slice,
    window_starts,
    with_specials,
)
from extproc.heads import Head, parse_head

MODEL_DIR = Path(__file__).parent / "model"
# A run pads every sequence to its longest; start a new run rather than pad short ones past this.
_MAX_PAD_RATIO = 1.5
# Tokens per onnxruntime run: its activations (attention is [batch, 12, 512, 512] floats per layer)
# are the largest allocation per request; 2048 keeps them near 50 MB.
_MAX_RUN_TOKENS = 2048
_HIDDEN = 384


class ModelError(RuntimeError):
    """The model directory is missing files or does not match this code's label sets."""


@dataclass(frozen=True, slots=True)
class Classification:
    domain: str  # argmax category
    domain_probs: dict[str, float]  # all 14 categories
    complexity: float  # [0, 1]
    pii: tuple[PiiSpan, ...]  # char offsets into the text as given
    pii_chars: int | None = None  # the tagger read text[:pii_chars]; None: all of it
    topic_chars: int | None = None  # characters domain and complexity read (head + tail); None: all
    # [384] float32, mean of the shared trunk's output over the text's pooled sequence: the
    # features fitted complexity heads read (extproc.heads). Free: computed anyway.
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)
    # [384] float32, unit length: all-MiniLM-L6-v2's sentence embedding, only with embed=True
    sentence_embedding: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(slots=True)
class _Seq:
    text: int  # index of the text it came from
    ids: np.ndarray  # with [CLS] and [SEP]
    pooled: bool  # domain/complexity are read from this sequence
    pii_start: int  # token index of its first content token in the text, -1: no PII read


class Classifier:
    """Synchronous and thread-safe: one onnxruntime session shared by all callers."""

    def __init__(
        self,
        session: ort.InferenceSession,
        model_dir: Path,
        sentence: ort.InferenceSession | None = None,
        complexity_head: Head | None = None,
        tagger: ort.InferenceSession | None = None,
        domain_head: DomainHead | None = None,
    ) -> None:
        self._session = session
        self._sentence = sentence
        self._tagger = tagger
        self._tok = load_tokenizer(model_dir / "tokenizer.json")
        # The shipped complexity: a head over the embedding and the prompt's form (model card,
        # "Transfer").
        self._complexity_head = complexity_head
        # The shipped domain: the graph's head ensembled with one over the same embedding
        # (model card, "Domain"); None: the graph's alone.
        self._domain_head = domain_head

    def without_domain_head(self) -> Classifier:
        """The same sessions answering the graph's domain alone (what a domain head is fitted against)."""
        other = copy.copy(self)
        other._domain_head = None
        return other

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
        outputs = {o.name for o in session.get_outputs()}
        if not {"domain_probs", "embedding", "trunk"} <= outputs or not config.get("pii_onnx"):
            raise ModelError(f"{model_dir} holds a model of an older layout (one graph for every head): retrain it")
        graphs = {}
        for key in ("pii_onnx", "sentence_onnx"):
            if config.get(key) and (model_dir / config[key]).exists():
                graphs[key] = ort.InferenceSession(str(model_dir / config[key]), so, providers=["CPUExecutionProvider"])
        if "pii_onnx" not in graphs:
            raise ModelError(f"no {config['pii_onnx']} in {model_dir}: the PII tagger's graph is missing")
        head = None
        if config.get("complexity_head"):
            head = parse_head(json.loads((model_dir / config["complexity_head"]).read_text()), "default")
        domain_head = None
        if config.get("domain_head"):
            try:
                domain_head = load_domain_head(model_dir / config["domain_head"], len(DOMAINS), _HIDDEN)
            except DomainHeadError as e:
                raise ModelError(str(e)) from e
        return cls(session, model_dir, graphs.get("sentence_onnx"), head, graphs["pii_onnx"], domain_head)

    @property
    def embeds(self) -> bool:
        """Whether `classify(..., embed=True)` can add sentence embeddings (the model ships them)."""
        return self._sentence is not None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), 384] float32 unit-length sentence embeddings (all-MiniLM-L6-v2's, int8).

        Costs a classification plus one layer; a caller that also classifies the text should call
        `classify(texts, embed=True)` once instead (AsyncClassifier.embed does, and caches both).
        """
        if not texts:
            return np.zeros((0, _HIDDEN), np.float32)
        return np.stack([c.sentence_embedding for c in self.classify(texts, embed=True)])  # type: ignore[misc]

    def classify(
        self,
        texts: Sequence[str],
        *,
        pii_tokens: int = DEFAULT_PII_TOKENS,
        topic: bool = True,
        embed: bool = False,
        topic_tokens: int = WINDOW,
    ) -> list[Classification]:
        """Classify a batch of texts in as few onnxruntime runs as padding allows.

        Domain and complexity read each text's head and tail (one window); the PII tagger reads
        the first `pii_tokens` tokens of its normalized form (normalize.py). Only bounded slices
        of a text are tokenized, so the cost does not grow with the text's length. The encoder's
        trunk runs once per sequence (one for a text that fits a window, with domain, the embedding
        and complexity); the tagger is a layer of its own over the trunk's states, run only when
        `pii_tokens` > 0, so `pii_tokens=0` costs ~0.86 of a plain MiniLM pass and the tagger ~0.17
        more (model card). A text longer than one window costs a trunk run for its head and tail
        and one per tagger window: `topic=False` or `pii_tokens=0` skips either.

        `topic_tokens` is the budget domain and complexity read (policy: classifier.topic_tokens):
        a text longer than that is read as its first `topic_tokens // 2` and last
        `topic_tokens - topic_tokens // 2` tokens, in a sequence of its own (then the tagger reads
        its own windows). The default, one window, reads every text up to 510 tokens whole.

        With `embed`, each result also carries its `sentence_embedding` (of the sequence domain and
        complexity read): one more encoder layer over the trunk states this run computed anyway
        (~18% of a plain MiniLM pass, model card).
        """
        if not texts:
            return []
        if embed and self._sentence is None:
            raise ModelError("this model directory ships no sentence embedding graph")
        topic = topic or embed
        if topic_tokens < 2:
            raise ValueError("topic_tokens must be at least 2 (one head and one tail token)")
        topic_tokens = min(topic_tokens, WINDOW)
        views = [_views(self._tok, text, pii_tokens, topic, topic_tokens) for text in texts]
        seqs = [s for i, v in enumerate(views) for s in v.sequences(i)]
        domain = np.zeros((len(texts), len(DOMAINS)), np.float32)
        pooled = np.zeros((len(texts), _HIDDEN), np.float32)
        sentence = np.zeros((len(texts), _HIDDEN), np.float32)
        windows: list[list[tuple[int, np.ndarray]]] = [[] for _ in texts]
        for run in _runs(seqs):
            ids, mask = _pad([s.ids for s in run])
            tagged = [j for j, s in enumerate(run) if s.pii_start >= 0]
            pooled_rows = [j for j, s in enumerate(run) if s.pooled]
            # The trunk's states leave the graph only for what reads them: the tagger's graph
            # (only when a policy asks it to read this text) and the sentence layer.
            names = ["domain_probs", "embedding"] + (["trunk"] if tagged or embed else [])
            d, e, *trunk = self._session.run(names, {"input_ids": ids, "attention_mask": mask})
            if tagged:
                (p,) = self._tagger.run(None, {"trunk": trunk[0][tagged], "attention_mask": mask[tagged]})  # type: ignore[union-attr]
                for row, j in zip(p, tagged, strict=True):
                    s = run[j]
                    windows[s.text].append((s.pii_start, row[1 : len(s.ids) - 1]))
            if embed:
                (se,) = self._sentence.run(  # type: ignore[union-attr]
                    None, {"trunk": trunk[0][pooled_rows], "attention_mask": mask[pooled_rows]}
                )
                for j, row in zip(pooled_rows, se, strict=True):
                    sentence[run[j].text] = row
            for j in pooled_rows:
                domain[run[j].text] = d[j]
                pooled[run[j].text] = e[j]
        read = domain.any(-1)  # texts with a pooled sequence (every text unless topic=False)
        if self._domain_head is not None and read.any():
            domain[read] = self._domain_head.combine(domain[read], pooled[read])
        head = self._complexity_head
        complexity = np.zeros(len(texts), np.float32)
        if head is not None and topic:
            complexity = np.array([head.score(pooled[i], t) for i, t in enumerate(texts)], np.float32)
        out = []
        for i, v in enumerate(views):
            e = v.pii
            probs = merge_windows(len(e.ids), windows[i]) if len(e.ids) else np.zeros((0, len(PII_TAGS)))
            spans = decode(v.pii_text, e.offsets, probs)
            out.append(
                Classification(
                    domain=DOMAINS[int(domain[i].argmax())],
                    domain_probs={name: float(p) for name, p in zip(DOMAINS, domain[i], strict=True)},
                    complexity=float(complexity[i]),
                    pii=tuple(_to_source(s, v.norm) for s in spans),
                    pii_chars=v.pii_chars,
                    topic_chars=v.topic_chars,
                    embedding=pooled[i] if topic else None,
                    sentence_embedding=sentence[i] if embed else None,
                )
            )
        return out


@dataclass(slots=True)
class _Views:
    """What one text is read as: the pooled sequence's ids, and the tagger's tokens."""

    topic: np.ndarray  # ids (no specials) for domain and complexity
    topic_chars: int
    pii: Encoded  # tokens of pii_text
    pii_text: str  # the normalized head of the text that the tagger reads
    norm: Normalized  # maps pii_text offsets back to the text
    pii_chars: int
    shared: bool  # one sequence serves the topic and the tagger
    tag: bool = True  # the tagger reads this text (pii_tokens > 0)

    def sequences(self, text: int) -> list[_Seq]:
        if self.shared:
            return _sequences(text, self.pii.ids, self.tag)
        seqs = [_Seq(text, with_specials(self.topic), True, -1)] if len(self.topic) else []
        n = len(self.pii.ids)
        if n:
            seqs += [_Seq(text, with_specials(self.pii.ids[a : a + WINDOW]), False, a) for a in window_starts(n)]
        return seqs


def _views(tok, text: str, pii_tokens: int, topic: bool = True, budget: int = WINDOW) -> _Views:
    if len(text) <= WINDOW * 2:  # surely one window (or near it): read once, for everything asked
        topic = True
        if pii_tokens:
            pii_tokens = max(pii_tokens, WINDOW)
    head = head_slice(text, pii_tokens) if pii_tokens else ""
    norm = normalize(head)
    [pii] = encode(tok, [norm.text])
    pii_text = norm.text
    if len(pii.ids) > pii_tokens:
        cut = int(pii.offsets[pii_tokens - 1, 1])
        pii = Encoded(pii.ids[:pii_tokens], pii.offsets[:pii_tokens])
        pii_text = norm.text[:cut]
    if len(pii_text) == len(norm.text) and len(head) == len(text):
        pii_chars = len(text)
    elif not pii_text:
        pii_chars = 0
    else:
        pii_chars = norm.span(0, len(pii_text))[1]
    whole = pii_chars == len(text) and norm.starts is None
    if whole and len(pii.ids) <= budget:
        return _Views(pii.ids, len(text), pii, pii_text, norm, pii_chars, True, pii_tokens > 0)
    if not topic:
        return _Views(np.zeros(0, np.int64), 0, pii, pii_text, norm, pii_chars, False)
    # Domain and complexity read the text as sent (not normalized): what the heads were trained on.
    half = budget // 2
    if whole:
        topic, topic_chars = head_tail(pii.ids, budget), min(len(text), _topic_chars(pii.offsets, budget))
    elif len(text) <= max(2 * half * 8, 2 * WINDOW):
        [e] = encode(tok, [text])
        topic, topic_chars = head_tail(e.ids, budget), min(len(text), _topic_chars(e.offsets, budget))
    else:
        [h] = encode(tok, [head_slice(text, half)])
        _, tail = tail_slice(text, budget - half)
        [t] = encode(tok, [tail])
        topic = np.concatenate([h.ids[:half], t.ids[max(0, len(t.ids) - (budget - half)) :]])
        head_chars = int(h.offsets[min(half, len(h.ids)) - 1, 1]) if len(h.ids) and half else 0
        first_tail = max(0, len(t.ids) - (budget - half))
        tail_chars = len(tail) - int(t.offsets[first_tail, 0]) if len(t.ids) else 0
        topic_chars = head_chars + tail_chars
    return _Views(topic, topic_chars, pii, pii_text, norm, pii_chars, False)


def _topic_chars(offsets: np.ndarray, budget: int) -> int:
    """Characters that head_tail(ids, budget)'s tokens cover."""
    n = len(offsets)
    if n <= budget:
        return int(offsets[-1, 1]) if n else 0
    half = budget // 2
    tail_from = n - (budget - half)
    head_chars = int(offsets[half - 1, 1]) if half else 0
    return head_chars + int(offsets[-1, 1] - offsets[tail_from, 0])


def _to_source(span: PiiSpan, norm: Normalized) -> PiiSpan:
    if norm.starts is None:
        return span
    start, end = norm.span(span.start, span.end)
    return PiiSpan(span.type, start, end, span.score)


def _sequences(text: int, ids: np.ndarray, tag: bool = True) -> list[_Seq]:
    """A text that fits one window is one sequence for all heads; a longer one becomes
    overlapping PII windows plus one head+tail sequence for the pooled heads."""
    if len(ids) <= WINDOW:
        return [_Seq(text, with_specials(ids), True, 0 if tag else -1)]
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
    depends on the request alone. For the same reason a long text's head+tail sequence (domain,
    complexity) never shares a run with its tagger windows: its outputs do not depend on how much
    the tagger was asked to read.
    """
    runs: list[list[_Seq]] = []
    for s in sorted(seqs, key=lambda s: (s.text, s.pooled and s.pii_start < 0, len(s.ids))):
        if runs and runs[-1][0].text == s.text and (runs[-1][0].pii_start < 0) == (s.pii_start < 0):
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


GRAPH_OUTPUTS = ("domain_probs", "embedding", "pii_probs")


def run_graphs(model_dir: Path, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
    """The raw graph outputs for a padded batch, every sequence through the tagger too: what the
    reference tests compare across CPUs and against the training graph (no tokenizer, no heads)."""
    config = json.loads((model_dir / "config.json").read_text())
    main = ort.InferenceSession(str(model_dir / config["onnx"]), providers=["CPUExecutionProvider"])
    tagger = ort.InferenceSession(str(model_dir / config["pii_onnx"]), providers=["CPUExecutionProvider"])
    domain, embedding, trunk = main.run(
        ["domain_probs", "embedding", "trunk"], {"input_ids": input_ids, "attention_mask": attention_mask}
    )
    (pii,) = tagger.run(None, {"trunk": trunk, "attention_mask": attention_mask})
    return {"domain_probs": domain, "embedding": embedding, "pii_probs": pii}
