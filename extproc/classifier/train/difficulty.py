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


def irt(items: Sequence[Item], exclude: Iterable[str] = (), iters: int = 60, prior: float = 2.0) -> np.ndarray:
    """Difficulty per item (1PL, MAP by alternating Newton steps); models in `exclude` (or the same
    model under another name) are left out, as if never measured."""
    excluded = list(exclude)
    models = sorted({m for it in items for m in it.scores if not any(same_model(m, e) for e in excluded)})
    index = {m: j for j, m in enumerate(models)}
    y = np.zeros((len(items), len(models)))
    w = np.zeros_like(y)
    for i, it in enumerate(items):
        for m, s in it.scores.items():
            if m in index:
                y[i, index[m]], w[i, index[m]] = s, 1.0
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
    excluded = list(exclude)
    models = sorted({m for it in items for m in it.scores if not any(same_model(m, e) for e in excluded)})
    y = np.full((len(items), len(models)), np.nan)
    for i, it in enumerate(items):
        for j, m in enumerate(models):
            if m in it.scores:
                y[i, j] = it.scores[m]
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


def percentile(values: np.ndarray) -> np.ndarray:
    """Mid-rank percentile in (0, 1); ties share their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(len(values))
    out = np.empty(len(values))
    for v in np.unique(values):
        sel = values == v
        out[sel] = ranks[sel].mean()
    return (out + 0.5) / len(values)


def targets(
    items: Sequence[Item], exclude: Iterable[str] = (), within_category: float = 1.0, label: str = "gain"
) -> np.ndarray:
    """Label percentile per item (`label`: "gain", `pair_gain`, or "difficulty", `irt`): within
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
            diff = pair_gain(group, excluded) if label == "gain" else irt(group, excluded)
            scored = np.array([sum(not any(same_model(m, e) for e in excluded) for m in it.scores) for it in group])
            diff[scored == 0] = np.nan
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
