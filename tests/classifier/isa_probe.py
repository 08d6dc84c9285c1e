"""Run the shipped graphs on the reference batch and save their outputs (run under qemu by a test).

qemu-x86_64 -cpu Haswell python tests/classifier/isa_probe.py out.npz
"""

import sys
from pathlib import Path

import numpy as np

from extproc.classifier.classifier import MODEL_DIR, run_graphs
from extproc.classifier.domain_head import model_domain_head

REFERENCE = Path(__file__).with_name("data") / "reference.npz"

if __name__ == "__main__":
    ref = np.load(REFERENCE)
    out = run_graphs(MODEL_DIR, ref["input_ids"], ref["attention_mask"])
    head = model_domain_head(MODEL_DIR)
    if head is not None:  # the shipped domain: the graph's head ensembled with the embedding's
        out["domain_ensemble"] = head.combine(out["domain_probs"], out["embedding"])
    np.savez(sys.argv[1], **out)
