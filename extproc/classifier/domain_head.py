"""A second domain opinion over the trunk's free `embedding` output, ensembled with the graph's head.

The graph's domain branch (LoRA on layer 5, [CLS] query only) and this head read the same text
through different views: the branch attends over the top layer, the head reads the masked mean of
the frozen trunk (the `embedding` output every classification computes anyway, so it costs one
small matrix product). Their log-probabilities are mixed:

    log p = graph_weight * log p_graph + head_weight * log softmax(layers(standardize(embedding)))

`layers` is one or more dense layers (ReLU between them) fitted offline (torch, training only:
`extproc/classifier/train/domain_head.py`) and run here in numpy; the mixing weights are chosen on
validation data.
The embedding is bit-identical on every CPU (7-bit int8 trunk, model card), and this part runs in
float64 numpy, so the ensemble is as CPU-independent as the graph.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class DomainHeadError(ValueError):
    """A domain head document that cannot be used; the message says which field and why."""


@dataclass(frozen=True)
class DomainHead:
    mean: np.ndarray  # [384]
    scale: np.ndarray  # [384]
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]  # (W [in, out], b [out]); ReLU between layers
    graph_weight: float
    head_weight: float
    meta: Mapping[str, Any]

    def logits(self, embedding: np.ndarray) -> np.ndarray:
        """Head logits [n, 14] for embeddings [n, 384]."""
        h = (np.asarray(embedding, np.float64) - self.mean) / self.scale
        for i, (w, b) in enumerate(self.layers):
            h = h @ w + b
            if i + 1 < len(self.layers):
                h = np.maximum(h, 0.0)
        return h

    def combine(self, graph_probs: np.ndarray, embedding: np.ndarray) -> np.ndarray:
        """Ensembled probabilities [n, 14] (float32) from the graph's and the embedding's."""
        z = self.head_weight * _log_softmax(self.logits(embedding))
        z += self.graph_weight * np.log(np.clip(np.asarray(graph_probs, np.float64), 1e-12, 1.0))
        return np.exp(_log_softmax(z)).astype(np.float32)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def load_domain_head(path: Path, n_classes: int = 14, dim: int = 384) -> DomainHead:
    """The head from its `.npz` file (train/domain_head.py writes it); DomainHeadError says what is wrong."""
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise DomainHeadError(f"{path}: not a domain head file ({e})") from e
    try:
        mean, scale = arrays["mean"].astype(np.float64), arrays["scale"].astype(np.float64)
        n = sum(1 for k in arrays if k.startswith("w") and k[1:].isdigit())
        layers = tuple((arrays[f"w{i}"].astype(np.float64), arrays[f"b{i}"].astype(np.float64)) for i in range(n))
        gw, hw = (float(v) for v in arrays["weights"])
        meta = json.loads(arrays["meta"].tobytes().decode()) if "meta" in arrays else {}
    except (KeyError, ValueError) as e:
        raise DomainHeadError(f"{path}: a field is missing or malformed ({e})") from e
    if mean.shape != (dim,) or scale.shape != (dim,) or not (scale > 0).all():
        raise DomainHeadError(f"{path}: mean and scale must be {dim} numbers, scale > 0")
    width = dim
    for i, (w, b) in enumerate(layers):
        if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
            raise DomainHeadError(f"{path}: layer {i} does not take {width} inputs")
        width = w.shape[1]
    if not layers or width != n_classes:
        raise DomainHeadError(f"{path}: the last layer must have {n_classes} outputs")
    if not all(np.isfinite(a).all() for a in (mean, scale, *[x for wb in layers for x in wb])):
        raise DomainHeadError(f"{path}: weights must be finite")
    return DomainHead(mean, scale, layers, gw, hw, meta)


def model_domain_head(model_dir: Path) -> DomainHead | None:
    """The head a model directory's config.json names, or None."""
    name = json.loads((model_dir / "config.json").read_text()).get("domain_head")
    return load_domain_head(model_dir / name) if name else None
