"""The training recipe behind `monte-ds train` and `launch/train.py`.

    monte-ds train --config configs/tiny.json [--set training.learning_rate=1e-4 ...] [--resume]

One script for every launcher: `python`, `torchrun`, `deepspeed` (which passes `--local_rank`)
and `accelerate launch`. Everything that can be wrong with the config, the data or the output
directory is reported (exit 2) before the first byte is written. The output directory's layout,
statuses and exit codes are `monte_ds.run_folder`'s.

Exit codes: 0 trained, 2 user error, 3 the loss diverged (metrics.json says "diverged").
An evaluation after training that fails (a suite, or all of it) is recorded in report/ and
logged; the run stays completed, exit 0, its adapters kept.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
import transformers
from transformers import PreTrainedTokenizerBase
from transformers.integrations.deepspeed import unset_hf_deepspeed_config
from trl import SFTConfig

import monte_ds
from monte_ds import run_folder
from monte_ds.atomic import atomic_write_json
from monte_ds.errors import UserError, first_line
from monte_ds.flags import ArgumentParser
from monte_ds.monteclora.engine import REGULARISER_TERMS
from monte_ds.tiny import build_tokenizer
from monte_ds.train import checkpoints
from monte_ds.train.config import TrainConfig, load_config, training_arguments
from monte_ds.train.data import check_trainable_tokens, dataset_texts, split_eval, training_dataset
from monte_ds.train.methods import REGISTRY
from monte_ds.train.model import (
    attach_adapter,
    check_adapter_targets,
    check_model_path,
    ensure_base_model,
    load_base_model,
    load_tokenizer,
    quantization_config,
)
from monte_ds.train.trainer import MonteCLoRATrainer


if TYPE_CHECKING:  # lm-eval is imported only by runs that evaluate
    from monte_ds.evaluation import EvalPlan
    from monte_ds.evaluation.loading import LoadedModel

logger = logging.getLogger("monte_ds.train")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="monte-ds train", description="Fine-tune with MonteCLoRA (or a plain LoRA baseline) from a JSON config."
    )
    parser.add_argument("--config", required=True, help="the JSON config (see configs/ and docs/training.md)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.learning_rate=1e-4 (JSON values; repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


@dataclass
class Plan:
    """Everything validated and loaded before the output directory is touched."""

    config: TrainConfig
    args: SFTConfig
    dataset: datasets.Dataset
    eval_dataset: datasets.Dataset | None  # held out of the data for training.eval_strategy
    resume_from: Path | None
    evaluation: EvalPlan | None  # the eval section, planned (datasets loaded) once, before training


def plan_run(argv: Sequence[str] | None) -> Plan:
    options = parse_args(argv)
    if options.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(options.local_rank))
    config = load_config(options.config, options.overrides)
    # before training_arguments: its DeepSpeed ZeRO-3 config would make from_config partition the skeleton
    check_adapter_targets(config, check_model_path(config))
    args = training_arguments(config)
    resume_from = _checkpoint_to_resume(config.output_dir, options.resume)
    evaluation = None
    if config.eval.get("suites"):
        from monte_ds.evaluation import plan_evaluation

        try:
            evaluation = plan_evaluation(config.eval)
        except UserError as err:
            raise err.under("eval") from None
    dataset, source = training_dataset(config.data)
    check_trainable_tokens(dataset, _planning_tokenizer(config, dataset), args, source)
    dataset, eval_dataset = split_eval(dataset, config.data.eval_size)
    return Plan(config, args, dataset, eval_dataset, resume_from, evaluation)


def _planning_tokenizer(config: TrainConfig, dataset: datasets.Dataset) -> PreTrainedTokenizerBase:
    """The run's tokenizer, to check the data before anything is written: a tiny base still to
    build gets, in memory, the tokenizer `ensure_tiny_model` will save."""
    if config.model.build_tiny and not Path(config.model.path).exists():
        return build_tokenizer(dataset_texts(dataset))
    try:
        return load_tokenizer(config)
    except (OSError, ValueError) as err:
        raise UserError(
            f"cannot load a tokenizer from {config.model.path!r}: {first_line(err)}", key="model.path"
        ) from None


def _checkpoint_to_resume(output_dir: Path, resume: bool) -> Path | None:
    latest = checkpoints.latest_complete_checkpoint(output_dir)
    if resume:
        if latest is None:
            raise UserError(f"no complete checkpoint in {output_dir}", key="--resume")
        return latest
    if latest is not None and run_folder.read_status(output_dir) is None:
        raise UserError(
            f"{output_dir} holds an unfinished run (latest {latest.name}); "
            "pass --resume to continue it, or choose another output_dir",
            key="training.output_dir",
        )
    return None


def main(argv: Sequence[str] | None = None) -> int:
    plan = plan_run(argv)
    _setup_logging(plan.args)
    return execute(plan)


def execute(plan: Plan) -> int:
    config, args = plan.config, plan.args
    _init_distributed(args)
    check_reentrant_checkpointing(args)
    with args.main_process_first(local=False, desc="preparing the output directory"):
        if args.process_index == 0:
            _prepare_output_dir(config, fresh=plan.resume_from is None)
            atomic_write_json(config.output_dir / run_folder.CONFIG_JSON, config.to_dict())
            ensure_base_model(config, dataset_texts(plan.dataset) + dataset_texts(plan.eval_dataset or []))

    tokenizer = load_tokenizer(config)
    model = load_base_model(config, args.device, sharded=config.shards_parameters)
    model = attach_adapter(
        model, config, args.seed, args.activation_checkpointing, args.activation_checkpointing_kwargs
    )
    trainer = MonteCLoRATrainer(
        model=model,
        args=args,
        train_dataset=plan.dataset,
        eval_dataset=plan.eval_dataset,
        processing_class=tokenizer,
        method=REGISTRY[config.method],
        method_options=config.method_options,
    )
    result = trainer.train(resume_from_checkpoint=str(plan.resume_from) if plan.resume_from else None)

    status = run_folder.DIVERGED if trainer.diverged else run_folder.COMPLETED
    if status == run_folder.COMPLETED:
        REGISTRY[config.method].save(trainer, config.output_dir)  # collective: every rank calls it
        trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        metrics = {
            "status": status,
            "global_step": trainer.state.global_step,
            "train_loss": result.training_loss,
            "log_history": trainer.state.log_history,
        }
        atomic_write_json(config.output_dir / run_folder.METRICS_JSON, metrics)
        _print_summary(config, metrics)
    if status == run_folder.DIVERGED:
        return run_folder.EXIT_DIVERGED
    if plan.evaluation is not None and args.process_index == 0:
        # The other ranks are done: no collective waits on an evaluation that may take hours.
        log_history = trainer.state.log_history
        del trainer, model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        _evaluate(config, args, replace(plan.evaluation, log_history=log_history))
    return run_folder.EXIT_COMPLETED


def _init_distributed(args: SFTConfig) -> None:
    """Start the process group (through `args.device`). On CPU, accelerate does not start
    DeepSpeed's communication layer, which ZeRO-3's `zero.Init` model loading needs."""
    _ = args.device
    if args.deepspeed and torch.distributed.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())


def check_reentrant_checkpointing(args: SFTConfig) -> None:
    """Plain DDP cannot take reentrant activation checkpointing: each replayed block runs a
    backward pass of its own, so a parameter's gradient hook fires more than once per step (peft's
    LoRA B and MonteCLoRA's v and alpha), which DDP's reducer refuses even with a static graph.
    Checked here, on every rank before the model is loaded, because only the launch knows the world
    size; MonteCLoRA under ZeRO-3, which fails on it too, is refused by `validate_config`."""
    kwargs = args.activation_checkpointing_kwargs or {}
    plain_ddp = args.world_size > 1 and not args.deepspeed and not args.fsdp
    if plain_ddp and args.activation_checkpointing and kwargs.get("use_reentrant"):
        raise UserError(
            "reentrant activation checkpointing fires a parameter's gradient hook once per replayed block, which "
            'DDP refuses; use {"use_reentrant": false} (the default), or DeepSpeed ZeRO or FSDP2',
            key="training.activation_checkpointing_kwargs",
        )


def _prepare_output_dir(config: TrainConfig, fresh: bool) -> None:
    """Drop what a killed save left; for a fresh run, also what a finished earlier run left here
    (an unfinished one was refused), so that no file can be mistaken for this run's."""
    output_dir = config.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    checkpoints.remove_incomplete(output_dir)
    if not fresh:
        return
    stale = checkpoints.checkpoint_dirs(output_dir)
    stale += [output_dir / name for name in run_folder.RESULTS]
    stale = [path for path in stale if path.exists()]
    if stale:
        logger.warning(
            "starting afresh in %s: removing the earlier run's %s", output_dir, ", ".join(p.name for p in stale)
        )
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def inference_dir(config: TrainConfig) -> Path:
    """Where a finished run keeps what its method needs for inference."""
    return REGISTRY[config.method].inference_dir(config.output_dir)


def load_trained(config: TrainConfig, device: torch.device) -> LoadedModel:
    """A finished run's model (eval mode), tokenizer and load metadata, from its output dir alone,
    the same way for every method: the base model with the saved adapter, or the saved model for `full`."""
    from monte_ds.evaluation.loading import load_model

    unset_hf_deepspeed_config()  # the reload must not be partitioned by zero.Init
    whole = REGISTRY[config.method].saves_model
    return load_model(
        inference_dir(config) if whole else config.model.path,
        None if whole else inference_dir(config),
        dtype=config.model.dtype,
        device=device,
        quantization=quantization_config(config.quantization, shards_parameters=False),
        revision=None if whole else config.model.revision,
        trust_remote_code=config.model.trust_remote_code,
        attn_implementation=config.model.attn_implementation,
        gguf_file=config.model.gguf_file,
    )


def _evaluate(config: TrainConfig, args: SFTConfig, evaluation: EvalPlan) -> None:
    """Evaluate the saved adapter on the main process: a fresh load, so the report describes
    exactly the files in output_dir, and a ZeRO-3/FSDP2 run needs no collective evaluation.

    Never fails the run: a suite that cannot run or fails is recorded in the report by
    `run_plan`, and an evaluation that cannot start leaves a report saying why."""
    from monte_ds.evaluation import run_plan, write_failed_report

    report_dir = config.output_dir / run_folder.REPORT_DIR
    metadata = {
        "adapter_method": config.method,
        "config_hash": config.config_hash(),
        "seed": args.seed,
        "versions": _versions(),
    }
    try:
        loaded = load_trained(config, args.device)
        report = run_plan(
            evaluation, loaded.model, loaded.tokenizer, report_dir, {**loaded.metadata, **metadata}, strict=False
        )
    except Exception as err:  # the adapters are saved and the run completed: keep both
        logger.exception("evaluation after training failed")
        report = write_failed_report(evaluation, report_dir, err, {"model": config.model.path, **metadata})
    failed = [name for name, suite in report["suites"].items() if suite["status"] != "completed"]
    if failed:
        logger.warning("evaluation: suite(s) %s failed; see %s (training completed)", ", ".join(failed), report_dir)


def _versions() -> dict[str, str]:
    """The training stack (the report adds the evaluation's own)."""
    import accelerate
    import deepspeed
    import peft
    import trl

    modules = {"monte-ds": monte_ds, "torch": torch, "transformers": transformers, "peft": peft, "trl": trl}
    modules.update({"accelerate": accelerate, "deepspeed": deepspeed, "datasets": datasets})
    return {name: module.__version__ for name, module in modules.items()}


def _print_summary(config: TrainConfig, metrics: dict[str, Any]) -> None:
    last = next((entry for entry in reversed(metrics["log_history"]) if REGULARISER_TERMS[0] in entry), None)
    terms = ", ".join(f"{name}={last[name]:.4g}" for name in REGULARISER_TERMS) if last else ""
    loss = metrics["train_loss"]
    print(
        f"monte-ds: {metrics['status']} after {metrics['global_step']} steps, train_loss="
        f"{loss if loss is None or not math.isfinite(loss) else f'{loss:.4f}'}"
        + (f"; regulariser {terms}" if terms else "")
        + f"; outputs in {config.output_dir}",
        file=sys.stderr if metrics["status"] != run_folder.COMPLETED else sys.stdout,
    )


def _setup_logging(args: SFTConfig) -> None:
    """monte-ds logs at info on the main process and warnings elsewhere; `training.log_level`
    (and `log_level_replica`), when set, decide for monte-ds and transformers alike."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    if args.log_level == "passive":
        level = logging.INFO if args.should_log else logging.WARNING
    else:
        level = args.get_process_log_level()
        transformers.utils.logging.set_verbosity(level)
    logging.getLogger("monte_ds").setLevel(level)
