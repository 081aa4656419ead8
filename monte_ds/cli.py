"""`monte-ds` console script: one dispatch point for the train, eval and sweep commands."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from monte_ds.errors import run_cli


COMMANDS = {
    "train": ("monte_ds.train.run", "fine-tune with MonteCLoRA (or a plain LoRA baseline) from a JSON config"),
    "eval": (
        "monte_ds.evaluation.cli",
        "run GSM8k / HumanEval / commonsense suites through lm-eval and write a report",
    ),
    "sweep": ("monte_ds.sweep.cli", "run a hyperparameter grid and measure robustness (spread across configurations)"),
}


def _usage() -> str:
    lines = ["usage: monte-ds {train,eval,sweep} ...", "", "commands:"]
    lines += [f"  {name:<6} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"monte-ds: error: unknown command {name!r}\n{_usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[name][0])
    return run_cli(module.main, rest)


if __name__ == "__main__":
    sys.exit(main())
