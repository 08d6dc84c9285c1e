"""Fitted complexity heads: the artifact format, fitting with numpy, and policies that use them."""

import json

import numpy as np
import pytest

from extproc.evaluation import fitting
from extproc.heads import EMBEDDING_DIM, FORM_FEATURES, Head, HeadError, form_features, parse_head
from extproc.policy import ConfigError, parse_policy
from extproc.signals import Signals, Topic
from extproc.signals.tokens import TokenCounter

WIDTH = EMBEDDING_DIM + len(FORM_FEATURES)


def _head(name="pair", bias=0.0, weight_on_length=1.0) -> Head:
    w = np.zeros(WIDTH)
    w[EMBEDDING_DIM] = weight_on_length  # log_chars
    return Head(name, ("embedding", "form"), np.zeros(WIDTH), np.ones(WIDTH), w, bias, {"weak": "a"})


def _policy(heads_yaml: str, when: str = "{complexity: {head: pair, above: 0.5}}") -> str:
    return f"""
version: 1
default_model: small
models: {{small: {{}}, large: {{}}}}
{heads_yaml}
decisions:
  - name: hard
    when: {when}
    model: large
"""


def test_form_features_are_deterministic_and_see_structure():
    short = form_features("what is 2+2?")
    long = form_features(
        "Write a Python function that parses a CSV file.\nThen explain, step by step, why it is O(n).\n- must handle quotes\n- at least 3 tests"
    )
    assert short.shape == long.shape == (len(FORM_FEATURES),)
    assert np.array_equal(short, form_features("what is 2+2?"))
    f = dict(zip(FORM_FEATURES, long, strict=True))
    assert f["log_chars"] > dict(zip(FORM_FEATURES, short, strict=True))["log_chars"]
    assert f["code_words"] > 0 and f["step_words"] > 0 and f["constraint_words"] > 0 and f["log_list_items"] > 0
    assert form_features("").shape == (len(FORM_FEATURES),)


def test_head_round_trips_through_its_json():
    head = _head()
    again = parse_head(json.loads(json.dumps(head.to_json())))
    x = np.random.default_rng(0).normal(size=(5, WIDTH))
    assert np.allclose(head.score_features(x), again.score_features(x), atol=1e-5)
    assert again.meta == {"weak": "a"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other/1"}, "format"),
        ({"weights": [0.0] * 3}, "weights must be a list of"),
        ({"scale": [0.0] * WIDTH}, "scale must be positive"),
        ({"bias": "high"}, "bias must be a finite number"),
        ({"inputs": ["tokens"]}, "inputs"),
        ({"form_features": ["log_chars"]}, "refit"),
    ],
)
def test_a_broken_head_is_refused_with_the_field_named(change, message):
    doc = {**_head().to_json(), **change}
    with pytest.raises(HeadError, match=message):
        parse_head(doc)


def test_logistic_fit_recovers_a_signal_and_cross_validation_sees_it():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    p = 1 / (1 + np.exp(-(2 * x[:, 0] - x[:, 1])))
    y = (rng.random(400) < p).astype(float)
    head = fitting.fit_head("t", x, y, ("embedding",), l2=1e-3)
    assert head.weights[0] > 1.0 and head.weights[1] < -0.3
    oof = fitting.out_of_fold(x, y, l2=1e-3)
    weak, strong = 1 - y, np.ones(400)  # the strong model adds exactly where y = 1
    assert fitting.routing(oof, weak, strong).apgr > 0.7


def test_routing_metrics_for_perfect_random_and_tied_scores():
    weak = np.array([1, 0, 0, 1, 0, 1, 0, 0], float)
    strong = np.array([1, 1, 1, 1, 0, 1, 1, 0], float)
    perfect = fitting.routing(strong - weak, weak, strong)
    assert perfect.apgr > 0.8 and perfect.cpt50 is not None and perfect.cpt50 <= 0.25
    tied = fitting.routing(np.zeros(8), weak, strong)  # one score for all: no order, the random line
    assert tied.apgr == pytest.approx(0.5)
    _, quality, share = fitting.threshold_for(strong - weak, weak, strong, strong.mean())
    assert quality >= strong.mean() and share == pytest.approx(3 / 8)


def test_policy_with_an_inline_head_routes_on_its_score():
    doc = json.dumps(_head().to_json())
    policy = parse_policy(_policy(f"heads:\n  pair: {doc}"))
    [decision] = policy.decisions
    features = np.zeros(WIDTH, np.float32)
    for log_chars, expected in ((2.0, True), (-2.0, False)):
        features[EMBEDDING_DIM] = log_chars
        signals = Signals((), {}, TokenCounter())
        signals.classified(Topic("math", {"math": 1.0}, 0.0, features.copy()), None)
        assert decision.when.evaluate(signals) is expected
        assert decision.when.explain(signals)["complexity"]["head"] == "pair"


def test_policy_reads_a_head_file_beside_it(tmp_path):
    (tmp_path / "pair.json").write_text(json.dumps(_head().to_json()))
    (tmp_path / "policy.yaml").write_text(_policy("heads:\n  pair: {file: pair.json}"))
    from extproc.policy import load_policy

    policy = load_policy(tmp_path / "policy.yaml")
    assert policy.heads["pair"].name == "pair"
    assert policy.head_files == (str((tmp_path / "pair.json").resolve()),)
    digest = policy.digest
    (tmp_path / "pair.json").write_text(json.dumps(_head(bias=1.0).to_json()))
    assert load_policy(tmp_path / "policy.yaml").digest != digest  # the config hash follows the head


def test_unknown_head_name_is_a_config_error_with_a_suggestion():
    doc = json.dumps(_head().to_json())
    with pytest.raises(ConfigError, match=r"'pairr' is not a head defined under heads \(did you mean 'pair'\?\)"):
        parse_policy(_policy(f"heads:\n  pair: {doc}", "{complexity: {head: pairr, above: 0.5}}"))


def test_missing_or_broken_head_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read head"):
        parse_policy(_policy("heads:\n  pair: {file: nowhere.json}"), base_dir=tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({**_head().to_json(), "weights": [1, 2]}))
    with pytest.raises(ConfigError, match=r"heads\.pair.*weights must be a list"):
        parse_policy(_policy("heads:\n  pair: {file: bad.json}"), base_dir=tmp_path)


def test_a_head_without_an_embedding_does_not_match():
    policy = parse_policy(_policy(f"heads:\n  pair: {json.dumps(_head(bias=5.0).to_json())}"))
    signals = Signals((), {}, TokenCounter())
    signals.classified(Topic("math", {"math": 1.0}, 0.9, None), None)
    assert policy.decisions[0].when.evaluate(signals) is False


def test_fit_refuses_too_few_labelled_prompts_and_unreadable_data(tmp_path, capsys):
    from extproc.evaluation.fit import main as fit_main

    data = tmp_path / "few.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "quality": {"a": 1, "b": 0}}) + "\n" for i in range(5)))
    assert fit_main(["--data", str(data), "--weak", "a", "--strong", "b"]) == 2
    assert "need at least 20" in capsys.readouterr().err
    assert fit_main(["--data", str(data), "--weak", "a", "--strong", "c"]) == 2  # no prompt scores 'c'
    assert fit_main(["--data", str(tmp_path / "missing.jsonl"), "--weak", "a", "--strong", "b"]) == 2
    assert "cannot read" in capsys.readouterr().err
