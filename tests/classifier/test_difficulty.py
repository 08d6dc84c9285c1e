"""The complexity head's label: multi-pair gain, percentiles, and leaving a pair's models out."""

import numpy as np

from extproc.classifier.train.difficulty import irt, pair_gain, same_model, targets
from extproc.classifier.train.routing_data import Item


def _item(i, scores, dataset="d", category="c"):
    return Item(dataset, f"x{i}", f"prompt {i}", scores, "train", "exam", category)


# three models of rising ability over four prompts
ITEMS = [
    _item(0, {"small": 1, "mid": 1, "big": 1}),  # everyone right: nothing to gain
    _item(1, {"small": 0, "mid": 0, "big": 0}),  # everyone wrong: nothing to gain either
    _item(2, {"small": 0, "mid": 1, "big": 1}),  # the bigger models gain
    _item(3, {"small": 0, "mid": 0, "big": 1}),
]


def test_pair_gain_is_zero_where_every_model_agrees_and_positive_where_bigger_ones_win():
    g = pair_gain(ITEMS)
    assert g[0] == 0 and g[1] == 0
    assert g[2] > 0 and g[3] > 0


def test_difficulty_ranks_the_prompt_nobody_answers_hardest_which_gain_does_not():
    b = irt(ITEMS)
    assert b.argmax() == 1  # why difficulty alone routes prompts no model can answer first
    assert pair_gain(ITEMS).argmax() != 1


def test_left_out_models_are_never_read_under_any_of_their_names():
    items = [_item(i, {**it.scores, "Meta-Llama-3_1-8B-Instruct": 1 - i % 2}) for i, it in enumerate(ITEMS)]
    assert np.array_equal(pair_gain(items, exclude=["llama-3.1-8b-instruct"]), pair_gain(ITEMS))
    assert same_model("llama-3.1-70b-instruct", "Meta-Llama-3_1-70B-Instruct")
    assert not same_model("llama-3.1-8b-instruct", "Meta-Llama-3_1-8B")


def test_targets_are_percentiles_within_each_data_set():
    items = ITEMS + [_item(10 + i, it.scores, dataset="other") for i, it in enumerate(ITEMS)]
    t = targets(items)
    assert ((t > 0) & (t < 1)).all()
    assert np.allclose(t[:4], t[4:])  # the same prompts rank the same within their own data set
