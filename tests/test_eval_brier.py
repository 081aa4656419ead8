"""The Brier score of multiple-choice answers beside NLL and ECE: hand-computed cases, its range,
and the property that makes posterior-predictive averaging worth it (the score is convex)."""

from __future__ import annotations

import numpy as np
import pytest

from monte_ds.evaluation.calibration import ChoiceScores, average_draws, calibration


def scores(probabilities: list[list[float]], gold: list[int]) -> ChoiceScores:
    return ChoiceScores(list(range(len(gold))), [np.array(p) for p in probabilities], gold)


def test_brier_matches_a_hand_computed_case():
    # (0.3^2 + 0.2^2 + 0.1^2) = 0.14 with the gold first; (0.6^2 + 0.6^2) = 0.72 with the gold second.
    cal = calibration(scores([[0.7, 0.2, 0.1], [0.6, 0.4]], [0, 1]))
    assert cal["brier"] == pytest.approx((0.14 + 0.72) / 2)
    assert cal["brier_stderr"] == pytest.approx(np.std([0.14, 0.72], ddof=1) / np.sqrt(2))


@pytest.mark.parametrize(
    ("probabilities", "gold", "brier"),
    [
        ([1.0, 0.0, 0.0, 0.0], 0, 0.0),  # certain and right: perfect
        ([0.0, 1.0], 0, 2.0),  # certain and wrong: the worst
        ([0.25, 0.25, 0.25, 0.25], 2, 0.75),  # a uniform guess over k choices: 1 - 1/k
    ],
)
def test_brier_range(probabilities, gold, brier):
    assert calibration(scores([probabilities], [gold]))["brier"] == pytest.approx(brier)
    assert calibration(scores([probabilities], [gold]))["brier_stderr"] is None  # one document


def test_the_posterior_predictive_average_scores_no_worse_than_its_draws_on_average():
    rng = np.random.default_rng(0)
    gold = list(rng.integers(0, 4, 50))
    draws = [scores([list(p) for p in rng.dirichlet(np.ones(4), 50)], gold) for _ in range(10)]
    averaged = calibration(average_draws(draws))["brier"]
    per_draw = [calibration(draw)["brier"] for draw in draws]
    assert averaged < np.mean(per_draw)  # convexity (Jensen): strict for draws that disagree
