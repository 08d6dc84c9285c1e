"""Trunk hidden states computed once per training sequence (frozen trunk), kept as fp16.

The trunk runs in onnxruntime from the same graph builder as the shipped model, so the cached
states are exactly what the exported branches will see (and several times faster than torch here).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from extproc.classifier.train.graph import build


@dataclass
class Ragged:
    """Concatenated [total_tokens, 384] fp16 states, sequence i at offsets[i]:offsets[i+1]."""

    states: np.ndarray
    offsets: np.ndarray
    ids: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Padded float32 states [b, L, 384] and mask [b, L]."""
        lens = self.offsets[idx + 1] - self.offsets[idx]
        L = int(lens.max())
        x = np.zeros((len(idx), L, self.states.shape[1]), np.float32)
        m = np.zeros((len(idx), L), np.float32)
        for j, i in enumerate(idx):
            a, b = self.offsets[i], self.offsets[i + 1]
            x[j, : b - a] = self.states[a:b]
            m[j, : b - a] = 1
        return x, m


def trunk_session(sd: dict[str, np.ndarray], n_layers: int, threads: int) -> ort.InferenceSession:
    model = build(sd, n_layers, [], extra_outputs=("trunk",))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def keyed_path(cache: Path | None, stem: str, head: bytes, items: Iterable[bytes], sep: bytes) -> Path | None:
    """Where a result computed from ``items`` is kept under ``cache`` (None: not kept): named by a
    digest of ``head`` and every item followed by ``sep``, so other inputs never read it."""
    if cache is None:
        return None
    key = hashlib.sha1(head)
    for item in items:
        key.update(item)
        key.update(sep)
    return cache / f"{stem}-{key.hexdigest()[:16]}.npz"


def compute(
    sess: ort.InferenceSession, seqs: list[np.ndarray], cache: Path | None, tokens_per_batch: int = 1024
) -> Ragged:
    """Run the trunk over every sequence (with specials), batching by similar length."""
    path = keyed_path(cache, "trunk", b"", (s.tobytes() for s in seqs), b"|")
    if path and path.exists():
        z = np.load(path)
        return Ragged(z["states"], z["offsets"], seqs)
    lens = np.array([len(s) for s in seqs])
    offsets = np.concatenate([[0], np.cumsum(lens)])
    states = np.zeros((offsets[-1], 384), np.float16)
    order = np.argsort(lens, kind="stable")
    t0, done = time.time(), 0
    i = 0
    while i < len(order):
        n = max(1, tokens_per_batch // int(lens[order[min(i + 64, len(order) - 1)]]))
        idx = order[i : i + n]
        L = int(lens[idx].max())
        ids = np.zeros((len(idx), L), np.int64)
        mask = np.zeros((len(idx), L), np.int64)
        for j, k in enumerate(idx):
            ids[j, : lens[k]] = seqs[k]
            mask[j, : lens[k]] = 1
        out = sess.run(["trunk"], {"input_ids": ids, "attention_mask": mask})[0]
        for j, k in enumerate(idx):
            states[offsets[k] : offsets[k + 1]] = out[j, : lens[k]]
        i += len(idx)
        done += len(idx)
        if done % 2000 < len(idx):
            print(f"  trunk cache {done}/{len(seqs)} sequences, {time.time() - t0:.0f}s", flush=True)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, states=states, offsets=offsets)
    return Ragged(states, offsets, seqs)
