"""`evaluate`: lm-eval on an in-memory model, suite by suite, with calibration, optional
posterior-predictive averaging, and the report. `monte-ds eval` and the trainer both plan
once (`plan_evaluation`: checks and datasets, no model) and then `run_plan` on the model.

Before anything is computed, each generation task's length is fitted to the model's
context (`limits`). Then every suite runs on its own: its results are written to the
report as soon as it finishes, and a suite that fails is recorded as failed, with its
error, while the others still run. Within a suite, a generation task runs a chunk of
documents at a time (`chunks`), each kept in the report once scored: an interrupted suite
is reported as partial, and a rerun into the same report continues it.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lm_eval import simple_evaluate
from lm_eval.api.task import Task
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from torch import nn
from transformers import PreTrainedTokenizerBase

from monte_ds.errors import UserError
from monte_ds.evaluation import chunks, humaneval, plots, report
from monte_ds.evaluation.calibration import calibration, choice_scores
from monte_ds.evaluation.limits import (
    GenerationLimit,
    apply_limits,
    generation_limits,
    prompt_tokens,
    requested_max_gen_toks,
    truncated_prompts,
)
from monte_ds.evaluation.options import EvalOptions
from monte_ds.evaluation.predictive import predictive_scores, require_monteclora
from monte_ds.evaluation.tasks import expand_suites, is_multiple_choice, load_tasks, task_configs, task_manager


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalPlan:
    """Everything settled before a model is needed: options, suites, tasks with their data,
    the generation length each generation task asks for, and the training log."""

    options: EvalOptions
    manager: TaskManager
    suites: dict[str, list[str]]
    tasks: dict[str, Task]
    max_gen_toks: dict[str, int]
    log_history: list[dict[str, Any]] | None


def validate_options(options: Mapping[str, Any]) -> EvalOptions:
    """The checks that need neither a model nor the datasets: options, suites, the
    code-execution opt-in and (offline) the data files."""
    return _resolve(options)[0]


def plan_evaluation(options: Mapping[str, Any], training_log: str | Path | None = None) -> EvalPlan:
    """`validate_options`, the training log, then the task datasets, loaded once for the run."""
    opts, manager, suites, configs = _resolve(options)
    log_history = plots.read_log_history(training_log) if training_log is not None else None
    tasks = load_tasks(manager, configs, opts.num_fewshot)
    return EvalPlan(opts, manager, suites, tasks, requested_max_gen_toks(tasks, opts), log_history)


def _resolve(options: Mapping[str, Any]) -> tuple[EvalOptions, TaskManager, dict[str, list[str]], dict[str, dict]]:
    opts = EvalOptions.from_kwargs(options)
    manager = task_manager()
    suites = expand_suites(manager, opts.suites)
    names = [name for members in suites.values() for name in members]
    if humaneval.TASK in names and not opts.allow_code_execution:
        raise UserError(
            "humaneval runs model-generated code against its tests; "
            "opt in with allow_code_execution=true (--allow-code-execution) or leave humaneval out",
            key="allow_code_execution",
        )
    if humaneval.TASK in names and opts.humaneval_temperature == 0 and opts.humaneval_samples != 1:
        raise UserError(
            f"greedy decoding (humaneval_temperature 0) gives one completion per problem, not {opts.humaneval_samples}: "
            "set humaneval_samples to 1",
            key="humaneval_samples",
        )
    configs = task_configs(
        manager, names, opts.data_dir, opts.num_fewshot, opts.humaneval_samples, opts.humaneval_temperature
    )
    return opts, manager, suites, configs


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
    `output_dir` and return it (`report["suites"]` says which suites failed). The model is
    evaluated in eval mode (a MonteCLoRA adapter at its mean) and its train/eval mode is
    restored afterwards."""
    return run_plan(plan_evaluation(options, training_log), model, tokenizer, output_dir, metadata)


@dataclass
class _Progress:
    """The report's content so far; `write` renders it into `output_dir`."""

    plan: EvalPlan
    metadata: dict[str, Any]
    generation: dict[str, dict[str, Any]]
    suites: dict[str, dict[str, Any]] = field(init=False)
    lm_eval: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    predictive: dict[str, dict[str, Any]] | None = None
    chunked: dict[str, chunks.TaskChunks] = field(default_factory=dict)  # generation tasks, by name
    partial: dict[str, dict[str, Any]] = field(default_factory=dict)  # their results so far, until complete

    def __post_init__(self) -> None:
        self.suites = {
            name: {"tasks": tasks, "status": "pending", "error": None} for name, tasks in self.plan.suites.items()
        }
        if self.plan.options.predictive_samples and any(map(is_multiple_choice, self.plan.tasks.values())):
            self.predictive = {}

    def fail(self, suite: str, error: str, trace: str | None = None) -> None:
        logger.error("evaluation suite %s failed: %s", suite, error)
        self.suites[suite].update(status="failed", error=error, traceback=trace)

    def track(self, suite: str) -> None:
        """Record, in the suite's entry, how many documents each of its generation tasks has done,
        and their results so far for the tasks not complete."""
        tracked = {name: self.chunked[name] for name in self.suites[suite]["tasks"] if name in self.chunked}
        if not tracked:
            return
        self.suites[suite]["progress"] = {name: task.progress() for name, task in tracked.items()}
        for name, task in tracked.items():
            if task.complete or not task.done:
                self.partial.pop(name, None)
            else:
                output = task.results()
                self.partial[name] = {
                    **task.progress(),
                    "results": output["results"][name],
                    "n-shot": output["n-shot"][name],
                    "truncated_prompts": task.truncated_prompts(),
                }

    def write(self, output_dir: str | Path) -> dict[str, Any]:
        figures = {
            report.RELIABILITY_PNG: plots.reliability_diagram(self.calibration, self.predictive)
            if self.calibration
            else None,
            report.TRAINING_CURVES_PNG: (
                plots.training_curves(self.plan.log_history) if self.plan.log_history is not None else None
            ),
        }
        figures = {name: figure for name, figure in figures.items() if figure is not None}
        files = {path: content for task in self.chunked.values() for path, content in task.files().items()}
        result = report.build_report(
            self.lm_eval,
            self.calibration,
            self.predictive,
            asdict(self.plan.options),
            self.metadata,
            list(figures),
            self.suites,
            self.generation,
            self.partial,
            list(files),
        )
        report.write_report(output_dir, result, figures, files)
        for task in self.chunked.values():
            task.stored_at(Path(output_dir))
        return result


def run_plan(
    plan: EvalPlan,
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: str | Path,
    metadata: Mapping[str, Any] | None = None,
    *,
    strict: bool = True,
) -> dict[str, Any]:
    """Run a plan on `model`, suite by suite, rewriting the report after each; return the report.

    A task that cannot run on the model (its prompts do not fit the context) is a `UserError`
    before anything is computed when `strict`; otherwise (the post-training evaluation) its
    suite is recorded as failed and the others run.
    """
    opts = plan.options
    if opts.predictive_samples:
        require_monteclora(model)
        if not any(map(is_multiple_choice, plan.tasks.values())):
            logger.warning("predictive_samples: no multiple-choice task to average over; only the mean is reported")
    was_training = model.training  # HFLM puts the model in eval mode
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=opts.batch_size)
    try:
        limits, unfit = generation_limits(plan.tasks, plan.max_gen_toks, lm, opts)
        if unfit and strict:
            raise UserError("; ".join(unfit.values()), key="suites")
        apply_limits(plan.tasks, limits)
        run_metadata = {"model": getattr(model.config, "_name_or_path", None), "context_length": lm.max_length}
        progress = _Progress(
            plan, {**run_metadata, **(metadata or {})}, {n: limit.as_dict() for n, limit in limits.items()}
        )
        if limits:
            digest = chunks.model_digest(lm)
            for name in limits:
                task = plan.tasks[name]
                progress.chunked[name] = tracked = chunks.TaskChunks(
                    task, name, chunks.fingerprint(task, opts, digest), chunks.planned_chunks(task, opts)
                )
                chunks.load_stored(tracked, Path(output_dir))
            for suite in plan.suites:
                progress.track(suite)
        for suite, names in plan.suites.items():
            if blocked := [unfit[name] for name in names if name in unfit]:
                progress.fail(suite, "; ".join(blocked))
            else:
                _run_suite(progress, suite, lm, model, {name: plan.tasks[name] for name in names}, limits, output_dir)
            result = progress.write(output_dir)
            logger.info("evaluation report written to %s (after suite %s)", output_dir, suite)
    finally:
        model.train(was_training)
    return result


def _run_suite(
    progress: _Progress,
    suite: str,
    lm: HFLM,
    model: nn.Module,
    tasks: dict[str, Task],
    limits: dict[str, GenerationLimit],
    output_dir: str | Path,
) -> None:
    """One suite: lm-eval (the generation tasks chunk by chunk), calibration, the
    posterior-predictive draws; a failure is recorded, with the chunks done so far."""
    plan, opts = progress.plan, progress.plan.options
    multiple_choice = {name: task for name, task in tasks.items() if is_multiple_choice(task)}
    generation = {name: task for name, task in tasks.items() if name in progress.chunked}
    whole = {name: task for name, task in tasks.items() if name not in generation}
    try:
        output = run_harness(lm, plan.manager, whole, opts) if whole else {}
        for name in generation:
            report.merge_lm_eval(
                output, _run_chunks(progress, suite, progress.chunked[name], lm, limits[name], output_dir)
            )
        scored = {
            name: calibration(choice_scores(task, output["samples"][name])) for name, task in multiple_choice.items()
        }
        drawn = {}
        if progress.predictive is not None and multiple_choice:
            averaged = predictive_scores(
                model,
                multiple_choice,
                opts.predictive_samples,
                lambda chosen: run_harness(lm, plan.manager, chosen, opts),
            )
            drawn = {name: calibration(scores) for name, scores in averaged.items()}
        truncated = {
            name: truncated_prompts(output["samples"][name], lm, limits[name]) for name in whole if name in limits
        }
        truncated.update({name: progress.chunked[name].truncated_prompts() for name in generation})
    except Exception as err:  # any failure of one suite: keep the others' results (and its chunks done)
        progress.fail(suite, describe(err), traceback.format_exc())
        progress.track(suite)
        return
    report.merge_lm_eval(progress.lm_eval, output)
    progress.calibration.update(scored)
    if progress.predictive is not None:
        progress.predictive.update(drawn)
    for name, count in truncated.items():
        progress.generation[name]["truncated_prompts"] = count
    progress.suites[suite]["status"] = "completed"
    progress.track(suite)


def _run_chunks(
    progress: _Progress, suite: str, task: chunks.TaskChunks, lm: HFLM, limit: GenerationLimit, output_dir: str | Path
) -> dict[str, Any]:
    """A generation task's chunks not done yet, each through lm-eval's `samples` option and
    written to the report (the suite partial) before the next; lm-eval's output over all."""
    plan, opts = progress.plan, progress.plan.options
    remaining = [doc_ids for doc_ids in task.planned if doc_ids not in task.done]
    for position, doc_ids in enumerate(remaining):
        output = run_harness(lm, plan.manager, {task.name: task.task}, opts, samples={task.name: list(doc_ids)})
        samples = output["samples"][task.name]
        longer = {s["doc_id"] for s in samples if prompt_tokens(lm, s["arguments"][0][0]) > limit.max_prompt_tokens}
        task.add(doc_ids, output, sorted(longer))
        if position < len(remaining) - 1:  # the last chunk is written with the suite's results
            progress.suites[suite]["status"] = "partial"
            progress.track(suite)
            progress.write(output_dir)
            logger.info(
                "%s: %d of %d documents done, written to %s", task.name, task.documents_done, task.total, output_dir
            )
    output = task.results()
    output["config"] = {**output["config"], "limit": opts.limit}  # each chunk's pass named its documents instead
    return output


def write_failed_report(
    plan: EvalPlan, output_dir: str | Path, error: BaseException, metadata: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A report where every suite failed with `error`: what an evaluation that could not
    start (e.g. the model did not load) leaves, so that its failure is on record."""
    progress = _Progress(plan, dict(metadata or {}), {})
    for suite in plan.suites:
        progress.fail(suite, describe(error))
    return progress.write(output_dir)


def describe(error: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def run_harness(
    lm: HFLM,
    manager: TaskManager,
    tasks: dict[str, Task],
    opts: EvalOptions,
    samples: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """One lm-eval pass over `tasks` (the first `limit` documents, or the documents `samples`
    names per task), keeping per-sample log-likelihoods for calibration. Generation lengths
    are the tasks' own (`limits.apply_limits` fitted them to the model)."""
    return simple_evaluate(
        model=lm,
        tasks=list(tasks.values()),
        task_manager=manager,
        num_fewshot=opts.num_fewshot,
        limit=None if samples is not None else opts.limit,
        samples=samples,
        log_samples=True,
        apply_chat_template=opts.apply_chat_template,
        fewshot_as_multiturn=opts.apply_chat_template,
        confirm_run_unsafe_code=opts.allow_code_execution,
        random_seed=opts.seed,
        numpy_random_seed=opts.seed,
        torch_random_seed=opts.seed,
        fewshot_random_seed=opts.seed,
    )
