"""The RouteLLM metrics and the oracle curves, against values worked out by hand."""

from __future__ import annotations

import pytest

from extproc.evaluation import curves


def test_apgr_is_the_area_under_pgr_between_the_anchors():
    # weak 0.4, strong 0.8; PGR at x = 0, .25, .5, 1 is 0, .5, .75, 1:
    # .25 * (0 + .5) / 2 + .25 * (.5 + .75) / 2 + .5 * (.75 + 1) / 2 = .0625 + .15625 + .4375
    assert curves.apgr([(0.25, 0.6), (0.5, 0.7)], 0.4, 0.8) == pytest.approx(0.65625)


def test_random_routing_scores_one_half():
    line = [(x / 10, 0.4 + 0.04 * x) for x in range(11)]
    assert curves.apgr(line, 0.4, 0.8) == pytest.approx(0.5)
    assert curves.apgr([(0.3, 0.52)], 0.4, 0.8) == pytest.approx(0.5)


def test_cpt_is_the_least_share_reaching_the_pgr_level():
    curve = [(0.25, 0.6), (0.5, 0.7)]
    assert curves.cpt(curve, 0.4, 0.8, 0.5) == pytest.approx(0.25)
    # PGR .8 between (.5, .75) and (1, 1): .5 + .5 * (.05 / .25)
    assert curves.cpt(curve, 0.4, 0.8, 0.8) == pytest.approx(0.6)


def test_cpt_takes_the_first_crossing_of_a_curve_that_dips():
    curve = [(0.2, 0.8), (0.4, 0.5), (0.6, 0.8)]
    assert curves.cpt(curve, 0.4, 0.8, 1.0) == pytest.approx(0.2)


def test_pgr_above_one_is_not_capped():
    # the mix beats the strong model: PGR 1.5 at x = .5
    assert curves.apgr([(0.5, 1.0)], 0.4, 0.8) == pytest.approx(0.5 * 1.5 / 2 + 0.5 * (1.5 + 1) / 2)


def test_points_beyond_the_ends_are_clipped_to_zero_and_one():
    # cost axis: a setting cheaper than the weak model and one dearer than the strong one
    clipped = curves.anchored([(-0.5, 0.3), (1.5, 0.9)], 0.4, 0.8)
    assert clipped[0] == (0.0, pytest.approx(0.45))
    assert clipped[-1] == (1.0, pytest.approx(0.75))


def test_share_oracle_spends_strong_calls_on_gains_only():
    weak = [1, 0, 0, 0]
    strong = [1, 1, 1, 0]
    assert curves.share_oracle(weak, strong) == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (1.0, 0.75)]
    # PGR 0, .5, 1, 1: .25 * .25 + .25 * .75 + .5 * 1
    assert curves.apgr(curves.share_oracle(weak, strong), 0.25, 0.75) == pytest.approx(0.75)


def test_cost_oracle_climbs_the_steepest_upgrades_first_and_ends_at_the_cheapest_correct_model():
    # models A (cost 1), B (cost 3), C (cost 2)
    costs = [[1, 3, 2], [1, 3, 2]]
    scores = [[0, 1, 1], [0, 1, 0]]  # prompt 1: C is the cheapest correct; prompt 2: only B
    assert curves.cost_oracle(costs, scores) == [(1.0, 0.0), (1.5, 0.5), (2.5, 1.0)]


def test_cost_oracle_skips_options_that_are_dearer_and_no_better():
    assert curves.cost_oracle([[1, 2, 3]], [[0.5, 0.5, 0.4]]) == [(1.0, 0.5)]
