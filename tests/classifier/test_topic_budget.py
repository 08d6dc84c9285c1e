"""classifier.topic_tokens: domain and complexity read at most that many tokens of a text, its first
half and last half, as the model card ("Inputs and truncation") says; the tagger is not affected."""

import asyncio
import json

import numpy as np
import pytest

from extproc.classifier import AsyncClassifier, Classifier
from extproc.classifier.batching import text_key
from extproc.classifier.classifier import MODEL_DIR, run_graphs
from extproc.classifier.domain_head import load_domain_head
from extproc.classifier.labels import DOMAINS
from extproc.classifier.text import WINDOW, encode, load_tokenizer, with_specials

TOK = load_tokenizer(MODEL_DIR / "tokenizer.json")
CONFIG = json.loads((MODEL_DIR / "config.json").read_text())
QUESTION = (
    "A 2 kg block slides down a frictionless incline of 30 degrees from a height of 5 m. What is its "
    "speed at the bottom, and how long does the slide take if the incline is 10 m long? Then explain "
    "why the mass of the block does not matter for either answer, and what would change with friction "
    "coefficient 0.2 between the block and the incline surface."
)


def graph_domain(ids: np.ndarray) -> np.ndarray:
    """The shipped domain probabilities for exactly these content tokens: the trunk graph's,
    ensembled with the domain head over its embedding when the model ships one."""
    seq = with_specials(ids)[None, :]
    out = run_graphs(MODEL_DIR, seq, np.ones_like(seq))
    head = load_domain_head(MODEL_DIR / CONFIG["domain_head"], len(DOMAINS), 384) if CONFIG.get("domain_head") else None
    return (head.combine(out["domain_probs"], out["embedding"]) if head else out["domain_probs"])[0]


def test_a_text_within_the_budget_reads_as_with_the_default(classifier: Classifier):
    text = "what is the speed of light in a vacuum"
    assert len(encode(TOK, [text])[0].ids) < 32
    default = classifier.classify([text], pii_tokens=0)
    assert classifier.classify([text], pii_tokens=0, topic_tokens=32) == default
    assert classifier.classify([text], pii_tokens=0, topic_tokens=10_000) == default


@pytest.mark.parametrize("budget", [16, 33, 64])
def test_a_longer_text_is_read_as_the_first_and_last_half_of_the_budget(classifier: Classifier, budget: int):
    [e] = encode(TOK, [QUESTION])
    assert len(e.ids) > budget
    head = budget // 2
    read = np.concatenate([e.ids[:head], e.ids[len(e.ids) - (budget - head) :]])
    [c] = classifier.classify([QUESTION], pii_tokens=0, topic_tokens=budget)
    probs = np.array([c.domain_probs[d] for d in DOMAINS])
    np.testing.assert_allclose(probs, graph_domain(read), atol=1e-6)  # the same graph on the same tokens
    tail_from = int(e.offsets[len(e.ids) - (budget - head), 0])
    assert c.topic_chars == int(e.offsets[head - 1, 1]) + len(QUESTION) - tail_from


def test_a_long_text_is_cut_to_the_budget_without_tokenizing_all_of_it(classifier: Classifier):
    # past 2 x 510 characters the classifier tokenizes only a head and a tail slice: the same tokens
    long = QUESTION + " Show every step. " * 200 + QUESTION
    [e] = encode(TOK, [long])
    read = np.concatenate([e.ids[:32], e.ids[-32:]])
    [c] = classifier.classify([long], pii_tokens=0, topic_tokens=64)
    probs = np.array([c.domain_probs[d] for d in DOMAINS])
    np.testing.assert_allclose(probs, graph_domain(read), atol=1e-6)
    assert c.topic_chars < len(long) // 10


def test_the_budget_does_not_change_what_the_tagger_reads_or_finds(classifier: Classifier):
    text = QUESTION + " Send the answer to Maria Gonzalez at maria.gonzalez@example.com or 415-555-0132."
    default, budgeted = (classifier.classify([text], topic_tokens=b)[0] for b in (WINDOW, 16))
    assert default.pii and budgeted.pii == default.pii and budgeted.pii_chars == default.pii_chars
    assert budgeted.topic_chars < default.topic_chars == len(text)


def test_a_budget_below_two_tokens_is_refused(classifier: Classifier):
    with pytest.raises(ValueError, match="topic_tokens"):
        classifier.classify([QUESTION], topic_tokens=1)


def test_each_budget_is_cached_on_its_own(classifier: Classifier):
    assert text_key(QUESTION, 0, True, 64) != text_key(QUESTION, 0, True, WINDOW)
    assert text_key(QUESTION, 0, True, 10_000) == text_key(QUESTION, 0, True, WINDOW)

    async def run():
        ac = AsyncClassifier(classifier)
        full = await ac.classify(QUESTION, 0, True)
        short = await ac.classify(QUESTION, 0, True, None, 16)
        again = await ac.classify(QUESTION, 0, True, None, 16)
        await ac.aclose()
        return full, short, again

    full, short, again = asyncio.run(run())
    assert again is short and short.topic_chars < full.topic_chars


def test_the_schema_bounds_the_budget_as_the_classifier_reads_it():
    schema = json.loads((MODEL_DIR.parents[1] / "policy" / "schema.json").read_text())
    prop = schema["properties"]["classifier"]["properties"]["topic_tokens"]
    assert prop["maximum"] == WINDOW and prop["minimum"] >= 2
