"""Generate `monte_ds/data/tiny_instruct.jsonl`, the bundled training set of `configs/tiny.json`.

Alpaca-style records (instruction / input / output) of small, rule-based tasks (arithmetic,
spelling, counting, antonyms) that a 2-layer LLaMA can start to learn in a few hundred CPU steps,
so the demo shows a falling loss. The output is a pure function of `--seed` and `--count`:
re-running the script reproduces the bundled file byte for byte.

    python scripts/make_tiny_data.py            # rewrites the bundled file
    python scripts/make_tiny_data.py --check    # exits 1 if the bundled file is stale
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path


OUTPUT = Path(__file__).resolve().parents[1] / "monte_ds" / "data" / "tiny_instruct.jsonl"

WORDS = (
    "apple river stone cloud green table light music paper bread window garden yellow silver "
    "forest candle planet rabbit winter summer orange pencil camera bottle basket mirror rocket "
    "tiger lemon ocean castle dragon flower market school letter wheel"
).split()
ANTONYMS = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "light": "dark",
    "early": "late",
    "happy": "sad",
    "open": "closed",
    "full": "empty",
    "high": "low",
    "old": "new",
    "wet": "dry",
    "hard": "soft",
    "long": "short",
    "loud": "quiet",
    "strong": "weak",
}
Record = dict[str, str]


def addition(rng: random.Random) -> Record:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}


def successor(rng: random.Random) -> Record:
    n = rng.randint(0, 98)
    return {"instruction": "What number comes after this one?", "input": str(n), "output": str(n + 1)}


def reverse(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    return {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]}


def capitals(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    return {"instruction": "Write the word in capital letters.", "input": word, "output": word.upper()}


def word_count(rng: random.Random) -> Record:
    words = rng.sample(WORDS, rng.randint(1, 6))
    return {"instruction": "How many words are in the sentence?", "input": " ".join(words), "output": str(len(words))}


def first_letter(rng: random.Random) -> Record:
    word = rng.choice(WORDS)
    return {"instruction": "What is the first letter of the word?", "input": word, "output": word[0]}


def antonym(rng: random.Random) -> Record:
    word = rng.choice(sorted(ANTONYMS))
    return {"instruction": "Give the opposite of the word.", "input": word, "output": ANTONYMS[word]}


TASKS: tuple[Callable[[random.Random], Record], ...] = (
    addition,
    successor,
    reverse,
    capitals,
    word_count,
    first_letter,
    antonym,
)


def generate(count: int, seed: int) -> list[Record]:
    rng = random.Random(seed)
    return [TASKS[i % len(TASKS)](rng) for i in range(count)]


def render(records: list[Record]) -> str:
    return "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--check", action="store_true", help="verify the file instead of writing it")
    args = parser.parse_args(argv)
    text = render(generate(args.count, args.seed))
    if args.check:
        current = args.output.read_text() if args.output.is_file() else None
        if current != text:
            print(f"{args.output} is stale: run scripts/make_tiny_data.py", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.count} records to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
