"""Calibration math against hand-computed cases, and gold indices from real lm-eval tasks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monte_ds.evaluation.calibration import (
    ChoiceScores,
    average_draws,
    calibration,
    choice_scores,
    gold_index,
    reliability_bins,
)
from monte_ds.evaluation.tasks import BUNDLED_SAMPLE_DIR, load_tasks, task_configs, task_manager


FIXTURES = BUNDLED_SAMPLE_DIR


def scores(probabilities: list[list[float]], gold: list[int]) -> ChoiceScores:
    return ChoiceScores(list(range(len(gold))), [np.array(p) for p in probabilities], gold)


def test_nll_ece_and_accuracy_match_a_hand_computed_case():
    # confidences .7 (right), .6 (wrong), .5 (right), .95 (right): one document per bin.
    cal = calibration(scores([[0.7, 0.2, 0.1], [0.6, 0.4], [0.25, 0.25, 0.5], [0.95, 0.05]], [0, 1, 2, 0]))
    assert cal["n"] == 4
    assert cal["acc"] == pytest.approx(3 / 4)
    assert cal["nll"] == pytest.approx((-math.log(0.7) - math.log(0.4) - math.log(0.5) - math.log(0.95)) / 4)
    assert cal["ece"] == pytest.approx((abs(1 - 0.7) + abs(0 - 0.6) + abs(1 - 0.5) + abs(1 - 0.95)) / 4)
    nll = np.array([-math.log(p) for p in (0.7, 0.4, 0.5, 0.95)])
    assert cal["nll_stderr"] == pytest.approx(nll.std(ddof=1) / 2)
    assert [b["count"] for b in cal["bins"]] == [0, 0, 0, 0, 1, 1, 1, 0, 0, 1]


def test_ece_weighs_each_bin_by_its_share_of_documents():
    # Bin (0.8, 0.9]: confidences .85, .85, .85, accuracy 2/3; bin (0.5, 0.6]: .55, accuracy 0.
    cal = calibration(scores([[0.85, 0.15], [0.85, 0.15], [0.15, 0.85], [0.55, 0.45]], [0, 0, 0, 1]))
    assert cal["ece"] == pytest.approx(3 / 4 * abs(2 / 3 - 0.85) + 1 / 4 * abs(0 - 0.55))
    occupied = {(b["lower"], b["upper"]): b for b in cal["bins"] if b["count"]}
    assert set(occupied) == {(0.8, 0.9), (0.5, 0.6)}
    assert occupied[(0.8, 0.9)]["accuracy"] == pytest.approx(2 / 3)
    assert occupied[(0.8, 0.9)]["confidence"] == pytest.approx(0.85)


def test_bins_are_right_closed_and_cover_zero_and_one():
    bins = reliability_bins(np.array([0.0, 0.1, 0.1001, 1.0]), np.array([0.0, 1.0, 1.0, 1.0]), n_bins=10)
    assert [b["count"] for b in bins] == [2, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert bins[0]["accuracy"] == pytest.approx(0.5)


def test_posterior_predictive_averages_choice_probabilities_over_draws():
    first = scores([[0.9, 0.1], [0.2, 0.8]], [1, 1])
    second = scores([[0.3, 0.7], [0.4, 0.6]], [1, 1])
    averaged = average_draws([first, second])
    np.testing.assert_allclose(averaged.probabilities[0], [0.6, 0.4])
    np.testing.assert_allclose(averaged.probabilities[1], [0.3, 0.7])
    # Averaging probabilities (not log-probabilities): the gold NLL of the mixture.
    assert calibration(averaged)["nll"] == pytest.approx((-math.log(0.4) - math.log(0.7)) / 2)
    with pytest.raises(ValueError, match="different documents"):
        average_draws([first, scores([[0.5, 0.5]], [1])])


@pytest.fixture(scope="module")
def fixture_tasks():
    manager = task_manager()
    names = ["arc_easy", "winogrande", "hellaswag", "social_iqa"]
    return load_tasks(manager, task_configs(manager, names, str(FIXTURES), None, 1), None)


def test_gold_indices_follow_lm_eval_scoring_for_each_format(fixture_tasks):
    # arc: answerKey among letter or digit labels; winogrande: partial scoring (gold picks the
    # context); hellaswag: string label after process_docs; social_iqa: 1-based string label.
    expected = {"arc_easy": [0, 1, 3], "winogrande": [0, 1, 1], "hellaswag": [3, 3, 0], "social_iqa": [2, 0, 2]}
    for name, golds in expected.items():
        task = fixture_tasks[name]
        assert [gold_index(task, doc) for doc in task.eval_docs] == golds, name


def test_choice_probabilities_are_the_softmax_of_the_choice_log_likelihoods(fixture_tasks):
    task = fixture_tasks["arc_easy"]
    docs = list(task.eval_docs)
    samples = [  # the shape lm-eval logs with log_samples=True, out of doc order
        {"doc_id": 1, "doc": docs[1], "filtered_resps": [(-3.0, False), (-1.0, True), (-3.0, False), (-3.0, False)]},
        {"doc_id": 0, "doc": docs[0], "filtered_resps": [(-1.0, True), (-2.0, False), (-9.0, False), (-9.0, False)]},
    ]
    result = choice_scores(task, samples)
    assert result.doc_ids == [0, 1] and result.gold == [0, 1]
    e = math.exp
    np.testing.assert_allclose(result.probabilities[1], np.array([e(-2), 1, e(-2), e(-2)]) / (1 + 3 * e(-2)))
    assert result.probabilities[0].sum() == pytest.approx(1.0)
    assert calibration(result)["acc"] == 1.0
