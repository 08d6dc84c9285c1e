"""Domain, complexity and PII from one shared encoder pass (onnxruntime, no torch at run time).

clf = Classifier.load()
[c] = clf.classify(["my card 4111 1111 1111 1111 was charged twice"])
c.domain, c.complexity, c.pii

The runtime names are imported on first use (PEP 562), so the light modules of this package
(`text`, `pii`, `normalize`, `labels`) load without onnxruntime: the policy and the signals import
them in every process, the encoder only where a policy turns it on.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from extproc.classifier.labels import DOMAINS, PII_TYPES

if TYPE_CHECKING:
    from extproc.classifier.batching import AsyncClassifier, ClassifierClosedError
    from extproc.classifier.classifier import Classification, Classifier, ModelError
    from extproc.classifier.pii import PiiSpan

_LAZY = {
    "AsyncClassifier": "batching",
    "ClassifierClosedError": "batching",
    "Classification": "classifier",
    "Classifier": "classifier",
    "ModelError": "classifier",
    "PiiSpan": "pii",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DOMAINS",
    "PII_TYPES",
    "AsyncClassifier",
    "Classification",
    "Classifier",
    "ClassifierClosedError",
    "ModelError",
    "PiiSpan",
]
