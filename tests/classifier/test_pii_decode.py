import itertools

import numpy as np

from extproc.classifier.labels import PII_TAGS
from extproc.classifier.pii import decode, merge_windows, tagged_spans
from extproc.classifier.text import window_starts


def tag_probs(tags: list[str], p: float = 0.9) -> np.ndarray:
    out = np.full((len(tags), len(PII_TAGS)), (1 - p) / (len(PII_TAGS) - 1), np.float32)
    for i, t in enumerate(tags):
        out[i, PII_TAGS.index(t)] = p
    return out


def words(text: str) -> np.ndarray:
    """Whitespace tokens as (start, end) offsets: enough to drive the decoder."""
    offs, i = [], 0
    for w in text.split(" "):
        offs.append((i, i + len(w)))
        i += len(w) + 1
    return np.array(offs, np.int64)


def test_bio_decode_gives_character_spans_in_the_original_text():
    text = "mail Jane Doe at jane@example.com now"
    tags = ["O", "B-PERSON", "I-PERSON", "O", "B-EMAIL_ADDRESS", "O"]
    spans = decode(text, words(text), tag_probs(tags))
    assert [(s.type, text[s.start : s.end]) for s in spans] == [
        ("PERSON", "Jane Doe"),
        ("EMAIL_ADDRESS", "jane@example.com"),
    ]
    assert all(0.8 < s.score <= 1.0 for s in spans)


def test_i_tag_without_b_still_opens_a_span_and_type_change_closes_it():
    spans = tagged_spans(tag_probs(["I-PERSON", "I-PERSON", "B-US_SSN", "O"]))
    assert [(s[0], s[1], s[2]) for s in spans] == [(0, 0, 2), (4, 2, 3)]


def test_structured_span_failing_its_validator_is_dropped():
    text = "card 4111 1111 1111 1112 declined"
    tags = ["O", "B-CREDIT_CARD", "I-CREDIT_CARD", "I-CREDIT_CARD", "I-CREDIT_CARD", "O"]
    assert decode(text, words(text), tag_probs(tags)) == ()


def test_validated_candidate_needs_tagger_support():
    text = "order 4111 1111 1111 1111 shipped"
    offs = words(text)
    unsupported = tag_probs(["O"] * 6)
    assert decode(text, offs, unsupported) == ()
    weak = tag_probs(["O"] * 6)
    weak[1:5, 0] = 0.55  # the tagger leans to "O" but sees some PII: enough for a valid card
    weak[1:5, PII_TAGS.index("I-CREDIT_CARD")] = 0.4
    (span,) = decode(text, offs, weak)
    assert (span.type, text[span.start : span.end]) == ("CREDIT_CARD", "4111 1111 1111 1111")


def test_low_confidence_span_is_dropped():
    text = "hi Jane"
    assert decode(text, words(text), tag_probs(["O", "B-PERSON"], p=0.3)) == ()


def test_span_trims_surrounding_punctuation():
    text = "(jane@example.com)."
    (span,) = decode(text, np.array([[0, len(text)]]), tag_probs(["B-EMAIL_ADDRESS"]))
    assert text[span.start : span.end] == "jane@example.com"


def test_windows_cover_every_token_with_overlap():
    for n in (1, 510, 511, 1000, 5000):
        starts = window_starts(n, 510, 64)
        covered = np.zeros(n, bool)
        for s in starts:
            covered[s : s + 510] = True
        assert covered.all()
        assert starts[-1] + 510 == max(n, 510) or n <= 510
        assert all(b - a <= 510 - 64 for a, b in itertools.pairwise(starts))


def test_merge_windows_prefers_the_window_where_a_token_is_central():
    a = tag_probs(["O"] * 10)
    b = tag_probs(["B-PERSON"] * 10)
    merged = merge_windows(15, [(0, a), (5, b)])
    # token 9 is at the edge of window a (margin 0) and central-ish in b (margin 4)
    assert merged[9].argmax() == PII_TAGS.index("B-PERSON")
    assert merged[2].argmax() == 0
    assert merged[14].argmax() == PII_TAGS.index("B-PERSON")


def test_sub_word_span_is_widened_to_the_whole_word():
    text = "hi Hertzog"
    offsets = np.array([[0, 2], [3, 6], [6, 10]])  # "hi", "Her", "##tzog"
    (span,) = decode(text, offsets, tag_probs(["O", "O", "B-PERSON"]))
    assert text[span.start : span.end] == "Hertzog"


def test_bare_number_is_not_a_street_address():
    text = "see page 209 of the book"
    assert decode(text, words(text), tag_probs(["O", "O", "B-STREET_ADDRESS", "O", "O", "O"])) == ()
    text = "ship to 12 Crown Street please"
    tags = ["O", "O", "B-STREET_ADDRESS", "I-STREET_ADDRESS", "I-STREET_ADDRESS", "O"]
    (span,) = decode(text, words(text), tag_probs(tags))
    assert text[span.start : span.end] == "12 Crown Street"


def test_lowercase_word_in_cased_text_is_not_a_name_but_lowercase_chat_keeps_names():
    cased = "Which of the following is true"
    assert decode(cased, words(cased), tag_probs(["O", "O", "B-PERSON", "O", "O", "O"])) == ()
    chat = "email john about it"
    (span,) = decode(chat, words(chat), tag_probs(["O", "B-PERSON", "O", "O"]))
    assert chat[span.start : span.end] == "john"


def test_option_letters_and_multi_line_spans_are_not_names():
    text = "Options:\nG\nH"
    offsets = np.array([[0, 7], [7, 8], [9, 10], [11, 12]])
    assert decode(text, offsets, tag_probs(["O", "O", "B-PERSON", "I-PERSON"])) == ()
