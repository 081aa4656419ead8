"""The generated tasks (synth_gsm8k, synth_mc): deterministic from the seed, held out from the
training items, answers verified by an independent solver, and loadable by lm-eval through the
task definitions in evals/synth/ in the offline data_dir layout."""

from __future__ import annotations

import re

import pytest

from monte_ds.errors import UserError
from monte_ds.evaluation.calibration import gold_index
from monte_ds.evaluation.generated import GSM8K_TASK, MC_TASK, TASKS, generate, prompt_completion, write_tasks
from monte_ds.evaluation.tasks import load_tasks, task_configs, task_manager


# The five templates, solved from the question text alone.
SOLVERS = [
    (r"has (\d+) \w+\. \w+ buys (\d+) more \w+ and then gives (\d+) ", lambda a, b, c: a + b - c),
    (r"has (\d+) \w+\. \w+ buys (\d+) more \w+\. How many", lambda a, b: a + b),
    (r"has (\d+) \w+\. \w+ gives (\d+) \w+ to \w+\. How many", lambda a, b: a - b),
    (r"has (\d+) boxes\. Each box holds (\d+) ", lambda a, b: a * b),
    (r"has (\d+) \w+\. \w+ shares them equally among (\d+) friends", lambda total, friends: total // friends),
]


def solve(question: str) -> int:
    for pattern, solution in SOLVERS:
        if match := re.search(pattern, question):
            return solution(*map(int, match.groups()))
    raise AssertionError(f"no template matches {question!r}")


@pytest.fixture(scope="module")
def rows():
    return generate(seed=0, n_train=500, n_test=200)


def test_the_sets_are_a_deterministic_function_of_the_seed(tmp_path, rows):
    first = [path.read_bytes() for path in write_tasks(tmp_path / "a", seed=0)]
    again = [path.read_bytes() for path in write_tasks(tmp_path / "b", seed=0)]
    assert first == again
    assert generate(seed=1)[GSM8K_TASK]["test"] != rows[GSM8K_TASK]["test"]
    # Pinned: a change to the generator that changes the data must be deliberate (studies cite seed 0).
    assert rows[GSM8K_TASK]["test"][0] == {
        "question": "Emma has 13 pencils. She buys 2 more pencils. How many pencils does Emma have now?",
        "answer": "Emma has 13 + 2 = 15 pencils now.\n#### 15",
    }
    assert rows[MC_TASK]["test"][0] == {
        "question": "Nora has 4 balloons. She buys 37 more balloons. How many balloons does Nora have now?",
        "choices": ["40", "33", "42", "41"],
        "label": 3,
    }


def test_test_items_are_held_out_from_every_training_split(rows):
    test_questions = {row["question"] for task in TASKS for row in rows[task]["test"]}
    for task in TASKS:
        for split in ("train", "test"):
            questions = [row["question"] for row in rows[task][split]]
            assert len(questions) == len(set(questions)) == (500 if split == "train" else 200)
        assert not test_questions & {row["question"] for row in rows[task]["train"]}


def test_every_answer_is_verified_by_an_independent_solver(rows):
    for split in ("train", "test"):
        for row in rows[GSM8K_TASK][split]:
            *reasoning, final = row["answer"].splitlines()
            for a, op, b, result in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", "\n".join(reasoning)):
                assert eval(f"{a} {op} {b}") == int(result), row  # noqa: S307 (digits and one operator)
            assert final == f"#### {solve(row['question'])}"
        for row in rows[MC_TASK][split]:
            numbers = [int(choice) for choice in row["choices"]]
            assert len(set(numbers)) == 4 and min(numbers) > 0
            assert numbers[row["label"]] == solve(row["question"])
    labels = [row["label"] for row in rows[MC_TASK]["test"]]
    assert all(labels.count(letter) >= 30 for letter in range(4))  # the gold letter is not always the same


def test_lm_eval_loads_both_tasks_offline_and_formats_training_examples(tmp_path, rows):
    write_tasks(tmp_path, seed=0, n_train=20, n_test=10)
    manager = task_manager()
    tasks = load_tasks(manager, task_configs(manager, list(TASKS), str(tmp_path), None, 1), None)
    gsm8k, mc = tasks[GSM8K_TASK], tasks[MC_TASK]
    assert len(gsm8k.eval_docs) == len(mc.eval_docs) == 10
    assert [f["name"] for f in gsm8k.config.filter_list] == ["strict-match", "flexible-extract"]
    strict = gsm8k.config.filter_list[0]["filter"][0]["regex_pattern"]
    doc = gsm8k.eval_docs[0]
    assert re.search(strict, doc["answer"]).group(1) == str(solve(doc["question"]))  # strict-match finds the gold
    assert prompt_completion(gsm8k, doc) == {
        "prompt": f"Question: {doc['question']}\nAnswer:",
        "completion": f" {doc['answer']}",
    }
    doc = mc.eval_docs[0]
    assert mc.doc_to_choice(doc) == ["A", "B", "C", "D"] and gold_index(mc, doc) == doc["label"]
    assert mc.doc_to_text(doc).endswith(f"D. {doc['choices'][3]}\nAnswer:")
    assert prompt_completion(mc, doc)["completion"] == " " + "ABCD"[doc["label"]]


def test_a_generated_task_without_data_dir_is_a_user_error():
    manager = task_manager()
    with pytest.raises(UserError, match="^data_dir: synth_mc is a generated task with no hub dataset"):
        task_configs(manager, ["synth_mc"], None, None, 1)
