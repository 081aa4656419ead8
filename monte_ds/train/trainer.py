"""`MonteCLoRATrainer`: TRL's SFTTrainer plus what MonteCLoRA needs from a trainer.

- the regulariser (`monteclora_losses(model)["total"]`) added to each micro-batch's loss, scaled
  exactly as the Trainer scales the task loss under gradient accumulation;
- its terms logged separately (progress bar, logs, TensorBoard), averaged over ranks;
- the sampler's noise counter (and TRL's token count) saved in every checkpoint and restored on resume;
- checkpoints marked complete only once every rank has written (see `checkpoints`);
- a non-finite loss on any rank stops the run on every rank, and nothing more is saved;
- a multi-rank run that stops making progress exits with a message (`watchdog`), never hangs.

Every other method runs through the same class, so the baselines and MonteCLoRA share one
pipeline; what some of them need from a trainer is here too:

- LoRA+ (`loraplus_lr_ratio`): peft's LoRA+ optimizer, B learning `loraplus_lr_ratio` times faster;
- AdaLoRA: its orthogonality regulariser, the per-step rank budget update with `total_step` set
  to the run's step count, and the rank allocator's state in every checkpoint for exact resume.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.optimizers import create_loraplus_optimizer
from peft.tuners.adalora import AdaLoraModel
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTConfig, SFTTrainer

from monte_ds.errors import UserError
from monte_ds.monteclora import load_sampler_state, monteclora_layers, monteclora_losses, sampler_state
from monte_ds.monteclora.engine import REGULARISER_TERMS
from monte_ds.run_folder import CHECKPOINT_ADALORA_STATE
from monte_ds.train import checkpoints
from monte_ds.train.model import keep_trainable_fp32
from monte_ds.train.watchdog import StallWatchdog


logger = logging.getLogger(__name__)

REGULARISER_TOTAL = "regulariser"
ORTHOGONALITY = "orthogonality"


class MonteCLoRATrainer(SFTTrainer):
    """`SFTTrainer` with MonteCLoRA's regulariser, logging, resumable noise and safe checkpoints."""

    def __init__(
        self,
        model: Any = None,
        args: SFTConfig | None = None,
        *rest: Any,
        loraplus_lr_ratio: float | None = None,
        loraplus_lr_embedding: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_lr_embedding = loraplus_lr_embedding
        # The Trainer rotates checkpoints before the new one is complete: its copy of the arguments
        # keeps none, and `_save_checkpoint` rotates to `save_total_limit` once the new one is.
        self.save_total_limit = None if args is None else args.save_total_limit
        if self.save_total_limit is not None:
            args = copy.copy(args)
            args.save_total_limit = None
        super().__init__(model, args, *rest, **kwargs)
        self.is_monteclora = next(monteclora_layers(self.model), None) is not None
        self.adalora = _adalora_tuner(self.model)
        self.adalora_budget = AdaLoraBudget(self.adalora) if self.adalora is not None else None
        if self.adalora_budget is not None:
            self.add_callback(self.adalora_budget)
        self.diverged = False
        if self.args.world_size > 1:
            self.add_callback(StallWatchdog(self.args.ddp_timeout, self.args.process_index))
        if self.is_monteclora:
            cast = keep_trainable_fp32(self.model)
            if cast:
                logger.info("kept %d MonteCLoRA parameters in fp32 (TRL had cast them to bf16)", len(cast))

    # -- loss ------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if self.adalora is not None and self.model.training:
            loss, outputs = result if return_outputs else (result, None)
            penalty = _orthogonality(self.adalora)
            self._metrics["train"][ORTHOGONALITY].append(
                self.accelerator.reduce(penalty.detach(), reduction="mean").item()
            )
            weight = self.adalora.peft_config[self.adalora.trainable_adapter_name].orth_reg_weight
            loss = loss + weight * penalty.to(loss.device) / self.regulariser_divisor(num_items_in_batch)
            return (loss, outputs) if return_outputs else loss
        if not (self.is_monteclora and self.model.training):
            return result  # evaluation: the eval-mode model is plain LoRA, the loss is the task loss
        loss, outputs = result if return_outputs else (result, None)
        terms = monteclora_losses(self.model)
        loss = loss + terms["total"].to(loss.device) / self.regulariser_divisor(num_items_in_batch)
        self._record_regulariser(terms)
        return (loss, outputs) if return_outputs else loss

    def regulariser_divisor(self, num_items_in_batch: torch.Tensor | int | None) -> int:
        """What turns one micro-batch's regulariser into its share of the optimizer step's.

        Mirrors `Trainer.training_step`: when the task loss was normalised by the step's token
        count (`num_items_in_batch`) it already is a share, and `training_step` leaves it alone,
        so the regulariser is divided by the number of micro-batches here; otherwise
        `training_step` divides the sum of both.
        """
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        return self.current_gradient_accumulation_steps if scaled else 1

    def _record_regulariser(self, terms: dict[str, torch.Tensor]) -> None:
        """Queue the terms for the next log (SFTTrainer averages its metrics over the window)."""
        keys = (*REGULARISER_TERMS, "total")
        values = torch.stack([terms[key].detach().float().to(self.accelerator.device) for key in keys])
        values = self.accelerator.reduce(values, reduction="mean")
        for name, value in zip((*REGULARISER_TERMS, REGULARISER_TOTAL), values.tolist(), strict=True):
            self._metrics["train"][name].append(value)

    # -- LoRA+ -----------------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        kwargs.pop("lr", None)
        self.optimizer = create_loraplus_optimizer(
            opt_model,
            optimizer_cls,
            lr=self.args.learning_rate,
            loraplus_lr_ratio=self.loraplus_lr_ratio,
            loraplus_lr_embedding=self.loraplus_lr_embedding,
            loraplus_weight_decay=self.args.weight_decay,
            **kwargs,
        )
        return self.optimizer

    # -- divergence ----------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        non_finite = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.accelerator.reduce(non_finite, reduction="sum").item() > 0:
            if not self.diverged:
                logger.error("non-finite loss at step %d: stopping (status 'diverged')", self.state.global_step + 1)
            self.diverged = True
            self.control.should_training_stop = True
        return loss

    # -- checkpoints -----------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        if self.diverged:
            return  # a diverged model is not worth resuming from
        with _unpruned(self.adalora):
            super()._save_checkpoint(model, trial)  # rotates nothing (see __init__)
        run_dir = Path(self._get_output_dir(trial=trial))
        checkpoint = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.is_monteclora and self.args.should_save:
            # The counter counts training forwards, the same on every rank (noise differs by rank
            # through its seed), so one copy restores all ranks.
            checkpoints.write_sampler_state(checkpoint, sampler_state(self.model))
        if self.adalora is not None and self.args.should_save:
            # Identical on every rank: the allocator reads the all-reduced gradients.
            torch.save(_allocator_state(self.adalora), checkpoint / CHECKPOINT_ADALORA_STATE)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoints.mark_complete(checkpoint, self.state.global_step, num_tokens=int(self._total_train_tokens))
            rotate_checkpoints(str(run_dir), self.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save and self.is_deepspeed_enabled and _is_prompt_learning(self.model):
            # peft's save_pretrained runs the prompt encoder on the saving rank only. Under ZeRO-3
            # that forward changes the rank's module trace, and the ranks' next forwards then run
            # different collectives (a hang): every other rank runs the same forward.
            model = self.accelerator.unwrap_model(self.model)
            with torch.no_grad():
                model.get_prompt_embedding_to_save(model.active_adapter)

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any):
        if resume_from_checkpoint is not None:
            self._total_train_tokens = checkpoints.read_marker(Path(resume_from_checkpoint)).get("num_tokens", 0)
        if resume_from_checkpoint is not None and self.is_monteclora:
            load_sampler_state(self.model, checkpoints.read_sampler_state(Path(resume_from_checkpoint)))
        if resume_from_checkpoint is not None and self.adalora_budget is not None:
            self.adalora_budget.resume_from = Path(resume_from_checkpoint) / CHECKPOINT_ADALORA_STATE
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def _is_prompt_learning(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel) and model.peft_config[model.active_adapter].is_prompt_learning


# -- AdaLoRA ------------------------------------------------------------------------------------
def _adalora_tuner(model: torch.nn.Module) -> AdaLoraModel | None:
    tuner = model.base_model if isinstance(model, PeftModel) else None
    return tuner if isinstance(tuner, AdaLoraModel) else None


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
def _unpruned(tuner: AdaLoraModel | None) -> Iterator[None]:
    """peft saves an AdaLoRA adapter cut to its rank pattern: right for inference, but a resumed
    run goes on training the full matrices, so checkpoints hold them (the pattern is in
    CHECKPOINT_ADALORA_STATE)."""
    if tuner is None:
        yield
        return
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
