"""A pair-conditioned complexity score: one bilinear model of "does model m answer prompt x", where a
model is known only by metadata a user can state without labels (size, price, release date, hosted
or open, instruction-tuned, specialist), so the same head serves any weak/strong pair, also of
models it never saw.

    logit P(m answers x) = z(x)^T M phi(m) + alpha_m

z(x): the prompt's standardized features (embedding and form) and a constant; phi(m): the model's
standardized metadata and a constant; M: one prompt scorer per metadata feature (the constant row of
z gives an ability per metadata feature, the constant column of phi a prompt easiness); alpha_m: a residual
ability per training model (regularized; 0 for a model not in training). It is RouteLLM's matrix
factorisation with the model embedding a linear function of metadata, and full rank (F metadata
features are few), so the fit is a convex logistic regression on the outer product z x phi, solved by
L-BFGS on the masked score matrices without materializing that product.

For a weak/strong pair the score is the predicted gain sigmoid(l_s) - sigmoid(l_w) ("gain"), or the logit
difference l_s - l_w = z ^T M (phi_s - phi_w) ("logit": linear in z, so for a fixed pair an ordinary
linear head), or the weak model's predicted failure 1 - sigmoid(l_w) ("weak").
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# metadata feature sets: which phi columns a head reads (before the constant)
META_FEATURES: dict[str, tuple[str, ...]] = {
    "price": ("log_price", "released", "hosted", "instruct"),
    "size": ("log_active", "log_params", "log_price", "released", "hosted", "instruct"),
    "full": ("log_active", "log_params", "log_price", "released", "hosted", "instruct", "code", "math"),
}


def load_metadata(path: Path) -> dict[str, dict[str, Any]]:
    return dict(json.loads(path.read_text())["models"])


def _months(released: str) -> float:
    y, m = released.split("-")
    return (int(y) - 2023) + (int(m) - 1) / 12.0


def raw_meta(fields: Mapping[str, Any]) -> dict[str, float]:
    """Every metadata feature of one model, unstandardized. A hosted model's unpublished size is
    imputed from its price (the open models' log size ~ log price line is not known here, so the
    feature is set to NaN and `MetaScaler` fills the training mean; `hosted` tells the rest)."""
    price = 0.5 * (float(fields["price_in"]) + float(fields["price_out"]))
    params = fields.get("params_b")
    active = fields.get("active_b") or params
    return {
        "log_price": math.log10(price),
        "log_params": math.log10(params) if params else float("nan"),
        "log_active": math.log10(active) if active else float("nan"),
        "released": _months(str(fields["released"])),
        "hosted": 1.0 if fields.get("hosted") else 0.0,
        "instruct": 1.0 if fields.get("instruct", True) else 0.0,
        "code": 1.0 if fields.get("specialist") == "code" else 0.0,
        "math": 1.0 if fields.get("specialist") == "math" else 0.0,
    }


@dataclass(frozen=True)
class MetaScaler:
    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, features: tuple[str, ...], metas: Sequence[Mapping[str, Any]]) -> MetaScaler:
        raw = np.array([[raw_meta(m)[f] for f in features] for m in metas])
        mean = np.nanmean(raw, 0)
        scale = np.nanstd(raw, 0)
        return cls(features, mean, np.where(scale < 1e-6, 1.0, scale))

    def __call__(self, fields: Mapping[str, Any]) -> np.ndarray:
        r = raw_meta(fields)
        v = (np.array([r[f] for f in self.features]) - self.mean) / self.scale
        return np.append(np.nan_to_num(v, nan=0.0), 1.0)  # NaN (unpublished size): the training mean


@dataclass(frozen=True)
class Block:
    """One data set's training cells: prompts (rows of z), their models, scores and a mask."""

    rows: np.ndarray  # [n] indices into z
    models: tuple[str, ...]
    y: np.ndarray  # [n, m] scores in [0, 1]
    w: np.ndarray  # [n, m] 1 where measured
    weight: float = 1.0  # this data set's share of the loss


@dataclass(frozen=True)
class PairMF:
    mean: np.ndarray  # prompt feature standardization (without the constant)
    scale: np.ndarray
    m: np.ndarray  # [P + 1, F + 1], over the standardized features (any projection folded in)
    meta: MetaScaler
    alpha: Mapping[str, float]

    def logits(self, x: np.ndarray, fields: Mapping[str, Any]) -> np.ndarray:
        z = np.hstack([(np.atleast_2d(x) - self.mean) / self.scale, np.ones((np.atleast_2d(x).shape[0], 1))])
        return z @ (self.m @ self.meta(fields))

    def pair_weights(self, weak: Mapping[str, Any], strong: Mapping[str, Any]) -> np.ndarray:
        """The linear map of z giving l_strong - l_weak: one vector for a fixed pair."""
        return self.m @ (self.meta(strong) - self.meta(weak))

    def score(self, x: np.ndarray, weak: Mapping[str, Any], strong: Mapping[str, Any], kind: str = "gain"):
        lw, ls = self.logits(x, weak), self.logits(x, strong)
        if kind == "logit":
            return ls - lw
        if kind == "weak":
            return 1.0 - _sigmoid(lw)
        return _sigmoid(ls) - _sigmoid(lw)


def _sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(v, -30, 30)))


def fit(
    x: np.ndarray,
    blocks: Sequence[Block],
    metadata: Mapping[str, Mapping[str, Any]],
    features: tuple[str, ...],
    l2: float = 1e-3,
    l2_alpha: float = 1e-2,
    iters: int = 60,
    rank: int | None = 64,
    free_tail: int = 0,
) -> PairMF:
    """Fit M and alpha by L-BFGS on the blocks' mean cross-entropy (each block weighs its `weight`).
    With `rank`, the standardized features but the last `free_tail` (the form features) are first
    projected on their top `rank` principal directions over the training prompts (unsupervised; the
    projection is folded into M, so the head still reads the raw features)."""
    used = sorted({i for b in blocks for i in b.rows})
    mean = x[used].mean(0)
    scale = x[used].std(0)
    scale = np.where(scale < 1e-6, 1.0, scale)
    width = x.shape[1]
    head = width - free_tail
    if rank is not None and rank < head:
        zu = (x[used, :head] - mean[:head]) / scale[:head]
        _, _, vt = np.linalg.svd(zu[:: max(1, len(used) // 8000)], full_matrices=False)
        proj = np.zeros((width + 1, rank + free_tail + 1))
        proj[:head, :rank] = vt[:rank].T
        proj[head:, rank:] = np.eye(free_tail + 1)
    else:
        proj = np.eye(width + 1)
    names = sorted({m for b in blocks for m in b.models})
    meta = MetaScaler.fit(features, [metadata[n] for n in names])
    phi = {n: meta(metadata[n]) for n in names}
    zs = [
        (np.hstack([(x[b.rows] - mean) / scale, np.ones((len(b.rows), 1))]) @ proj).astype(np.float32) for b in blocks
    ]
    phis = [np.stack([phi[n] for n in b.models]) for b in blocks]
    aidx = {n: j for j, n in enumerate(names)}
    amap = [np.array([aidx[n] for n in b.models]) for b in blocks]
    cell_w = [(b.w * (b.weight / max(b.w.sum(), 1.0))).astype(np.float32) for b in blocks]
    ys = [b.y.astype(np.float32) for b in blocks]
    total = sum(b.weight for b in blocks)
    P, F = zs[0].shape[1], phis[0].shape[1]
    reg = np.full((P, F), l2)
    reg[-1, :] = l2 * 0.01  # abilities by metadata: barely penalised
    reg[:, -1] = l2 * 0.1  # prompt easiness shared by every model

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        mm = theta[: P * F].reshape(P, F)
        al = theta[P * F :]
        loss = 0.5 * float((reg * mm * mm).sum()) + 0.5 * l2_alpha * float(al @ al)
        gm = reg * mm
        ga = l2_alpha * al
        for z, ph, am, y, cw in zip(zs, phis, amap, ys, cell_w, strict=True):
            logit = (z @ mm.astype(np.float32)) @ ph.T.astype(np.float32) + al[am][None, :].astype(np.float32)
            # cross-entropy with soft targets: softplus(l) - y l
            loss += float((cw * (np.logaddexp(np.float32(0), logit) - y * logit)).sum()) / total
            p = 1 / (1 + np.exp(-logit))
            r = cw * (p - y) / total
            gm += z.T @ (r @ ph.astype(np.float32))
            np.add.at(ga, am, r.sum(0))
        return loss, np.concatenate([gm.ravel(), ga])

    theta = _lbfgs(loss_grad, np.zeros(P * F + len(names)), iters)
    mm = proj @ theta[: P * F].reshape(P, F)
    return PairMF(mean, scale, mm, meta, {n: float(theta[P * F + j]) for j, n in enumerate(names)})


def _lbfgs(fg, x0: np.ndarray, iters: int, memory: int = 10, tol: float = 1e-7) -> np.ndarray:
    x = x0.copy()
    f, g = fg(x)
    ss: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for _ in range(iters):
        q = g.copy()
        alphas = []
        for s, y in zip(reversed(ss), reversed(ys), strict=True):
            a = (s @ q) / (y @ s)
            alphas.append(a)
            q -= a * y
        if ss:
            q *= (ss[-1] @ ys[-1]) / (ys[-1] @ ys[-1])
        for (s, y), a in zip(zip(ss, ys, strict=True), reversed(alphas), strict=True):
            b = (y @ q) / (y @ s)
            q += s * (a - b)
        d = -q
        if g @ d >= 0:  # not a descent direction: restart from the gradient
            ss.clear()
            ys.clear()
            d = -g
        step = 1.0 if ss else 1.0 / max(1.0, float(np.abs(g).max()))
        while True:
            xn = x + step * d
            fn, gn = fg(xn)
            if fn <= f + 1e-4 * step * (g @ d) or step < 1e-10:
                break
            step *= 0.5
        s, y = xn - x, gn - g
        if s @ y > 1e-12:
            ss.append(s)
            ys.append(y)
            if len(ss) > memory:
                ss.pop(0)
                ys.pop(0)
        small = f - fn < 1e-7 * abs(f)
        x, f, g = xn, fn, gn
        if np.abs(g).max() < tol or small:
            break
    return x
