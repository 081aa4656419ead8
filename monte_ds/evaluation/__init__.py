"""Evaluation: GSM8k, HumanEval and commonsense suites through lm-eval, and the report.

`evaluate(model, tokenizer, output_dir, training_log=..., metadata=..., **options)` runs
the suites on an in-memory model; `EvalOptions` lists the accepted options (the training
config's `eval` section). `plan_evaluation` (checks and datasets, no model) and `run_plan`
are its two halves: the trainer plans before training and runs after it, on the model
`loading.load_model` rebuilds from the saved adapter, as `monte-ds eval` (the command-line
front end) does.
"""

from monte_ds.evaluation.options import EvalOptions
from monte_ds.evaluation.runner import (
    EvalPlan,
    evaluate,
    plan_evaluation,
    run_plan,
    validate_options,
    write_failed_report,
)


__all__ = [
    "EvalOptions",
    "EvalPlan",
    "evaluate",
    "plan_evaluation",
    "run_plan",
    "validate_options",
    "write_failed_report",
]
