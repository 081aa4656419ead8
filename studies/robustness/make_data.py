"""Generate the robustness study's data: a pre-training corpus and a GSM8k-format word-problem task.

The corpus teaches the base model the "knowledge" (the arithmetic tables and the little world of
people buying, giving and packing things, told as prose); the task asks the same arithmetic as
GSM8k-style questions whose answers reason step by step and end in GSM8k's `#### c` line (without
GSM8k's `<<a+b=c>>` calculator annotations: their unspaced numbers are other tokens than the
ones the corpus taught the arithmetic with). Fine-tuning therefore has to learn the question/answer format and to recall the arithmetic
through it, and lm-eval's gsm8k exact match scores the result.

Outputs (under --out):
  pretrain.jsonl          {"text": ...} prose + arithmetic documents
  gsm8k/train.jsonl       {"question", "answer"}   (the fine-tuning set and lm-eval's few-shot pool)
  gsm8k/test.jsonl        {"question", "answer"}   (evaluation; no question also in train)
  finetune.jsonl          {"prompt", "completion"}: train.jsonl in lm-eval's gsm8k prompt format
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

from monte_ds.atomic import atomic_write_text
from monte_ds.evaluation.generated import NAMES, THINGS  # the same little world as the generated tasks


MAX_ADD = 20  # operands of + and -
MAX_MUL = 12  # operands of *


def _people(rng: random.Random) -> tuple[str, str, str]:
    (name, pronoun), (other, _) = rng.sample(NAMES, 2)
    return name, pronoun, other


def add_problem(rng: random.Random) -> tuple[str, str]:
    name, pronoun, _ = _people(rng)
    thing, a, b = rng.choice(THINGS), rng.randint(1, MAX_ADD), rng.randint(1, MAX_ADD)
    question = (
        f"{name} has {a} {thing}. {pronoun.capitalize()} buys {b} more {thing}. How many {thing} does {name} have now?"
    )
    answer = f"{name} has {a} + {b} = {a + b} {thing} now.\n#### {a + b}"
    return question, answer


def subtract_problem(rng: random.Random) -> tuple[str, str]:
    name, pronoun, other = _people(rng)
    thing, a = rng.choice(THINGS), rng.randint(2, MAX_ADD)
    b = rng.randint(1, a - 1)
    question = f"{name} has {a} {thing}. {pronoun.capitalize()} gives {b} {thing} to {other}. How many {thing} does {name} have left?"
    answer = f"{name} has {a} - {b} = {a - b} {thing} left.\n#### {a - b}"
    return question, answer


def multiply_problem(rng: random.Random) -> tuple[str, str]:
    name, _, _ = _people(rng)
    thing, a, b = rng.choice(THINGS), rng.randint(2, MAX_MUL), rng.randint(2, MAX_MUL)
    question = f"{name} has {a} boxes. Each box holds {b} {thing}. How many {thing} does {name} have in total?"
    answer = f"{name} has {a} * {b} = {a * b} {thing} in total.\n#### {a * b}"
    return question, answer


def two_step_problem(rng: random.Random) -> tuple[str, str]:
    name, pronoun, other = _people(rng)
    thing, a, b = rng.choice(THINGS), rng.randint(1, MAX_ADD), rng.randint(1, MAX_ADD)
    c = rng.randint(1, a + b - 1)
    d, e = a + b, a + b - c
    question = (
        f"{name} has {a} {thing}. {pronoun.capitalize()} buys {b} more {thing} and then gives {c} {thing} "
        f"to {other}. How many {thing} does {name} have now?"
    )
    answer = (
        f"After buying, {name} has {a} + {b} = {d} {thing}.\n"
        f"After giving, {name} has {d} - {c} = {e} {thing} now.\n#### {e}"
    )
    return question, answer


PROBLEMS: list[Callable[[random.Random], tuple[str, str]]] = [
    add_problem,
    subtract_problem,
    multiply_problem,
    two_step_problem,
]


def arithmetic_facts() -> list[str]:
    """Every fact the task can ask: the + and - tables up to the two-step sums, and the * table."""
    additions = [f"{a} + {b} = {a + b}." for a in range(MAX_ADD + 1) for b in range(MAX_ADD + 1)]
    subtractions = [f"{a} - {b} = {a - b}." for a in range(2 * MAX_ADD + 1) for b in range(a + 1)]
    products = [f"{a} * {b} = {a * b}." for a in range(MAX_MUL + 1) for b in range(MAX_MUL + 1)]
    return additions + subtractions + products


def story(rng: random.Random) -> str:
    """A prose paragraph of the task's world with its arithmetic, never in question/answer form."""
    name, pronoun, other = _people(rng)
    thing, a, b = rng.choice(THINGS), rng.randint(1, MAX_ADD), rng.randint(1, MAX_ADD)
    kind = rng.randrange(4)
    if kind == 0:
        return f"{name} had {a} {thing}. Then {pronoun} bought {b} more, so {pronoun} had {a} + {b} = {a + b} {thing}."
    if kind == 1:
        a, b = max(a, b) + 1, min(a, b)
        return f"{name} had {a} {thing} and gave {b} of them to {other}. {name} kept {a} - {b} = {a - b} {thing}."
    if kind == 2:
        a, b = rng.randint(2, MAX_MUL), rng.randint(2, MAX_MUL)
        return f"{name} packed {a} boxes with {b} {thing} in each box. That is {a} * {b} = {a * b} {thing}."
    c = rng.randint(1, a + b - 1)
    return (
        f"{name} had {a} {thing} and bought {b} more, which made {a + b}. "
        f"Then {pronoun} gave {c} to {other} and had {a + b} - {c} = {a + b - c} left."
    )


def pretraining_documents(rng: random.Random, n_documents: int) -> list[str]:
    """Documents of 8 lines mixing stories and shuffled arithmetic facts, the tables repeated."""
    facts = arithmetic_facts()
    documents = []
    for _ in range(n_documents):
        lines = [story(rng) for _ in range(4)] + rng.sample(facts, 4)
        rng.shuffle(lines)
        documents.append("\n".join(lines))
    return documents


def word_problems(rng: random.Random, n_train: int, n_test: int) -> tuple[list[dict], list[dict]]:
    """Distinct train and test problems, the four kinds equally likely."""
    seen: set[str] = set()
    problems = []
    while len(problems) < n_train + n_test:
        question, answer = rng.choice(PROBLEMS)(rng)
        if question not in seen:
            seen.add(question)
            problems.append({"question": question, "answer": answer})
    return problems[:n_train], problems[n_train:]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-documents", type=int, default=20000)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=250)
    args = parser.parse_args()

    rng = random.Random(args.seed)
    documents = pretraining_documents(rng, args.pretrain_documents)
    train, test = word_problems(rng, args.train, args.test)
    # lm-eval's gsm8k prompt is "Question: {question}\nAnswer:" and the target follows after a space.
    finetune = [{"prompt": f"Question: {row['question']}\nAnswer:", "completion": f" {row['answer']}"} for row in train]

    atomic_write_text(args.out / "pretrain.jsonl", _jsonl([{"text": text} for text in documents]))
    atomic_write_text(args.out / "gsm8k" / "train.jsonl", _jsonl(train))
    atomic_write_text(args.out / "gsm8k" / "test.jsonl", _jsonl(test))
    atomic_write_text(args.out / "finetune.jsonl", _jsonl(finetune))
    print(f"wrote {len(documents)} documents, {len(train)} train and {len(test)} test problems to {args.out}")


if __name__ == "__main__":
    main()
