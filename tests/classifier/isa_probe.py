"""Run the shipped graphs on the reference batch and save their outputs (run under qemu by a test).

qemu-x86_64 -cpu Haswell python tests/classifier/isa_probe.py out.npz
"""

import sys
from pathlib import Path

import numpy as np

from extproc.classifier.classifier import MODEL_DIR, run_graphs

REFERENCE = Path(__file__).with_name("data") / "reference.npz"

if __name__ == "__main__":
    ref = np.load(REFERENCE)
    np.savez(sys.argv[1], **run_graphs(MODEL_DIR, ref["input_ids"], ref["attention_mask"]))
