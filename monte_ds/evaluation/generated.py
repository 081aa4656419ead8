"""Generated evaluation tasks, for studies that need held-out items no offline machine can download.

Two tasks over the same small world of people buying, giving, packing and sharing things, with
answers that can be verified by arithmetic:

- `synth_gsm8k`: GSM8k-format word problems, {"question", "answer"}: the answer reasons in one or
  two steps ("Mia has 12 + 7 = 19 apples now.") and ends in GSM8k's `#### n` line, so the
  `gsm8k` task's strict-match and flexible-extract scoring applies unchanged.
- `synth_mc`: the same kind of problem with four candidate answers, {"question", "choices",
  "label"}: the gold number and three plausible mistakes (off by one, the wrong operation, an
  operand), in a seeded random order. Its prompt lists them as A-D and the model answers with a
  letter, so the choice probabilities are the softmax over the letters' next-token scores, the
  scoring of Bayesian-LoRA papers (Laplace-LoRA, BLoB).

Everything is a deterministic function of the seed. Each split holds distinct questions, and no
test question of either task appears in either task's training split: the test items are held out
from any fine-tuning on the training items. The task definitions are `evals/synth/`; they read
these files offline only (`data_dir`), as written by `write_tasks`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lm_eval.api.task import Task

from monte_ds.atomic import atomic_write_text
from monte_ds.evaluation.calibration import gold_index


GSM8K_TASK = "synth_gsm8k"
MC_TASK = "synth_mc"
TASKS = (GSM8K_TASK, MC_TASK)
SPLITS = ("train", "test")
N_CHOICES = 4

NAMES = [
    ("Mia", "she"),
    ("Leo", "he"),
    ("Ava", "she"),
    ("Sam", "he"),
    ("Zoe", "she"),
    ("Max", "he"),
    ("Lily", "she"),
    ("Ben", "he"),
    ("Emma", "she"),
    ("Noah", "he"),
    ("Ella", "she"),
    ("Jack", "he"),
    ("Ruby", "she"),
    ("Owen", "he"),
    ("Nora", "she"),
    ("Liam", "he"),
]
THINGS = [
    "apples",
    "pencils",
    "marbles",
    "stickers",
    "books",
    "cookies",
    "coins",
    "shells",
    "cards",
    "balloons",
    "eggs",
    "stamps",
    "oranges",
    "crayons",
    "buttons",
    "candles",
]
MAX_ADD = 50  # operands of + and -
MAX_MUL = 12  # operands of * and the quotients of /

# A problem: its question, its reasoning lines (each "... a op b = c ..."), the answer and the
# mistakes a solver plausibly makes (the multiple-choice distractors).
Problem = tuple[str, list[str], int, list[int]]


def _people(rng: random.Random) -> tuple[str, str, str]:
    (name, pronoun), (other, _) = rng.sample(NAMES, 2)
    return name, pronoun, other


def add_problem(rng: random.Random) -> Problem:
    name, pronoun, _ = _people(rng)
    thing, a, b = rng.choice(THINGS), rng.randint(2, MAX_ADD), rng.randint(2, MAX_ADD)
    question = (
        f"{name} has {a} {thing}. {pronoun.capitalize()} buys {b} more {thing}. How many {thing} does {name} have now?"
    )
    return (
        question,
        [f"{name} has {a} + {b} = {a + b} {thing} now."],
        a + b,
        [a + b - 1, a + b + 1, abs(a - b), a + b + 10],
    )


def subtract_problem(rng: random.Random) -> Problem:
    name, pronoun, other = _people(rng)
    thing, a = rng.choice(THINGS), rng.randint(3, MAX_ADD)
    b = rng.randint(1, a - 2)
    question = f"{name} has {a} {thing}. {pronoun.capitalize()} gives {b} {thing} to {other}. How many {thing} does {name} have left?"
    return question, [f"{name} has {a} - {b} = {a - b} {thing} left."], a - b, [a - b - 1, a - b + 1, a + b, b]


def multiply_problem(rng: random.Random) -> Problem:
    name, _, _ = _people(rng)
    thing, a, b = rng.choice(THINGS), rng.randint(2, MAX_MUL), rng.randint(2, MAX_MUL)
    question = f"{name} has {a} boxes. Each box holds {b} {thing}. How many {thing} does {name} have in total?"
    return (
        question,
        [f"{name} has {a} * {b} = {a * b} {thing} in total."],
        a * b,
        [a * b - a, a * b + b, a + b, a * b + 1],
    )


def divide_problem(rng: random.Random) -> Problem:
    name, pronoun, _ = _people(rng)
    thing, friends, each = rng.choice(THINGS), rng.randint(2, MAX_MUL), rng.randint(2, MAX_MUL)
    total = friends * each
    question = (
        f"{name} has {total} {thing}. {pronoun.capitalize()} shares them equally among {friends} friends. "
        f"How many {thing} does each friend get?"
    )
    reasoning = [f"Each friend gets {total} / {friends} = {each} {thing}."]
    return question, reasoning, each, [each + 1, each - 1, total - friends, friends]


def two_step_problem(rng: random.Random) -> Problem:
    name, pronoun, other = _people(rng)
    thing, a, b = rng.choice(THINGS), rng.randint(2, MAX_ADD), rng.randint(2, MAX_ADD)
    c = rng.randint(1, a + b - 2)
    total, left = a + b, a + b - c
    question = (
        f"{name} has {a} {thing}. {pronoun.capitalize()} buys {b} more {thing} and then gives {c} {thing} "
        f"to {other}. How many {thing} does {name} have now?"
    )
    reasoning = [
        f"After buying, {name} has {a} + {b} = {total} {thing}.",
        f"After giving, {name} has {total} - {c} = {left} {thing}.",
    ]
    return question, reasoning, left, [total, a + c - b if a + c > b else left + 2, left + 1, left - 1]


KINDS: tuple[Callable[[random.Random], Problem], ...] = (
    add_problem,
    subtract_problem,
    multiply_problem,
    divide_problem,
    two_step_problem,
)


def gsm8k_row(problem: Problem) -> dict[str, Any]:
    question, reasoning, answer, _ = problem
    return {"question": question, "answer": "\n".join([*reasoning, f"#### {answer}"])}


def mc_row(problem: Problem, rng: random.Random) -> dict[str, Any]:
    """Four distinct positive candidates: the answer and the first distinct plausible mistakes
    (padded with nearby numbers), shuffled."""
    question, _, answer, mistakes = problem
    candidates = [answer]
    for number in [*mistakes, answer + 2, answer + 3, answer + 4]:
        if number > 0 and number not in candidates and len(candidates) < N_CHOICES:
            candidates.append(number)
    rng.shuffle(candidates)
    return {"question": question, "choices": [str(number) for number in candidates], "label": candidates.index(answer)}


def _problems(rng: random.Random, count: int, excluded: set[str]) -> list[Problem]:
    """`count` problems of every kind in turn, no question twice and none of `excluded`."""
    problems: list[Problem] = []
    seen = set(excluded)
    while len(problems) < count:
        problem = KINDS[len(problems) % len(KINDS)](rng)
        if problem[0] not in seen:
            seen.add(problem[0])
            problems.append(problem)
    return problems


def generate(seed: int = 0, n_train: int = 500, n_test: int = 200) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """task -> split -> rows. The test splits are drawn first and excluded from both training splits."""
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {task: {} for task in TASKS}
    held_out: set[str] = set()
    for split, count in (("test", n_test), ("train", n_train)):
        for task in TASKS:
            rng = random.Random(f"monte-ds/{task}/{split}/{seed}")  # a str seed hashes identically everywhere
            problems = _problems(rng, count, held_out if split == "train" else set())
            rows[task][split] = [gsm8k_row(p) if task == GSM8K_TASK else mc_row(p, rng) for p in problems]
        if split == "test":
            held_out = {row["question"] for task in TASKS for row in rows[task]["test"]}
    return rows


def write_tasks(out_dir: str | Path, seed: int = 0, n_train: int = 500, n_test: int = 200) -> list[Path]:
    """`<out_dir>/<task>/{train,test}.jsonl` (the offline `data_dir` layout); the paths written."""
    paths = []
    for task, splits in generate(seed, n_train, n_test).items():
        for split, rows in splits.items():
            path = Path(out_dir) / task / f"{split}.jsonl"
            atomic_write_text(path, jsonl(rows))
            paths.append(path)
    return paths


def jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def prompt_completion(task: Task, doc: dict[str, Any]) -> dict[str, str]:
    """A training example in the task's own prompt format: the prompt lm-eval shows the model,
    and the gold answer after the task's target delimiter (a multiple-choice task's gold choice)."""
    if task.OUTPUT_TYPE == "multiple_choice":
        target = task.doc_to_choice(doc)[gold_index(task, doc)]
    else:
        target = task.doc_to_target(doc)
    return {"prompt": task.doc_to_text(doc), "completion": f"{task.config.target_delimiter}{target}"}
