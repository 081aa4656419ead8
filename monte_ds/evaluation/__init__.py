"""Evaluation: GSM8k, HumanEval and commonsense suites through lm-eval, and the report.

`evaluate(model, tokenizer, output_dir, training_log=..., metadata=..., **options)` is what
the trainer calls after training; `EvalOptions` lists the accepted options (the training
config's `eval` section) and `validate_options` checks a section before training;
`monte-ds eval` is the command-line front end.
"""

from monte_ds.evaluation.options import EvalOptions
from monte_ds.evaluation.runner import EvalPlan, evaluate, plan_evaluation, run_plan, validate_options

__all__ = ["EvalOptions", "EvalPlan", "evaluate", "plan_evaluation", "run_plan", "validate_options"]
