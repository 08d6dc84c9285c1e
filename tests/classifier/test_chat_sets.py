"""The chat-style domain test set stays a final test: nothing that trains or selects reads it."""

from __future__ import annotations

import difflib
import json
import re

from extproc.classifier.train import chat_style
from extproc.classifier.train.chat_style import CHAT_SETS


def _prompts(name: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in CHAT_SETS[name].read_text().splitlines() if line.strip()]


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", s.lower())


def test_dev_set_has_no_near_duplicate_of_a_test_prompt():
    test = [_norm(p) for p in _prompts("chat_test")]
    for p in _prompts("chat_dev"):
        close = max(difflib.SequenceMatcher(None, _norm(p), t).ratio() for t in test)
        assert close < 0.7, f"dev prompt {p!r} is close to a test prompt ({close:.2f})"


def test_generator_topics_do_not_occur_in_test_prompts():
    test = [p.lower() for p in _prompts("chat_test")]
    found = [t for topics in chat_style.TOPICS.values() for t in topics if any(t.lower() in p for p in test)]
    assert not found, f"topic phrases written out in the test set: {found}"
