"""AdaLoRA: a LoRA whose ranks are pruned from `init_r` to an average of `r` over the run.

Besides its peft config, it needs from the trainer its orthogonality regulariser, the per-step
rank budget update with `total_step` set to the run's step count, and the rank allocator's state
in every checkpoint for an exact resume.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import AdaLoraConfig, PeftModel
from peft.tuners.adalora import AdaLoraModel
from transformers import TrainerCallback

from monte_ds import run_folder
from monte_ds.config import MonteCLoRAConfig
from monte_ds.errors import InputError, UserError
from monte_ds.run_folder import CHECKPOINT_ADALORA_STATE
from monte_ds.train.methods.options import TARGETING, MethodOptions
from monte_ds.train.methods.record import Method, Refusal, Regulariser, TrainerHooks


if TYPE_CHECKING:
    from monte_ds.train.trainer import MonteCLoRATrainer

ORTHOGONALITY = "orthogonality"  # the logged name of the regulariser


def adalora_init_r(adapter: MonteCLoRAConfig, options: MethodOptions) -> int:
    return options.init_r if options.init_r is not None else round(1.5 * adapter.r)


def _peft_config(adapter: MonteCLoRAConfig, options: MethodOptions, tokenizer_path: str) -> AdaLoraConfig:
    """`total_step` is a placeholder the trainer replaces with the run's step count before the
    first step (`AdaLoraBudget`); peft refuses a config without one."""
    return AdaLoraConfig(
        task_type="CAUSAL_LM",
        target_modules=adapter.resolved_target_modules,
        modules_to_save=adapter.modules_to_save,
        init_r=adalora_init_r(adapter, options),
        target_r=adapter.r,
        lora_alpha=adapter.lora_alpha,
        lora_dropout=adapter.lora_dropout,
        tinit=options.tinit,
        tfinal=options.tfinal,
        deltaT=options.deltaT,
        beta1=options.beta1,
        beta2=options.beta2,
        orth_reg_weight=options.orth_reg_weight,
        total_step=options.tinit + options.tfinal + 1,
    )


def _check_options(adapter: MonteCLoRAConfig, options: MethodOptions) -> None:
    if options.init_r is not None and options.init_r < adapter.r:
        raise UserError(f"AdaLoRA prunes from init_r down to r, so it must be >= r ({adapter.r})", key="adapter.init_r")


class AdaLoraHooks(TrainerHooks):
    tuner: AdaLoraModel  # set up with the trainer
    budget: AdaLoraBudget

    def setup(self, trainer: MonteCLoRATrainer) -> None:
        tuner = trainer.model.base_model if isinstance(trainer.model, PeftModel) else None
        if not isinstance(tuner, AdaLoraModel):
            raise InputError(f"method 'adalora' trains a peft AdaLoRA model, got {type(trainer.model).__name__}")
        self.tuner = tuner
        self.budget = AdaLoraBudget(tuner)
        trainer.add_callback(self.budget)

    def regulariser(self, model: torch.nn.Module) -> Regulariser:
        penalty = _orthogonality(self.tuner)
        weight = self.tuner.peft_config[self.tuner.trainable_adapter_name].orth_reg_weight
        return Regulariser(weight * penalty, {ORTHOGONALITY: penalty})

    def saving_checkpoint(self, trainer: MonteCLoRATrainer) -> AbstractContextManager[None]:
        return _unpruned(self.tuner)

    def save_checkpoint_state(self, trainer: MonteCLoRATrainer, checkpoint: Path) -> None:
        # Identical on every rank: the allocator reads the all-reduced gradients.
        torch.save(_allocator_state(self.tuner), checkpoint / CHECKPOINT_ADALORA_STATE)

    def resume(self, trainer: MonteCLoRATrainer, checkpoint: Path) -> None:
        self.budget.resume_from = checkpoint / CHECKPOINT_ADALORA_STATE


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA's rank budget: its schedule spans the run's steps, and it is updated after every
    optimizer step, while the gradients it scores the ranks by are still there."""

    def __init__(self, tuner: AdaLoraModel) -> None:
        self.tuner = tuner
        self.resume_from: Path | None = None  # a checkpoint's allocator state

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        if self.resume_from is not None:
            # Only now: with a rank pattern set, loading the checkpoint's full matrices would cut the model.
            _load_allocator_state(self.tuner, torch.load(self.resume_from, map_location=args.device))
        config = self.tuner.peft_config[self.tuner.trainable_adapter_name]
        if config.tinit >= state.max_steps - config.tfinal:
            raise UserError(
                f"AdaLoRA needs steps to prune ranks in: tinit ({config.tinit}) + tfinal "
                f"({config.tfinal}) must be below the run's {state.max_steps} steps",
                key="adapter.tinit",
            )
        self.tuner.rankallocator.set_total_step(state.max_steps)

    def on_optimizer_step(self, args, state, control, **kwargs) -> None:
        self.tuner.update_and_allocate(state.global_step)


def _orthogonality(tuner: AdaLoraModel) -> torch.Tensor:
    """AdaLoRA's regulariser: the mean of ||PᵀP - I||_F over its A (rows) and B (columns).

    peft adds it to `outputs.loss` in AdaLoraModel.forward, but TRL computes the training loss
    from the fused LM head's log-probabilities, so without this it never reaches the gradient.
    """
    adapter = tuner.trainable_adapter_name
    penalties = []
    for name, param in tuner.model.named_parameters():
        if adapter in name and ("lora_A" in name or "lora_B" in name):
            gram = param @ param.T if "lora_A" in name else param.T @ param
            identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            penalties.append(torch.linalg.matrix_norm(gram - identity))
    return torch.stack(penalties).mean()


@contextmanager
def _unpruned(tuner: AdaLoraModel) -> Iterator[None]:
    """peft saves an AdaLoRA adapter cut to its rank pattern: right for inference, but a resumed
    run goes on training the full matrices, so checkpoints hold them (the pattern is in
    CHECKPOINT_ADALORA_STATE)."""
    config = tuner.peft_config[tuner.trainable_adapter_name]
    pattern, config.rank_pattern = config.rank_pattern, None
    try:
        yield
    finally:
        config.rank_pattern = pattern


def _allocator_state(tuner: AdaLoraModel) -> dict[str, Any]:
    """The sensitivity averages the next budget update reads, and the rank pattern so far."""
    allocator = tuner.rankallocator
    return {
        "ipt": allocator.ipt,
        "exp_avg_ipt": allocator.exp_avg_ipt,
        "exp_avg_unc": allocator.exp_avg_unc,
        "rank_pattern": tuner.peft_config[tuner.trainable_adapter_name].rank_pattern,
    }


def _load_allocator_state(tuner: AdaLoraModel, state: dict[str, Any]) -> None:
    allocator = tuner.rankallocator
    allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = (
        state["ipt"],
        state["exp_avg_ipt"],
        state["exp_avg_unc"],
    )
    tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = state["rank_pattern"]


ADALORA = Method(
    name="adalora",
    accepts=TARGETING
    | {"r", "lora_alpha", "lora_dropout", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight"},
    output=run_folder.PEFT_ADAPTER_DIR,
    peft_config=_peft_config,
    check_options=_check_options,
    refusals=(
        Refusal(
            lambda setup: setup.zero_stage == 3 or setup.fsdp,
            "distributed",
            "AdaLoRA's rank allocation reads whole weights and gradients, which ZeRO-3 and FSDP shard",
        ),
        Refusal(
            lambda setup: setup.zero_stage is not None,
            "distributed.deepspeed",
            "AdaLoRA's rank allocation reads the gradients after the optimizer step, and DeepSpeed's step "
            "has cleared them by then; use DDP",
        ),
    ),
    hooks=lambda options: AdaLoraHooks(),
)
