"""The PII training-data generator: deterministic, well-formed spans, and multi-line texts both ways."""

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("faker")

from extproc.classifier.labels import PII_TYPES
from extproc.classifier.train.pii_data import Generator, generate

OPTION_LINE = re.compile(r"^(?:\(?[A-Ja-j][).:]|\d+[.)]) \S", re.MULTILINE)


@pytest.fixture(scope="module")
def examples():
    return generate(1500, seed=0)


def test_same_seed_gives_the_same_examples():
    a, b = generate(200, seed=3), generate(200, seed=3)
    assert [(x.text, x.spans) for x in a] == [(x.text, x.spans) for x in b]
    assert [x.text for x in generate(200, seed=4)] != [x.text for x in a]


def test_examples_do_not_depend_on_the_hash_seed_or_the_clock():
    code = (
        "import hashlib; from extproc.classifier.train.pii_data import generate; "
        "print(hashlib.sha1(repr([(x.text, x.spans) for x in generate(300, 0)]).encode()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": h},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for h in ("1", "2")
    }
    assert len(digests) == 1


def test_spans_are_inside_the_text_and_typed(examples):
    for ex in examples:
        for start, end, typ in ex.spans:
            assert 0 <= start < end <= len(ex.text)
            assert typ in PII_TYPES
            assert ex.text[start:end].strip()


def test_classes_stay_balanced(examples):
    with_pii = sum(bool(x.spans) for x in examples) / len(examples)
    assert 0.45 <= with_pii <= 0.65


def test_multiline_lists_are_mostly_pii_free(examples):
    lists = [x for x in examples if len(OPTION_LINE.findall(x.text)) >= 4]
    assert len(lists) >= 0.05 * len(examples)
    free = sum(not x.spans for x in lists) / len(lists)
    assert 0.4 <= free <= 0.8


def test_pii_also_appears_on_a_later_line_of_a_multiline_text():
    g = Generator(seed=1)
    later = 0
    for _ in range(300):
        ex = g.multiline(negative=False)
        assert ex.spans
        later += any("\n" in ex.text[:start] for start, _, _ in ex.spans)
    assert later >= 150


def test_multiline_negatives_have_no_spans_and_several_lines():
    g = Generator(seed=2)
    for _ in range(300):
        ex = g.multiline(negative=True)
        assert ex.spans == []
        assert ex.text.count("\n") >= 1
