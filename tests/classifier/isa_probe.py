"""Run the shipped graph on the reference batch and save its outputs (run under qemu by a test).

qemu-x86_64 -cpu Haswell python tests/classifier/isa_probe.py out.npz
"""

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

MODEL = Path(__file__).resolve().parents[2] / "extproc" / "classifier" / "model" / "classifier.onnx"
REFERENCE = Path(__file__).with_name("data") / "reference.npz"

if __name__ == "__main__":
    ref = np.load(REFERENCE)
    session = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"])
    names = ["domain_probs", "complexity_probs", "pii_probs"]
    outs = session.run(names, {"input_ids": ref["input_ids"], "attention_mask": ref["attention_mask"]})
    np.savez(sys.argv[1], **dict(zip(names, outs, strict=True)))
