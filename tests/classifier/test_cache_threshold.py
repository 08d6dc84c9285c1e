"""The cache's default threshold holds on the paraphrase set (bench/cache_paraphrases.py) with the
shipped encoder: few false hits on either half, and paraphrases still served."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from extproc.classifier import Classifier
from extproc.policy.config import DEFAULT_CACHE_THRESHOLD

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from cache_paraphrases import pairs
from cache_threshold import rates, similarities


@pytest.mark.parametrize("half", ["pick", "check"])
def test_the_default_threshold_keeps_false_hits_near_one_percent(classifier: Classifier, half: str) -> None:
    items = [p for p in pairs() if p.half == half]
    hit, false = rates(items, similarities(classifier, items), DEFAULT_CACHE_THRESHOLD)
    # 1% was the target on the pick half on an AMD EPYC Zen 5; int8 kernels differ by CPU, so a
    # little room (one or two pairs) is allowed.
    assert false <= 0.015, f"false-hit rate {false:.1%} at {DEFAULT_CACHE_THRESHOLD}"
    assert hit >= 0.15, f"hit rate {hit:.1%} at {DEFAULT_CACHE_THRESHOLD}"


def test_without_the_exact_checks_the_same_threshold_would_serve_lookalikes(classifier: Classifier) -> None:
    items = pairs()
    _, false = rates(items, similarities(classifier, items), DEFAULT_CACHE_THRESHOLD, mode="cosine")
    assert false > 0.05  # why guards.py exists: numbers and negations barely move the embedding
