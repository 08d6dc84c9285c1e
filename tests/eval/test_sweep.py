"""Running the real router offline over labelled prompts, and sweeping a knob."""

from __future__ import annotations

import asyncio
import json

import pytest

from extproc.evaluation import EvalError, Options, evaluate
from extproc.evaluation.data import parse_lines
from tests.eval.conftest import COMPLEXITY_POLICY, RULE_POLICY, StandInClassifier, long_short_rows


def _examples(rows):
    return parse_lines(json.dumps(r) for r in rows)


def _run(policy, rows, options=None, classifier=None):
    return asyncio.run(evaluate(policy, _examples(rows), options or Options(), classifier=classifier))


def test_rule_only_sweep_matches_the_hand_computed_figures():
    options = Options(knob="decisions[long].when.tokens.min", values=[1, 100, 10_000])
    s = _run(RULE_POLICY, long_short_rows(), options)
    # costs per prompt: weak 100 tokens x $1/M = $0.0001, strong $0.001
    assert s["models"]["weak"] == {
        "data_key": "weak",
        "pricing": {"input_per_million": 1, "output_per_million": 1},
        "quality": 0.5,
        "cost_per_1k": 0.1,
    }
    assert s["models"]["strong"]["cost_per_1k"] == pytest.approx(1.0)
    op = s["operating_point"]  # min 50 tokens: the five long prompts go to the strong model
    assert (op["value"], op["quality"], op["strong_share"], op["decisions"]) == (
        50,
        0.7,
        0.5,
        {"default": 5, "long": 5},
    )
    assert op["cost_per_1k"] == pytest.approx(0.55)
    assert [p["value"] for p in s["sweep"]["points"]] == [1, 100, 10_000]
    assert [p["strong_share"] for p in s["sweep"]["points"]] == [1.0, 0.5, 0.0]
    m = s["metrics"]
    # PGR over the strong share: (0, 0), (.5, .4), (1, 1) -> .5 * .4 / 2 + .5 * 1.4 / 2
    assert m["axis"] == "strong_call_share"
    assert m["apgr"] == pytest.approx(0.45)
    assert m["cpt50"] == pytest.approx(0.5 + 0.5 * 0.1 / 0.6, abs=1e-6)
    assert m["cpt80"] == pytest.approx(0.5 + 0.5 * 0.4 / 0.6, abs=1e-6)
    # 95% of strong = .95, reached between (.55, .7) and (1.0, 1.0) at cost .925 per 1k
    saving = m["saving_at_95pct_strong"]
    assert saving["cost_per_1k"] == pytest.approx(0.925)
    assert saving["saving"] == pytest.approx(0.075)
    assert saving["setting"]["value"] == 1  # only always-strong reaches it on its own


def test_oracle_and_random_baselines():
    s = _run(RULE_POLICY, long_short_rows(), Options(knob="decisions[long].when.tokens.min", values=[1, 10_000]))
    oracle = s["baselines"]["oracle"]
    # the weak model is right on 5 prompts (cost .1 per 1k), the strong one is needed on the other 5 (1.0)
    assert oracle["quality"] == 1.0
    assert oracle["cost_per_1k"] == pytest.approx(0.55)
    assert oracle["apgr"]["strong_call_share"] == pytest.approx(0.75)
    assert s["baselines"]["random"]["apgr"] == 0.5
    assert s["operating_point"]["random_quality_at_same_cost"] == pytest.approx(0.75)


def test_sweeping_never_classifies_a_prompt_twice():
    rows = [
        {"prompt": f"problem {i} c={i / 20:.2f} zanzibar", "quality": {"org/weak-v1": int(i < 10), "org/strong-v1": 1}}
        for i in range(20)
    ]
    encoder = StandInClassifier()
    s = _run(COMPLEXITY_POLICY, rows, Options(points=41), classifier=encoder)
    assert sorted(encoder.calls) == sorted(r["prompt"] for r in rows)
    assert s["classifier"]["texts_classified"] == 20
    assert s["sweep"]["knob"] == "decisions[hard].when.all[1].complexity.above"
    # thresholds from the prompts' complexity, with both ends: everything strong ... nothing
    points = s["sweep"]["points"]
    assert points[0]["value"] == 0.0 and points[-1]["value"] == 1.0
    assert points[-1]["strong_share"] == 0.0
    assert points[0]["strong_share"] == 0.95  # c = 0.00 is not above 0.0
    # the upstream_model names are the data's keys
    assert s["models"]["weak"]["data_key"] == "org/weak-v1"


def test_complexity_threshold_routes_the_prompts_above_it():
    rows = [
        {"prompt": f"q{i} c={c} zanzibar", "quality": {"weak": w, "strong": 1}}
        for i, (c, w) in enumerate([(0.9, 0), (0.7, 0), (0.3, 1), (0.1, 1)])
    ]
    s = _run(COMPLEXITY_POLICY, rows, Options(values=[0.5]), classifier=StandInClassifier())
    assert s["operating_point"]["quality"] == 1.0
    assert s["operating_point"]["decisions"] == {"default": 2, "hard": 2}
    assert s["metrics"]["apgr"] == pytest.approx(0.75)  # the oracle's own curve here


def test_keyword_decisions_route_before_the_classifier_is_asked():
    rows = [
        {"prompt": "traceback zanzibar", "quality": {"weak": 0, "strong": 1}},
        {"prompt": "c=0.1 zanzibar", "quality": {"weak": 1, "strong": 1}},
    ]
    encoder = StandInClassifier()
    s = _run(COMPLEXITY_POLICY, rows, Options(values=[0.5]), classifier=encoder)
    assert encoder.calls == ["c=0.1 zanzibar"]
    assert s["operating_point"]["decisions"] == {"code": 1, "default": 1}


def test_pii_blocked_prompts_score_zero_and_cost_nothing():
    policy = COMPLEXITY_POLICY + "pii: {action: block, types: [US_SSN]}\n"
    rows = [
        {"prompt": "SSN c=0.9 zanzibar", "quality": {"weak": 1, "strong": 1}, "tokens": {"input": 10, "output": 0}},
        {"prompt": "plain c=0.1 zanzibar", "quality": {"weak": 1, "strong": 1}, "tokens": {"input": 10, "output": 0}},
    ]
    s = _run(
        policy,
        rows,
        Options(values=[0.5], weak="weak", strong="strong"),
        classifier=StandInClassifier({"SSN": "US_SSN"}),
    )
    op = s["operating_point"]
    assert op["decisions"] == {"default": 1, "rejected:pii_blocked": 1}
    assert op["shares"] == {"rejected": 0.5, "weak": 0.5}
    assert op["quality"] == 0.5
    assert op["cost_per_1k"] == pytest.approx(0.005)  # only the allowed prompt is paid for
    assert "strong_call_share" not in s["metrics"]["by_axis"]  # not a two-model mix any more


def test_a_failing_classifier_stops_the_evaluation():
    class Broken:
        async def classify(self, text, *args):
            raise RuntimeError("boom")

    rows = [{"prompt": "c=0.9 zanzibar", "quality": {"weak": 0, "strong": 1}}]
    with pytest.raises(EvalError, match="line 1: the classifier failed"):
        _run(COMPLEXITY_POLICY, rows, classifier=Broken())


def test_a_policy_needing_a_classifier_that_cannot_load_stops_the_evaluation(monkeypatch):
    from extproc.classifier import Classifier, ModelError

    def missing(*args, **kwargs):
        raise ModelError("no model here")

    monkeypatch.setattr(Classifier, "load", missing)
    rows = [{"prompt": "c=0.9 zanzibar", "quality": {"weak": 0, "strong": 1}}]
    with pytest.raises(EvalError, match="classifier did not load"):
        _run(COMPLEXITY_POLICY, rows)


def test_a_chosen_model_without_labels_is_an_error_not_a_silent_zero():
    rows = [{"prompt": f"{w} zanzibar", "quality": {"weak": 1}} for w in ("short", " ".join(["long"] * 300))]
    with pytest.raises(EvalError, match="'strong'"):
        _run(RULE_POLICY, rows, Options(knob="decisions[long].when.tokens.min", values=[50]))


def test_calibration_picks_the_cheapest_value_reaching_the_target():
    options = Options(knob="decisions[long].when.tokens.min", values=[1, 50, 100, 10_000], target_quality="0.7")
    cal = _run(RULE_POLICY, long_short_rows(), options)["calibration"]
    assert (cal["value"], cal["quality"]) == (50, 0.7)  # 50 and 100 route alike; the first wins
    relative = Options(knob="decisions[long].when.tokens.min", values=[1, 10_000], target_quality="95%")
    assert _run(RULE_POLICY, long_short_rows(), relative)["calibration"]["value"] == 1


def test_each_prompt_is_classified_alone_through_the_batcher():
    # The int8 encoder's scores for a text shift with its batch-mates; the eval must not depend
    # on the order of the file.
    from extproc.classifier import AsyncClassifier

    class Encoder:
        def __init__(self):
            self.batches = []
            self.inner = StandInClassifier()

        def classify(self, texts, **kwargs):
            self.batches.append(len(texts))
            return [asyncio.run(self.inner.classify(t)) for t in texts]

    encoder = Encoder()
    rows = [{"prompt": f"q{i} c=0.{i} zanzibar", "quality": {"weak": 0, "strong": 1}} for i in range(1, 9)]
    _run(COMPLEXITY_POLICY, rows, Options(points=5), classifier=AsyncClassifier(encoder, max_batch=16, max_wait_ms=5))
    assert encoder.batches == [1] * 8
