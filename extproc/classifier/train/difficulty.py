"""The complexity head's label: what a router gains by sending a prompt to the stronger model,
averaged over every pair of models that could serve it.

Per data set with per-model scores in [0, 1] (judge grades scaled linearly), `pair_gain` takes every
pair of models whose overall mean scores differ by at least 0.05 and averages, per prompt, the
stronger model's score minus the weaker one's: multi-pair training, so that no single pair's
quirks define "complex". A prompt every model answers, or none does, gains nothing; a pure
difficulty score (`irt`, a 1PL item-response fit, kept for comparison) ranks the second kind first
and routes it to a strong model that fails it too, which measured worse on every held-out data set
but MMLU-Pro (model card, "Transfer").

The gain is turned into a percentile within its data set, and for MMLU-Pro within its subject: the
head must learn what makes a prompt gain from a bigger model beside its neighbours (length, steps
asked for, constraints, code), not which subjects one benchmark's models found hard. A subject prior
learned on MMLU-Pro ranked MMLU's questions below random for another pair (issue 16), while form
transfers. dcrouter's task types and arena's code/chat are forms, not topics, and stay in the label.

GSM8K train carries no model scores; its label is the number of calculation steps in the reference
solution, a model-free difficulty (on grade-school math a strong model rarely fails, so there the
harder prompt is the one that gains), as a percentile within GSM8K.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from extproc.classifier.train.routing_data import Item

# Data sets whose categories are topics (MMLU-Pro's subjects): the label is taken within them. The
# other data sets' categories are forms (dcrouter's task types, arena's code/chat), which transfer.
TOPIC_CATEGORIES = frozenset({"mmlu_pro"})


def same_model(a: str, b: str) -> bool:
    """Model names across data sets ('Meta-Llama-3_1-8B-Instruct', 'llama-3.1-8b-instruct')."""

    def norm(s: str) -> str:
        s = s.lower().replace("meta-", "").replace("_", ".")
        return "".join(c for c in s if c.isalnum() or c == ".").replace(".", "")

    return norm(a) == norm(b)


def kept_models(items: Sequence[Item], exclude: Iterable[str] = ()) -> list[str]:
    """The models scored in `items`, without those in `exclude` (or the same model under another name)."""
    excluded = list(exclude)
    return sorted(m for m in {m for it in items for m in it.scores} if not any(same_model(m, e) for e in excluded))


def score_matrix(items: Sequence[Item], models: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Scores [items, models] and a 0/1 mask of the measured cells."""
    index = {m: j for j, m in enumerate(models)}
    y = np.zeros((len(items), len(models)))
    w = np.zeros_like(y)
    for i, it in enumerate(items):
        for m, s in it.scores.items():
            j = index.get(m)
            if j is not None:
                y[i, j], w[i, j] = s, 1.0
    return y, w


def irt(items: Sequence[Item], exclude: Iterable[str] = (), iters: int = 60, prior: float = 2.0) -> np.ndarray:
    """Difficulty per item (1PL, MAP by alternating Newton steps); models in `exclude` (or the same
    model under another name) are left out, as if never measured."""
    models = kept_models(items, exclude)
    y, w = score_matrix(items, models)
    theta = np.zeros(len(models))
    b = np.zeros(len(items))
    inv = 1.0 / prior**2
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(theta[None, :] - b[:, None])))
        # d/db of the log posterior: sum_m w (p - y) - b/prior^2; curvature sum_m w p (1-p) + 1/prior^2
        b += ((w * (p - y)).sum(1) - b * inv) / ((w * p * (1 - p)).sum(1) + inv)
        p = 1.0 / (1.0 + np.exp(-(theta[None, :] - b[:, None])))
        theta -= ((w * (p - y)).sum(0) + theta * inv) / ((w * p * (1 - p)).sum(0) + inv)
    return b


def pair_gain(items: Sequence[Item], exclude: Iterable[str] = (), min_gap: float = 0.05) -> np.ndarray:
    """Per item, the mean over every pair of models (a weaker, a stronger one by overall mean
    score, at least `min_gap` apart) of how much the stronger one's score beats the weaker one's:
    the gain a router buys by sending this prompt up, averaged over all the pairs it could serve.
    Prompts every model gets right, or every model gets wrong, gain nothing (a difficulty score
    would send the second kind to the strong model first)."""
    models = kept_models(items, exclude)
    y, w = score_matrix(items, models)
    y[w == 0] = np.nan
    ability = np.nanmean(y, axis=0)
    total = np.zeros(len(items))
    count = np.zeros(len(items))
    for a in range(len(models)):
        for b in range(len(models)):
            if ability[b] - ability[a] >= min_gap:
                d = y[:, b] - y[:, a]
                ok = ~np.isnan(d)
                total[ok] += d[ok]
                count[ok] += 1
    out = np.full(len(items), np.nan)
    out[count > 0] = total[count > 0] / count[count > 0]
    return out


def irt2pl(
    y: np.ndarray, w: np.ndarray, iters: int = 80, a_prior: float = 1.0, c_prior: float = 3.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A two-parameter item-response model, P(model m answers item i) = sigmoid(a_i * theta_m - c_i),
    fitted by MAP (alternating Newton steps; priors a ~ N(1, a_prior), c ~ N(0, c_prior),
    theta ~ N(0, 1)) to scores y in [0, 1] (judge grades as soft outcomes) where w = 1.
    Returns (theta, a, c), theta standardised (mean 0, sd 1 over the models)."""
    theta = (y * w).sum(0) / np.maximum(w.sum(0), 1)
    theta = (theta - theta.mean()) / (theta.std() + 1e-9)
    a = np.ones(len(y))
    c = np.zeros(len(y))
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(a[:, None] * theta[None] - c[:, None])))
        r, h = w * (p - y), w * p * (1 - p)
        ga = (r * theta).sum(1) + (a - 1) / a_prior**2
        gc = -r.sum(1) + c / c_prior**2
        haa = (h * theta**2).sum(1) + 1 / a_prior**2
        hcc = h.sum(1) + 1 / c_prior**2
        hac = -(h * theta).sum(1)
        det = haa * hcc - hac**2
        a, c = a - (hcc * ga - hac * gc) / det, c - (haa * gc - hac * ga) / det
        p = 1 / (1 + np.exp(-(a[:, None] * theta[None] - c[:, None])))
        r, h = w * (p - y), w * p * (1 - p)
        theta = theta - ((r * a[:, None]).sum(0) + theta) / ((h * a[:, None] ** 2).sum(0) + 1)
        mu, sd = theta.mean(), theta.std() + 1e-9
        theta, c, a = (theta - mu) / sd, c - a * mu, a * sd
    return theta, a, c


# The "typical" weak/strong pair of `expected_gain`: abilities half a standard deviation below and
# above the middle of the data set's models. Chosen on validation pairs of the oracle comparison in
# bench/transfer.py (the label's own figure, from other models' answers to the prompts themselves):
# 0.635 mean APGR against 0.622 for the raw pair average and 0.631 for all pairs of the 2PL fit.
TYPICAL_GAP = (-0.5, 0.5)


def expected_gain(items: Sequence[Item], exclude: Iterable[str] = ()) -> np.ndarray:
    """Per item, the gain a typical pair of the data set's models would see, from a 2PL fit over
    all its (kept) models: sigmoid(a (theta_s) - c) - sigmoid(a theta_w - c) at TYPICAL_GAP.
    Smoother than `pair_gain` (the fit pools every model's answers through two numbers per item)
    and pair-agnostic."""
    models = kept_models(items, exclude)
    y, w = score_matrix(items, models)
    _, a, c = irt2pl(y, w)
    lo, hi = TYPICAL_GAP
    return 1 / (1 + np.exp(-(a * hi - c))) - 1 / (1 + np.exp(-(a * lo - c)))


def percentile(values: np.ndarray) -> np.ndarray:
    """Mid-rank percentile in (0, 1); ties share their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    _, group = np.unique(values, return_inverse=True)
    mean_rank = np.bincount(group, ranks) / np.bincount(group)
    return (mean_rank[group] + 0.5) / len(values)


def targets(
    items: Sequence[Item], exclude: Iterable[str] = (), within_category: float = 1.0, label: str = "gain"
) -> np.ndarray:
    """Label percentile per item (`label`: "gain", `pair_gain`; "2pl", `expected_gain`; or
    "difficulty", `irt`): within
    its data set and category with weight `within_category`, within its data set with the rest."""
    excluded = list(exclude)
    out = np.full(len(items), np.nan)
    by_dataset: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_dataset[it.dataset].append(i)
    for name, idx in by_dataset.items():
        group = [items[i] for i in idx]
        if name == "gsm8k":
            diff = np.array([it.steps for it in group], float)
        else:
            diff = {"gain": pair_gain, "2pl": expected_gain, "difficulty": irt}[label](group, excluded)
            kept = set(kept_models(group, excluded))
            diff[np.array([not any(m in kept for m in it.scores) for it in group])] = np.nan
        ok = ~np.isnan(diff)
        overall = np.full(len(group), np.nan)
        overall[ok] = percentile(diff[ok])
        within = overall.copy()
        cats: dict[str, list[int]] = defaultdict(list)
        for j, it in enumerate(group):
            if ok[j]:
                cats[it.category].append(j)
        if name in TOPIC_CATEGORIES:
            for js in cats.values():
                within[js] = percentile(diff[js])
        out[idx] = within_category * within + (1 - within_category) * overall
    return out
