"""Suites, the task definitions in evals/ (shipped as monte_ds/evals/), and the offline data layout
<data_dir>/<task>/<split>.jsonl, with the bundled sample as one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import monte_ds
import monte_ds.evals
from monte_ds.errors import UserError
from monte_ds.evaluation import EvalOptions, plan_evaluation, validate_options
from monte_ds.evaluation.tasks import (
    BUNDLED_SAMPLE,
    BUNDLED_SAMPLE_DIR,
    EVALS_DIR,
    expand_suites,
    load_tasks,
    task_configs,
    task_manager,
)


FIXTURES = BUNDLED_SAMPLE_DIR
COMMONSENSE = ["arc_easy", "arc_challenge", "piqa", "social_iqa", "winogrande", "openbookqa", "boolq", "hellaswag"]


@pytest.fixture(scope="module")
def manager():
    return task_manager()


def test_suites_expand_to_their_tasks_in_order_once(manager):
    assert expand_suites(manager, ["commonsense"]) == {"commonsense": COMMONSENSE}
    assert expand_suites(manager, ["gsm8k", "piqa", "commonsense", "humaneval"]) == {
        "gsm8k": ["gsm8k"],
        "piqa": ["piqa"],
        "commonsense": [t for t in COMMONSENSE if t != "piqa"],
        "humaneval": ["humaneval"],
    }
    # A suite whose tasks all ran under an earlier name is dropped, not run empty.
    assert expand_suites(manager, ["commonsense", "boolq"]) == {"commonsense": COMMONSENSE}


def test_unknown_or_empty_suites_are_user_errors(manager):
    with pytest.raises(UserError, match=r"^suites: unknown suite or task 'arc' \(known: .*arc_easy"):
        expand_suites(manager, ["gsm8k", "arc"])
    with pytest.raises(UserError, match="^suites: name at least one"):
        expand_suites(manager, [])


def missing_files(message: str) -> dict[str, list[str]]:
    """Parse `data_dir: missing data files (...) -- task: a, b; task2: c` back into a dict."""
    listing = message.split(" -- ", 1)[1]
    return {task: files.split(", ") for task, files in (item.split(": ", 1) for item in listing.split("; "))}


def test_missing_data_is_one_error_listing_exactly_the_missing_files_per_task(tmp_path):
    for present in ("arc_easy/test.jsonl", "gsm8k/test.jsonl", "hellaswag/validation.jsonl"):
        (tmp_path / present).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(FIXTURES / present, tmp_path / present)
    with pytest.raises(UserError) as raised:
        validate_options({"suites": ["gsm8k", "commonsense"], "data_dir": str(tmp_path)})
    message = str(raised.value)
    assert message.startswith("data_dir: missing data files") and "\n" not in message
    assert missing_files(message) == {
        "gsm8k": [str(tmp_path / "gsm8k/train.jsonl")],  # 5-shot by default: its train split
        "arc_challenge": [str(tmp_path / "arc_challenge/test.jsonl")],
        "piqa": [str(tmp_path / "piqa/validation.jsonl")],
        "social_iqa": [str(tmp_path / "social_iqa/validation.jsonl")],
        "winogrande": [str(tmp_path / "winogrande/validation.jsonl")],
        "openbookqa": [str(tmp_path / "openbookqa/test.jsonl")],
        "boolq": [str(tmp_path / "boolq/validation.jsonl")],
    }


def test_the_files_needed_follow_the_number_of_shots(tmp_path, manager):
    (tmp_path / "arc_easy").mkdir()
    shutil.copy(FIXTURES / "arc_easy/test.jsonl", tmp_path / "arc_easy/test.jsonl")
    zero_shot = task_configs(manager, ["gsm8k"], str(FIXTURES), 0, 1)["gsm8k"]
    assert zero_shot["dataset_kwargs"]["data_files"] == {"test": str(FIXTURES / "gsm8k/test.jsonl")}
    assert zero_shot["training_split"] is None and zero_shot["fewshot_split"] is None
    assert validate_options({"suites": ["arc_easy"], "data_dir": str(tmp_path)}) == EvalOptions(
        suites=["arc_easy"], data_dir=str(tmp_path)
    )
    with pytest.raises(UserError) as raised:
        validate_options({"suites": ["arc_easy"], "data_dir": str(tmp_path), "num_fewshot": 2})
    assert missing_files(str(raised.value)) == {"arc_easy": [str(tmp_path / "arc_easy/train.jsonl")]}


def test_humaneval_needs_no_data_dir_and_the_opt_in():
    with pytest.raises(UserError, match="^allow_code_execution: humaneval runs model-generated code"):
        validate_options({"suites": ["humaneval"]})
    plan = plan_evaluation(
        {"suites": ["humaneval"], "allow_code_execution": True, "humaneval_samples": 2, "data_dir": "/nonexistent"}
    )
    task = plan.tasks["humaneval"]
    assert len(task.eval_docs) == 164
    assert task.config.repeats == 2 and task.config.metric_list[0]["k"] == [1, 2]


def test_every_fixture_loads_in_its_real_format(manager):
    tasks = load_tasks(manager, task_configs(manager, COMMONSENSE + ["gsm8k"], str(FIXTURES), None, 1), None)
    for name, task in tasks.items():
        docs = list(task.eval_docs)
        assert len(docs) == 3, name
        for doc in docs:
            assert task.doc_to_text(doc) is not None
            if task.OUTPUT_TYPE == "multiple_choice":
                assert len(task.doc_to_choice(doc)) >= 2
    assert len(tasks["gsm8k"].fewshot_docs()) == 5


def test_too_few_few_shot_examples_is_a_user_error(manager):
    configs = task_configs(manager, ["gsm8k"], str(FIXTURES), 6, 1)
    with pytest.raises(UserError, match="^num_fewshot: gsm8k uses 6 few-shot examples but its few-shot split has 5"):
        load_tasks(manager, configs, 6)


def test_the_bundled_sample_is_a_data_dir_for_every_offline_task():
    plan = plan_evaluation({"suites": ["commonsense", "gsm8k"], "data_dir": BUNDLED_SAMPLE})
    assert list(plan.tasks) == COMMONSENSE + ["gsm8k"]
    for name, task in plan.tasks.items():
        files = [Path(path) for path in task.config.dataset_kwargs["data_files"].values()]
        assert files and all(path.parent == BUNDLED_SAMPLE_DIR / name for path in files)
        assert len(task.eval_docs) == 3
    # Shipped inside the package (pyproject's package data), not read from the test tree; the task
    # definitions are the package monte_ds.evals, mapped from the top-level evals/ (inside the wheel
    # once installed: test_wheel_install.py).
    assert BUNDLED_SAMPLE_DIR.is_relative_to(Path(monte_ds.__file__).parent)
    assert EVALS_DIR == Path(monte_ds.evals.__file__).parent == Path(__file__).resolve().parents[1] / "evals"
