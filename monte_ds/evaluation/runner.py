"""`evaluate`: lm-eval on an in-memory model, calibration, optional posterior-predictive
averaging, and the report. The trainer calls it after training; `monte-ds eval` after loading."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lm_eval import simple_evaluate
from lm_eval.api.task import Task
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from torch import nn
from transformers import PreTrainedTokenizerBase

from monte_ds.errors import UserError
from monte_ds.evaluation import humaneval, plots, report
from monte_ds.evaluation.calibration import calibration, choice_scores
from monte_ds.evaluation.options import EvalOptions
from monte_ds.evaluation.predictive import predictive_scores, require_monteclora
from monte_ds.evaluation.tasks import expand_suites, is_multiple_choice, load_tasks, task_configs, task_manager

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPlan:
    """Everything settled before a model is needed: options, tasks with their data, training log."""

    options: EvalOptions
    manager: TaskManager
    tasks: dict[str, Task]
    log_history: list[dict[str, Any]] | None


def validate_options(options: Mapping[str, Any]) -> EvalOptions:
    """The checks that need neither a model nor the datasets: options, suites, the
    code-execution opt-in and (offline) the data files. Cheap, so a training run can call
    it when it validates its config and fail before training rather than after."""
    return _resolve(options)[0]


def plan_evaluation(options: Mapping[str, Any], training_log: str | Path | None = None) -> EvalPlan:
    """`validate_options`, the training log, then the task datasets loaded."""
    opts, manager, configs = _resolve(options)
    log_history = plots.read_log_history(training_log) if training_log is not None else None
    return EvalPlan(opts, manager, load_tasks(manager, configs, opts.num_fewshot), log_history)


def _resolve(options: Mapping[str, Any]) -> tuple[EvalOptions, TaskManager, dict[str, dict[str, Any]]]:
    opts = EvalOptions.from_kwargs(options)
    manager = task_manager()
    names = expand_suites(manager, opts.suites)
    if humaneval.TASK in names and not opts.allow_code_execution:
        raise UserError(
            "allow_code_execution: humaneval runs model-generated code against its tests; "
            "opt in with allow_code_execution=true (--allow-code-execution) or leave humaneval out"
        )
    return opts, manager, task_configs(manager, names, opts.data_dir, opts.num_fewshot, opts.humaneval_samples)


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    *,
    training_log: str | Path | None = None,
    metadata: Mapping[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate `model` on the suites in `options` (see `EvalOptions`), write the report to
    `output_dir` and return it. The model is evaluated in eval mode (a MonteCLoRA adapter
    at its mean) and its train/eval mode is restored afterwards."""
    return run_plan(plan_evaluation(options, training_log), model, tokenizer, output_dir, metadata)


def run_plan(
    plan: EvalPlan,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a plan on `model`: lm-eval, calibration, posterior-predictive draws, the report."""
    opts = plan.options
    multiple_choice = {name: task for name, task in plan.tasks.items() if is_multiple_choice(task)}
    if opts.predictive_samples:
        require_monteclora(model)
        if not multiple_choice:
            logger.warning("predictive_samples: no multiple-choice task to average over; only the mean is reported")

    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=opts.batch_size)
    try:
        output = run_harness(lm, plan.manager, plan.tasks, opts)
        mean_calibration = {
            name: calibration(choice_scores(task, output["samples"][name])) for name, task in multiple_choice.items()
        }
        predictive = None
        if opts.predictive_samples and multiple_choice:
            drawn = predictive_scores(
                model, multiple_choice, opts.predictive_samples, lambda chosen: run_harness(lm, plan.manager, chosen, opts)
            )
            predictive = {name: calibration(scores) for name, scores in drawn.items()}
    finally:
        model.train(was_training)

    figures = {
        report.RELIABILITY_PNG: plots.reliability_diagram(mean_calibration, predictive) if mean_calibration else None,
        report.TRAINING_CURVES_PNG: plots.training_curves(plan.log_history) if plan.log_history is not None else None,
    }
    figures = {name: figure for name, figure in figures.items() if figure is not None}
    run_metadata = {"model": getattr(model.config, "_name_or_path", None), **(metadata or {})}
    result = report.build_report(output, mean_calibration, predictive, asdict(opts), run_metadata, list(figures))
    report.write_report(output_dir, result, figures)
    logger.info("evaluation report written to %s", output_dir)
    return result


def run_harness(lm: HFLM, manager: TaskManager, tasks: dict[str, Task], opts: EvalOptions) -> dict[str, Any]:
    """One lm-eval pass over `tasks`, keeping per-sample log-likelihoods for calibration."""
    return simple_evaluate(
        model=lm,
        tasks=list(tasks.values()),
        task_manager=manager,
        num_fewshot=opts.num_fewshot,
        limit=opts.limit,
        log_samples=True,
        apply_chat_template=opts.apply_chat_template,
        fewshot_as_multiturn=opts.apply_chat_template,
        gen_kwargs={"max_gen_toks": opts.max_gen_toks} if opts.max_gen_toks is not None else None,
        confirm_run_unsafe_code=opts.allow_code_execution,
        random_seed=opts.seed,
        numpy_random_seed=opts.seed,
        torch_random_seed=opts.seed,
        fewshot_random_seed=opts.seed,
    )
