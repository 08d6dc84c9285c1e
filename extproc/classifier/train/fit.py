"""Training loops for the branches, on cached trunk states."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from extproc.classifier.train.cache import Ragged
from extproc.classifier.train.encoder import Branch, BranchSpec


@dataclass(frozen=True)
class FitConfig:
    epochs: int
    lr: float
    batch: int
    weight_decay: float = 0.01
    aux_weight: float = 0.3
    seed: int = 0


def _batches(ragged: Ragged, idx: np.ndarray, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled batches of similar length (little padding)."""
    lens = ragged.offsets[idx + 1] - ragged.offsets[idx]
    noisy = lens + rng.uniform(0, 8, len(lens))
    order = idx[np.argsort(noisy)]
    chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
    rng.shuffle(chunks)
    return chunks


def predict(branch: Branch, ragged: Ragged, idx: np.ndarray, batch: int = 128) -> np.ndarray:
    """Head outputs (logits) for the given sequences, in idx order."""
    branch.eval()
    lens = ragged.offsets[idx + 1] - ragged.offsets[idx]
    order = np.argsort(lens)
    outs: list[np.ndarray | None] = [None] * len(idx)
    with torch.no_grad():
        for i in range(0, len(order), batch):
            sel = order[i : i + batch]
            x, m = ragged.batch(idx[sel])
            y, _ = branch(torch.from_numpy(x), torch.from_numpy(m))
            for j, k in enumerate(sel):
                outs[k] = y[j].numpy()
    if y.dim() == 2:  # sentence-level head
        return np.stack(outs)  # type: ignore[arg-type]
    return outs  # type: ignore[return-value]


def fit(branch: Branch, ragged: Ragged, train_idx: np.ndarray, loss_fn, cfg: FitConfig, log: str = "") -> list[float]:
    """Train the branch's LoRA factors and heads; loss_fn(out, aux, idx, mask) -> scalar."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    params = [p for p in branch.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * int(np.ceil(len(train_idx) / cfg.batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    history = []
    t0 = time.time()
    for epoch in range(cfg.epochs):
        branch.train()
        total, n = 0.0, 0
        for sel in _batches(ragged, train_idx, cfg.batch, rng):
            x, m = ragged.batch(sel)
            mask = torch.from_numpy(m)
            out, aux = branch(torch.from_numpy(x), mask)
            loss = loss_fn(out, aux, sel, mask)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(sel)
            n += len(sel)
        history.append(total / n)
        print(f"  {log} epoch {epoch + 1}/{cfg.epochs} loss {total / n:.4f} ({time.time() - t0:.0f}s)", flush=True)
    branch.eval()
    return history


def new_branch(sd: dict[str, torch.Tensor], spec: BranchSpec, seed: int) -> Branch:
    torch.manual_seed(seed)
    return Branch(sd, spec)


def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * mask
    return loss.sum() / mask.sum().clamp(min=1.0)
