"""Does the complexity signal transfer? Leave-pair-out and leave-dataset-out routing tables, with
every modelling choice made by nested validation.

    python bench/transfer.py --data ../shared/data [--out bench/eval/transfer.json] [--litellm PYTHON]
                             [--write-head extproc/classifier/model/complexity_head.json]

Rows (the pairs of `PAIRS`), each scored on prompts and labels the fit never read:

- **leave-pair-out**: the pair's two models are removed from every data set's labels (in any data
  set where a model of that name appears); training reads the other models' labels on the train
  and val splits of every training set; scored on the data set's test split.
- **leave-dataset-out**: the whole data set is left out of training; scored on its test split
  (arena and alpaca_eval: all of it). alpaca_eval (CC BY-NC) is only ever scored.

**Selection** (which candidate of `CANDIDATES` scores a row) never reads a row's labels. Its figure
is the mean APGR over *validation pairs* (`VAL_PAIRS`: other models of the same data sets, none of
them in a reported pair):

- for leave-pair-out rows: every reported model of the data set *and* the validation pair are left
  out of the labels, the candidate trains on the train splits, and is scored on the validation
  pair over the val split (arena, which has none: over its test half);
- for the leave-dataset-out rows of data set D: inner leave-dataset-out folds over the other scored
  sets D' (train without D and D', score D's validation pairs on D'); for alpaca_eval, over all
  three scored sets.

Candidates: labels (`gain`: the per-prompt mean over model pairs of stronger minus weaker score;
`2pl`: the gain a typical pair sees under a 2PL item-response fit per data set, see
train/difficulty.py; `difficulty`: a 1PL item-response difficulty over all of a data set's models),
learners (the issue-16 logistic head; ridge regression; ridge with fixed effects per data set, i.e.
least squares on within-data-set differences, the pointwise counterpart of a pairwise ranking loss;
`pairwise`, that ranking loss itself: logistic loss on ordered prompt pairs of one data set; k-nearest-neighbour similarity-weighted scoring over labelled
prompts, RouteLLM's SW ranking idea), features (the trunk-mean embedding, all-MiniLM-L6-v2's
sentence embedding, 18 form features, litellm's score), and monotone blends with the prompt's
length. Labels are percentiles within data set (and MMLU-Pro subject), every data set weighs the
same.

Pair-conditioned candidates (`mf`, issue 16's third round): one bilinear head over the prompt's
features and each model's metadata (extproc/evaluation/pairmf.py; metadata a user can state without
labels, written down in extproc/classifier/train/model_metadata.json), so a row's score knows its
weak and strong model without reading their labels; scored as the predicted gain, the logit
difference or the weak model's predicted failure, alone or rank-blended with litellm or length.
`--only` restricts a run to some candidates (0, the shipped recipe, always among them).

Beside ours, in the same run: random (APGR 0.5), the prompt's length, and litellm's keyword
`ComplexityRouter` (`--litellm` names a Python that has litellm installed, a scratch environment:
litellm is not a dependency of this project). Metrics (RouteLLM's, share of strong calls on the x
axis): APGR, CPT(50%), CPT(80%), the share of strong calls saved at 95% of the strong model's
quality. `--oracle` also prints each label's own figure (computed from the other models' answers to
the scored prompts themselves): the ceiling a perfect prompt-only predictor of that label reaches.

Embeddings come from the shipped classifier, per prompt as the runtime computes them, and are
cached in ~/.cache/extproc-train.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extproc.classifier.train import difficulty, routing_data
from extproc.evaluation import fitting, pairmf
from extproc.heads import EMBEDDING_DIM, FORM_FEATURES, Head, form_features

TRAIN_SETS = ("mmlu_pro", "dcrouter", "arena", "gsm8k")
SCORED_SETS = ("mmlu_pro", "dcrouter", "arena")  # with per-model labels: selection folds
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
# Selection only: pairs of models that appear in no reported pair of their data set (a spread of
# gaps and families). Their figures choose the candidate; the reported rows never do.
VAL_PAIRS = {
    "mmlu_pro": [
        ("Mistral-7B-Instruct-v0.1", "DeepSeek-Coder-V2"),
        ("Yi-6b-Chat", "jamba-1.5-large"),
        ("gemma-7b", "Qwen1.5-110B"),
        ("c4ai-command-r-v01", "Meta-Llama-3-70B"),
    ],
    "dcrouter": [("codegemma-7b", "llama-3.1-8b-instruct"), ("llama3-chatqa-1.5-70b", "llama-3.1-8b-instruct")],
    "arena": [
        ("vicuna-33b-v1.3", "claude-2"),
        ("Mistral-7B-Instruct-v0.1", "gpt-3.5-turbo"),
        ("openchat_3.5", "claude-1"),
        ("palm-2-chat-bison-001", "Starling-LM-7B-alpha"),
    ],
}


@dataclass(frozen=True)
class Candidate:
    features: str  # "embedding+form" | "sentence+form" | "form" | "embedding+form+litellm" | "sentence"
    learner: str  # "logistic" | "ridge" | "ranking" | "pairwise" | "knn" | "length" | "litellm"
    label: str = "gain"  # "gain" | "2pl" | "difficulty" (1PL item-response difficulty)
    strength: float = 1.0  # l2 for linear learners, k for knn
    length_blend: float = 0.0  # weight of the prompt's length (percentile) in a monotone blend
    # pair-conditioned ("mf") only: the metadata features of a model (pairmf.META_FEATURES) and the
    # pair's score ("gain": predicted sigmoid(l_s) - sigmoid(l_w); "logit": l_s - l_w; "weak": 1 - sigmoid(l_w))
    meta: str = ""
    pair: str = ""
    litellm_blend: float = 0.0  # weight of litellm's score (percentile) in a monotone blend

    @property
    def shippable(self) -> bool:
        """Runs in the shipped head format (a linear map of embedding and form)."""
        return self.learner in ("logistic", "ridge", "ranking", "pairwise") and self.features in (
            "embedding+form",
            "form",
        )

    def __str__(self) -> str:
        if self.learner == "mf":
            s = f"mf({self.features}; meta {self.meta}; {self.pair}; {self.strength:g})"
        else:
            s = f"{self.learner}({self.features}; {self.label}; {self.strength:g})"
        s += f" + {self.length_blend:g} length" if self.length_blend else ""
        return s + (f" + {self.litellm_blend:g} litellm" if self.litellm_blend else "")


CANDIDATES = [
    Candidate("embedding+form", "logistic", "gain", 0.003),  # issue 16's shipped head
    Candidate("embedding+form", "ridge", "2pl", 1.0),
    Candidate("embedding+form", "ranking", "2pl", 1.0),
    Candidate("embedding+form", "ranking", "2pl", 10.0),
    Candidate("sentence+form", "ranking", "2pl", 1.0),
    Candidate("form", "ranking", "2pl", 1.0),
    Candidate("embedding+form+litellm", "ranking", "2pl", 1.0),
    Candidate("embedding", "knn", "2pl", 50),
    Candidate("sentence", "knn", "2pl", 50),
    Candidate("sentence", "knn", "2pl", 200),
    Candidate("embedding+form", "pairwise", "2pl", 0.01),
    Candidate("embedding+form", "pairwise", "gain", 0.01),
    Candidate("sentence+form", "pairwise", "2pl", 0.01),
    Candidate("embedding+form", "ridge", "difficulty", 1.0),
    Candidate("sentence", "knn", "difficulty", 50),
    Candidate("embedding+form", "ranking", "2pl", 1.0, 0.5),
    Candidate("sentence", "knn", "2pl", 50, 0.5),
    Candidate("-", "length"),
    Candidate("-", "litellm"),
]
# Pair-conditioned (issue 16, third round): one bilinear head over prompt features and the models'
# metadata (extproc/evaluation/pairmf.py; metadata in extproc/classifier/train/model_metadata.json).
MF_CANDIDATES = [
    *(
        Candidate("embedding+form", "mf", strength=l2, meta=meta, pair=pair)
        for meta in ("price", "full")
        for l2 in (0.01, 0.1)
        for pair in ("gain", "logit", "weak")
    ),
    *(Candidate("form", "mf", strength=0.01, meta="full", pair=pair) for pair in ("gain", "logit", "weak")),
    Candidate("embedding+form", "mf", strength=0.1, meta="full", pair="gain", litellm_blend=0.3),
    Candidate("embedding+form", "mf", strength=0.1, meta="full", pair="weak", litellm_blend=0.3),
    Candidate("embedding+form", "mf", strength=0.1, meta="full", pair="gain", length_blend=0.3),
]
CANDIDATES += MF_CANDIDATES
METADATA = Path(__file__).resolve().parents[1] / "extproc" / "classifier" / "train" / "model_metadata.json"


class Data:
    """Items, features and the caches every fit shares."""

    def __init__(self, items: list[routing_data.Item], emb: np.ndarray, sent: np.ndarray, lite: np.ndarray | None):
        self.items = items
        self.ds = np.array([it.dataset for it in items])
        self.split = np.array([it.split for it in items])
        self.form = np.stack([form_features(it.text) for it in items])
        self.length = self.form[:, 0].copy()  # log characters
        self.lite = lite
        self.x = {
            "embedding+form": np.hstack([emb, self.form]),
            "sentence+form": np.hstack([sent, self.form]),
            "form": self.form,
            "embedding": emb,
            "sentence": sent,
        }
        if lite is not None:
            self.x["embedding+form+litellm"] = np.hstack([emb, self.form, lite[:, None]])
        self._labels: dict = {}
        self._ridge: dict = {}
        self._mf: dict = {}
        self.metadata = pairmf.load_metadata(METADATA)

    def rows(self, exclude_sets: tuple[str, ...], splits: tuple[str, ...]) -> np.ndarray:
        sets = [s for s in TRAIN_SETS if s not in exclude_sets]
        return np.nonzero(np.isin(self.ds, sets) & np.isin(self.split, splits))[0]

    def labels(self, rows: np.ndarray, exclude_models: tuple[str, ...], label: str) -> np.ndarray:
        """Label percentiles over `rows` only (computed from those prompts' answers alone)."""
        key = (rows.tobytes(), tuple(sorted(exclude_models)), label)
        if key not in self._labels:
            out = np.full(len(self.items), np.nan)
            out[rows] = difficulty.targets([self.items[i] for i in rows], exclude_models, 1.0, label)
            self._labels[key] = out
        return self._labels[key]


def _balance(ds: np.ndarray) -> np.ndarray:
    """Weights by which every data set weighs the same in total."""
    counts = {s: (ds == s).sum() for s in set(ds)}
    return np.array([1.0 / counts[s] for s in ds])


def _percentile_within(v: np.ndarray, ds: np.ndarray) -> np.ndarray:
    out = np.empty(len(v))
    for s in set(ds):
        sel = ds == s
        out[sel] = difficulty.percentile(v[sel])
    return out


PAIR_MARGIN = 0.25  # label percentiles: pairs closer than this carry little order
PAIRS_PER_SET = 8000


def ranked_pairs(y: np.ndarray, ds: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (a, b) within a data set with |y_a - y_b| > PAIR_MARGIN, in random order."""
    rng = np.random.default_rng(seed)
    out_a, out_b = [], []
    for s in sorted(set(ds)):
        idx = np.nonzero(ds == s)[0]
        i, j = rng.choice(idx, 4 * PAIRS_PER_SET), rng.choice(idx, 4 * PAIRS_PER_SET)
        keep = np.abs(y[i] - y[j]) > PAIR_MARGIN
        out_a.append(i[keep][:PAIRS_PER_SET])
        out_b.append(j[keep][:PAIRS_PER_SET])
    return np.concatenate(out_a), np.concatenate(out_b)


Scorer = Callable[..., np.ndarray]  # (item rows, weak, strong) -> scores; pair-agnostic ones ignore the pair


def mf_fit(d: Data, c: Candidate, exclude_models, exclude_sets, splits) -> pairmf.PairMF:
    """The pair-conditioned model of candidate c's features, metadata and l2 (shared by its score kinds)."""
    key = (c.features, c.meta, c.strength, tuple(sorted(exclude_models)), tuple(sorted(exclude_sets)), splits)
    if key in d._mf:
        return d._mf[key]
    rows = d.rows(exclude_sets, splits)
    blocks = []
    for s in sorted(set(d.ds[rows])):
        idx = rows[d.ds[rows] == s]
        group = [d.items[i] for i in idx]
        models = [m for m in difficulty.kept_models(group, exclude_models) if m in d.metadata]
        if not models:
            continue  # gsm8k: no model scores
        y, w = difficulty.score_matrix(group, models)
        keep = w.sum(1) > 0
        blocks.append(pairmf.Block(idx[keep], tuple(models), y[keep], w[keep]))
    tail = len(FORM_FEATURES) if c.features.endswith("+form") else 0
    d._mf[key] = pairmf.fit(
        d.x[c.features], blocks, d.metadata, pairmf.META_FEATURES[c.meta], l2=c.strength, free_tail=tail
    )
    return d._mf[key]


def fit(
    d: Data, c: Candidate, exclude_models=(), exclude_sets=(), splits=("train", "val")
) -> tuple[Scorer, Head | None]:
    """A scorer for candidate c, trained without what it must not read; and its Head if shippable."""
    if c.learner == "length":
        return (lambda r, *_: d.length[r]), None
    if c.learner == "litellm":
        assert d.lite is not None
        return (lambda r, *_: d.lite[r]), None
    if c.learner == "mf":
        model = mf_fit(d, c, exclude_models, exclude_sets, splits)
        x_mf = d.x[c.features]

        def base(r: np.ndarray, weak: str, strong: str) -> np.ndarray:
            return model.score(x_mf[r], d.metadata[weak], d.metadata[strong], c.pair)

        return _blends(d, c, base), None
    rows = d.rows(exclude_sets, splits)
    y = d.labels(rows, exclude_models, c.label)[rows]
    ok = ~np.isnan(y)
    rows, y = rows[ok], y[ok]
    x = d.x[c.features]
    head = None
    if c.learner == "logistic":
        head = fitting.fit_head("default", x[rows], y, ("embedding", "form"), c.strength, _balance(d.ds[rows]))
        base: Scorer = lambda r, *_: head.score_features(x[r])  # noqa: E731
    elif c.learner in ("ridge", "ranking"):
        mean, scale = fitting.standardize(x[rows])
        z = (x[rows] - mean) / scale
        wts = _balance(d.ds[rows])
        if c.learner == "ranking":  # fixed effects: demeaned within each data set
            for s in set(d.ds[rows]):
                sel = d.ds[rows] == s
                z[sel] -= z[sel].mean(0)
                y = y.copy()
                y[sel] -= y[sel].mean()
        zw = z * wts[:, None]
        w = np.linalg.solve(zw.T @ z / wts.sum() + c.strength * np.eye(z.shape[1]), zw.T @ y / wts.sum())
        bias = 0.0 if c.learner == "ranking" else float(np.average(y - z @ w, weights=wts))
        # a monotone squash into (0, 1) so the score reads like the percentile it was fitted to
        spread = float(np.std(z @ w)) or 1.0
        head = Head("default", ("embedding", "form"), mean, scale, w * 1.7 / spread, bias * 1.7 / spread)
        base = lambda r, *_: head.score_features(x[r])  # noqa: E731
    elif c.learner == "pairwise":
        # a ranking objective: logistic loss on ordered pairs of prompts of the same data set whose
        # labels differ by more than PAIR_MARGIN (RankNet with a linear scorer); every data set
        # gives the same number of pairs
        mean, scale = fitting.standardize(x[rows])
        z = (x[rows] - mean) / scale
        a, b = ranked_pairs(y, d.ds[rows])
        w, _ = fitting.logistic(z[a] - z[b], np.ones(len(a)) * (y[a] > y[b]), c.strength)
        spread = float(np.std(z @ w)) or 1.0
        head = Head("default", ("embedding", "form"), mean, scale, w * 1.7 / spread, 0.0)
        base = lambda r, *_: head.score_features(x[r])  # noqa: E731
    elif c.learner == "knn":
        e = x / np.linalg.norm(x, axis=1, keepdims=True)
        bank, labels, wts = e[rows].astype(np.float32), y, _balance(d.ds[rows])
        k = int(c.strength)

        def base(r: np.ndarray, *_) -> np.ndarray:
            out = np.empty(len(r))
            for i in range(0, len(r), 1024):
                sim = e[r[i : i + 1024]].astype(np.float32) @ bank.T
                top = np.argpartition(-sim, k, axis=1)[:, :k]
                s = np.take_along_axis(sim, top, 1)
                w = np.exp((s - s.max(1, keepdims=True)) / 0.05) * wts[top]
                out[i : i + 1024] = (w * labels[top]).sum(1) / w.sum(1)
            return out
    else:
        raise ValueError(c.learner)
    if not (c.length_blend or c.litellm_blend):
        return base, (head if c.shippable else None)
    return _blends(d, c, base), None


def _blends(d: Data, c: Candidate, base: Scorer) -> Scorer:
    """Rank blends with the prompt's length and litellm's score, within the scored rows' data sets:
    monotone in every part."""
    if not (c.length_blend or c.litellm_blend):
        return base

    def blended(r: np.ndarray, *pair) -> np.ndarray:
        ds = d.ds[r]
        out = (1 - c.length_blend - c.litellm_blend) * _percentile_within(base(r, *pair), ds)
        if c.length_blend:
            out += c.length_blend * _percentile_within(d.length[r], ds)
        if c.litellm_blend:
            assert d.lite is not None
            out += c.litellm_blend * _percentile_within(d.lite[r], ds)
        return out

    return blended


def pair_rows(d: Data, dataset, weak, strong, split):
    rows = np.array(
        [
            i
            for i, it in enumerate(d.items)
            if it.dataset == dataset
            and (split is None or it.split == split)
            and weak in it.scores
            and strong in it.scores
        ]
    )
    w = np.array([d.items[i].scores[weak] for i in rows])
    s = np.array([d.items[i].scores[strong] for i in rows])
    return rows, w, s


def reported_models(dataset: str) -> set[str]:
    return {m for ds, w, s, _ in PAIRS if ds == dataset for m in (w, s)}


def selection(d: Data, c: Candidate) -> dict[str, float]:
    """The candidate's validation figures: 'leave-pair-out', and per outer held-out data set."""
    lpo = []
    for ds, pairs in VAL_PAIRS.items():
        for w, s in pairs:
            # a pair-conditioned fit leaves out every validation model of the data set at once (one fit
            # per data set, not per pair: fewer fits, and it never reads more than the per-pair rule)
            held = {w, s} if c.learner != "mf" else {m for p in pairs for m in p}
            scorer, _ = fit(d, c, tuple(sorted(reported_models(ds) | held)), (), ("train",))
            rows, wq, sq = pair_rows(d, ds, w, s, "test" if ds == "arena" else "val")
            lpo.append(fitting.routing(scorer(rows, w, s), wq, sq).apgr)
    inner: dict[tuple, float] = {}
    folds = [(a, b) for i, a in enumerate(SCORED_SETS) for b in SCORED_SETS[i + 1 :]] + [(a,) for a in SCORED_SETS]
    for held in folds:
        scorer, _ = fit(d, c, (), held)
        for ds in held:
            for w, s in VAL_PAIRS[ds]:
                rows, wq, sq = pair_rows(d, ds, w, s, None if ds == "arena" else "val")
                inner[(held, ds, w, s)] = fitting.routing(scorer(rows, w, s), wq, sq).apgr
    out = {"leave-pair-out": float(np.mean(lpo))}
    for outer in (*SCORED_SETS, "alpaca"):
        if outer == "alpaca":
            vals = [v for (held, _, _, _), v in inner.items() if len(held) == 1]
        else:
            vals = [v for (held, ds, _, _), v in inner.items() if len(held) == 2 and outer in held and ds != outer]
        out[outer] = float(np.mean(vals))
    return out


def oracle(d: Data, label: str, dataset: str, weak: str, strong: str, split) -> float:
    """The label's own APGR for a pair: computed from the other models' answers to the scored prompts."""
    rows, wq, sq = pair_rows(d, dataset, weak, strong, split)
    idx = np.nonzero(d.ds == dataset)[0]
    lab = np.full(len(d.items), np.nan)
    lab[idx] = difficulty.targets([d.items[i] for i in idx], (weak, strong), 1.0, label)
    return fitting.routing(np.nan_to_num(lab[rows], nan=0.5), wq, sq).apgr


def embeddings(items: list[routing_data.Item], cache: Path, kind: str) -> np.ndarray:
    """The shipped classifier's trunk-mean embedding ("embedding") or sentence embedding
    ("sentence") of every prompt, as the runtime computes them (cached by model and prompts)."""
    from extproc.classifier import Classifier
    from extproc.classifier.classifier import MODEL_DIR, run_graphs

    # keyed by what the embedding is (the trunk's output on the tests' reference batch, and the
    # sentence graph), not by the whole graph file, which a retrained domain head changes
    ref = np.load(Path(__file__).resolve().parents[1] / "tests" / "classifier" / "data" / "reference.npz")
    fingerprint = hashlib.sha256(run_graphs(MODEL_DIR, ref["input_ids"], ref["attention_mask"])["embedding"].tobytes())
    if kind == "sentence":
        fingerprint.update((MODEL_DIR / "sentence.onnx").read_bytes())
    model = fingerprint.hexdigest()[:16]
    key = hashlib.sha1("\n\x00".join(it.text for it in items).encode()).hexdigest()[:16]
    path = cache / f"routing-{kind}-{model}-{key}.npy"
    if path.exists():
        return np.load(path)
    clf = Classifier.load(threads=2)
    out = np.zeros((len(items), EMBEDDING_DIM), np.float32)
    t0 = time.time()
    for i, it in enumerate(items):
        [c] = clf.classify([it.text], pii_tokens=0, embed=kind == "sentence")
        out[i] = c.embedding if kind == "embedding" else c.sentence_embedding
        if i % 2000 == 1999:
            print(f"  {kind} {i + 1}/{len(items)} ({time.time() - t0:.0f}s)", flush=True)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, out)
    return out


def limit_mmlu_train(items: list[routing_data.Item], limit: int) -> list[routing_data.Item]:
    """The items with only the first `limit` MMLU-Pro train questions in text-hash order."""
    train = sorted(
        (i for i, it in enumerate(items) if it.dataset == "mmlu_pro" and it.split == "train"),
        key=lambda i: hashlib.sha1(items[i].text.encode()).hexdigest(),
    )
    drop = set(train[limit:])
    return [it for i, it in enumerate(items) if i not in drop]


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
        help="also fit the shipped head (the shippable candidate with the best mean validation figure, on "
        "every training set, without SHIPPED_EXCLUDES' labels) and write it here",
    )
    ap.add_argument("--oracle", action="store_true", help="also each label's ceiling on every row")
    ap.add_argument(
        "--shipped-only",
        action="store_true",
        help="skip selection: score every row with the shipped head's candidate (CANDIDATES[0]), refitted "
        "per row without what the row must not read, beside litellm and length",
    )
    ap.add_argument(
        "--select-only",
        default=None,
        help="comma-separated candidate numbers (0-based, in CANDIDATES): print only their selection figures "
        "(validation pairs; no reported row is scored) and stop",
    )
    ap.add_argument(
        "--only",
        default=None,
        help="comma-separated candidate numbers (0-based, in CANDIDATES; 0 must be among them, the shipped "
        "recipe): select among these alone and score the rows with them",
    )
    ap.add_argument(
        "--mmlu-train-limit",
        type=int,
        default=None,
        help="train on only this many MMLU-Pro train questions (the first in text-hash order; for a quicker "
        "run: every reported row and validation split is kept whole)",
    )
    ap.add_argument(
        "--skip-gsm8k", action="store_true", help="train without GSM8K (the pair-agnostic heads' step-count label)"
    )
    ap.add_argument("--markdown", type=Path, default=None, help="only print the model card's tables from this JSON")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown))
        return 0
    items = routing_data.load(args.data, include_alpaca=True)
    if args.mmlu_train_limit is not None:
        items = limit_mmlu_train(items, args.mmlu_train_limit)
    if args.skip_gsm8k:
        items = [it for it in items if it.dataset != "gsm8k"]
    lite = litellm_scores(args.litellm, [it.text for it in items], args.cache) if args.litellm else None
    d = Data(items, embeddings(items, args.cache, "embedding"), embeddings(items, args.cache, "sentence"), lite)
    candidates = [
        c for c in CANDIDATES if lite is not None or ("litellm" not in (c.features + c.learner) and not c.litellm_blend)
    ]
    if args.select_only:
        candidates = [CANDIDATES[int(i)] for i in args.select_only.split(",")]
    elif args.only:
        candidates = [CANDIDATES[int(i)] for i in args.only.split(",")]
        assert CANDIDATES[0] in candidates, "--only must include candidate 0 (the shipped recipe)"

    print("selection (validation pairs only; mean APGR):", flush=True)
    chosen_by: dict[str, dict] = {}
    if args.shipped_only:  # no selection: the shipped head's candidate scores every row
        candidates = [CANDIDATES[0]]
        chosen_by[str(CANDIDATES[0])] = {k: float("nan") for k in ("leave-pair-out", *SCORED_SETS, "alpaca")}
    for c in candidates if not args.shipped_only else ():
        t0 = time.time()
        chosen_by[str(c)] = selection(d, c)
        figs = "  ".join(f"{k} {v:.3f}" for k, v in chosen_by[str(c)].items())
        print(f"  {c!s:58s} {figs}  [{time.time() - t0:.0f}s]", flush=True)

    if args.select_only:
        return 0
    if args.shipped_only:
        candidates = [CANDIDATES[0]]

    def best(fold: str) -> Candidate:
        return max(candidates, key=lambda c: chosen_by[str(c)][fold])

    # the shipped head: the shippable candidate (a linear head over embedding and form, no per-request
    # cost beyond the trunk) with the best mean validation figure over all folds
    shipped = max((c for c in candidates if c.shippable), key=lambda c: np.mean(list(chosen_by[str(c)].values())))
    print(f"shipped head: {shipped}", flush=True)

    results = []
    fits: dict = {}
    for dataset, weak, strong, group in PAIRS:
        for mode in ("leave-pair-out", "leave-dataset-out"):
            if dataset == "alpaca" and mode == "leave-pair-out":
                continue  # alpaca_eval never trains: its rows are all leave-dataset-out
            fold = "leave-pair-out" if mode == "leave-pair-out" else dataset
            split = "test" if mode == "leave-pair-out" or dataset not in ("arena", "alpaca") else None
            rows, w, s = pair_rows(d, dataset, weak, strong, split)
            entry = {
                "dataset": dataset,
                "weak": weak,
                "strong": strong,
                "set": group,
                "mode": mode,
                "n": len(rows),
                "length": fitting.routing(d.length[rows], w, s).as_dict(),
                "random": {"apgr": 0.5},
            }
            if lite is not None:
                entry["litellm"] = fitting.routing(lite[rows], w, s).as_dict()
            mf = [c for c in candidates if c.learner == "mf"]
            best_mf = max(mf, key=lambda c: chosen_by[str(c)][fold]) if mf else None
            for name, c in (("ours", best(fold)), ("shipped", shipped), ("mf", best_mf)):
                if c is None:
                    continue
                excl = ((weak, strong), ()) if mode == "leave-pair-out" else ((), (dataset,))
                key = (str(c), excl)
                if key not in fits:
                    fits[key] = fit(d, c, *excl)[0]
                entry[name] = fitting.routing(fits[key](rows, weak, strong), w, s).as_dict()
            entry["chosen"] = str(best(fold))
            if best_mf is not None:
                entry["mf_chosen"] = str(best_mf)
            if args.oracle and dataset != "alpaca":
                entry["oracle"] = {lab: oracle(d, lab, dataset, weak, strong, split) for lab in ("gain", "2pl")}
            entry["by_kind"] = {}
            kinds = np.array([d.items[r].kind for r in rows])
            for kind in ("exam", "math", "code", "chat"):
                js = np.nonzero(kinds == kind)[0]
                if 30 <= len(js) < len(rows):
                    entry["by_kind"][kind] = {
                        "n": len(js),
                        "ours": fitting.routing(
                            fits[(str(best(fold)), excl)](rows[js], weak, strong), w[js], s[js]
                        ).apgr,
                        "length": fitting.routing(d.length[rows[js]], w[js], s[js]).apgr,
                        **({"litellm": fitting.routing(lite[rows[js]], w[js], s[js]).apgr} if lite is not None else {}),
                    }
            results.append(entry)
            o, lt = entry["ours"], entry.get("litellm", {}).get("apgr", float("nan"))
            print(
                f"{mode:18s} {dataset:9s} {weak[:22]:22s} -> {strong[:24]:24s} n={len(rows):5d} "
                f"ours {o['apgr']:.3f} (save95 {o['saving95'] or 0:.2f}) shipped {entry['shipped']['apgr']:.3f} "
                f"litellm {lt:.3f} length {entry['length']['apgr']:.3f}  [{entry['chosen']}]",
                flush=True,
            )
    if args.write_head:
        _, head = fit(d, shipped, SHIPPED_EXCLUDES, ())
        assert head is not None
        meta = {
            "label": f"{shipped.label} percentile within data set (and MMLU-Pro subject); bench/transfer.py",
            "candidate": str(shipped),
            "selection": chosen_by[str(shipped)],
            "trained_on": list(TRAIN_SETS),
            "models_left_out": list(SHIPPED_EXCLUDES),
        }
        head = Head("default", head.inputs, head.mean, head.scale, head.weights, head.bias, meta)
        args.write_head.write_text(json.dumps(head.to_json()) + "\n")
        print(f"wrote {args.write_head} ({shipped})")
    summary = {
        "selection": chosen_by,
        "shipped": str(shipped),
        "rows": results,
    }
    args.out.write_text(json.dumps(summary, indent=1))
    return 0


def _met(r: dict, key: str = "ours") -> bool:
    o, lt = r[key], r.get("litellm", {}).get("apgr")
    ok = o["apgr"] >= 0.58 and (lt is None or o["apgr"] >= lt + 0.05)
    if r["dataset"] == "mmlu_pro" and r["mode"] == "leave-pair-out":
        ok = ok and (o["saving95"] or 0) >= 0.25
    return ok


def shipped_cell(r: dict) -> str:
    """The shipped head's APGR (saved at 95%) on a row; '—' in a JSON written before that column."""
    sh = r.get("shipped")
    if sh is None:
        return "—"
    saved = "—" if sh["saving95"] is None else f"{sh['saving95']:.2f}"
    return f"{sh['apgr']:.3f} ({saved})"


def _cell(m: dict | None) -> str:
    """APGR / CPT(50%) / CPT(80%) / saved at 95%."""
    if m is None:
        return "—"

    def f(x):
        return "—" if x is None else f"{x:.2f}"

    return f"{m['apgr']:.3f} / {f(m.get('cpt50'))} / {f(m.get('cpt80'))} / {f(m.get('saving95'))}"


def mf_tables(rows: list[dict]) -> list[str]:
    """The pair-conditioned head's rows beside the shipped recipe, litellm, length and random."""
    if not any("mf" in r for r in rows):
        return []
    out = [
        "Pair-conditioned head (the MF candidate chosen on validation pairs for each fold) beside the "
        "others, each cell APGR / CPT(50%) / CPT(80%) / saved at 95% (random: APGR 0.500):",
        "",
    ]
    for mode in ("leave-pair-out", "leave-dataset-out"):
        out += [
            f"**{mode}, pair-conditioned**",
            "",
            "| data set | weak → strong | n | pair-conditioned | shipped recipe | litellm | length | target |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["mode"] == mode and "mf" in r:
                out.append(
                    f"| {r['dataset']} | {r['weak']} → {r['strong']} | {r['n']} | **{_cell(r['mf'])}** | "
                    f"{_cell(r.get('shipped'))} | {_cell(r.get('litellm'))} | {_cell(r['length'])} | "
                    f"{'met' if _met(r, 'mf') else 'missed'} |"
                )
        out.append("")
    chosen = defaultdict(list)
    for r in rows:
        if "mf_chosen" in r:
            chosen[r["mf_chosen"]].append(f"{r['mode']} {r['dataset']}")
    out += ["Pair-conditioned candidate chosen (validation pairs) per group of rows:", ""]
    out += [f"- {c}: {', '.join(sorted(set(v)))}" for c, v in chosen.items()]
    return [*out, ""]


def markdown(path: Path) -> str:
    """The model card's Transfer tables from a transfer.json."""
    summary = json.loads(path.read_text())
    rows = summary["rows"]

    def f(x):
        return "—" if x is None else f"{x:.2f}"

    out = []
    for mode in ("leave-pair-out", "leave-dataset-out"):
        out += [
            f"**{mode}**",
            "",
            "| data set (set) | weak → strong | n | selected APGR | CPT(50%) | CPT(80%) | saved at 95% | shipped head "
            "APGR (saved at 95%) | litellm APGR | length APGR | label ceiling | target |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["mode"] != mode:
                continue
            o, lt = r["ours"], r.get("litellm", {}).get("apgr")
            ceiling = r.get("oracle", {}).get("2pl")
            out.append(
                f"| {r['dataset']} ({r['set']}) | {r['weak']} → {r['strong']} | {r['n']} | **{o['apgr']:.3f}** | "
                f"{f(o['cpt50'])} | {f(o['cpt80'])} | {f(o['saving95'])} | {shipped_cell(r)} | {f(lt)} | "
                f"{r['length']['apgr']:.3f} | {f(ceiling)} | {'met' if _met(r) else 'missed'} |"
            )
        out.append("")
    out += mf_tables(rows)
    chosen = defaultdict(list)
    for r in rows:
        chosen[r["chosen"]].append(f"{r['mode']} {r['dataset']}")
    out += ["Candidate chosen by selection (validation pairs) for each group of rows:", ""]
    out += [f"- {c}: {', '.join(sorted(set(v)))}" for c, v in chosen.items()]
    out += [
        "",
        "Selection figures (mean APGR on validation pairs; columns: the leave-pair-out protocol, then the "
        "inner leave-dataset-out folds used for each held-out set):",
        "",
        "| candidate | leave-pair-out | mmlu_pro | dcrouter | arena | alpaca |",
        "|---|---|---|---|---|---|",
    ]
    for c, v in summary["selection"].items():
        out.append(
            f"| {c} | {v['leave-pair-out']:.3f} | {v['mmlu_pro']:.3f} | {v['dcrouter']:.3f} | {v['arena']:.3f} | "
            f"{v['alpaca']:.3f} |"
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
