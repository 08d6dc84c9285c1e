"""Domain, complexity and PII from one shared encoder pass (onnxruntime, no torch at run time).

clf = Classifier.load()
[c] = clf.classify(["my card 4111 1111 1111 1111 was charged twice"])
c.domain, c.complexity, c.pii
"""

from extproc.classifier.batching import AsyncClassifier, ClassifierClosedError
from extproc.classifier.classifier import Classification, Classifier, ModelError
from extproc.classifier.labels import DOMAINS, PII_TYPES
from extproc.classifier.pii import PiiSpan

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
