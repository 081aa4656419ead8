"""`MonteCLoRATrainer`: TRL's SFTTrainer plus what MonteCLoRA needs from a trainer.

- the regulariser (`monteclora_losses(model)["total"]`) added to each micro-batch's loss, scaled
  exactly as the Trainer scales the task loss under gradient accumulation;
- its terms logged separately (progress bar, logs, TensorBoard), averaged over ranks;
- the sampler's noise counter saved in every checkpoint and restored on resume;
- checkpoints marked complete only once every rank has written (see `checkpoints`);
- a non-finite loss on any rank stops the run on every rank, and nothing more is saved.

A plain LoRA model runs through the same class (no regulariser, no sampler state), so the
baseline and MonteCLoRA share one pipeline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTTrainer

from monte_ds.monteclora import load_sampler_state, monteclora_layers, monteclora_losses, sampler_state
from monte_ds.train import checkpoints
from monte_ds.train.model import keep_trainable_fp32

logger = logging.getLogger(__name__)

REGULARISER_TERMS = ("kl_gaussian", "kl_wishart", "kl_dirichlet", "cooperative")
REGULARISER_TOTAL = "regulariser"


class MonteCLoRATrainer(SFTTrainer):
    """`SFTTrainer` with MonteCLoRA's regulariser, logging, resumable noise and safe checkpoints."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.is_monteclora = next(monteclora_layers(self.model), None) is not None
        self.diverged = False
        if self.is_monteclora:
            cast = keep_trainable_fp32(self.model)
            if cast:
                logger.info("kept %d MonteCLoRA parameters in fp32 (TRL had cast them to bf16)", len(cast))

    # -- loss ------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not (self.is_monteclora and self.model.training):
            return result  # evaluation: the eval-mode model is plain LoRA, the loss is the task loss
        loss, outputs = result if return_outputs else (result, None)
        if self.is_deepspeed_enabled:
            _gather_zero3_sampler_parameters(self.model)
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
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None
        return self.current_gradient_accumulation_steps if scaled else 1

    def _record_regulariser(self, terms: dict[str, torch.Tensor]) -> None:
        """Queue the terms for the next log (SFTTrainer averages its metrics over the window)."""
        keys = (*REGULARISER_TERMS, "total")
        values = torch.stack([terms[key].detach().float().to(self.accelerator.device) for key in keys])
        values = self.accelerator.reduce(values, reduction="mean")
        for name, value in zip((*REGULARISER_TERMS, REGULARISER_TOTAL), values.tolist(), strict=True):
            self._metrics["train"][name].append(value)

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
        # Rotation deletes older checkpoints: it must wait until the new one is complete.
        limit, self.args.save_total_limit = self.args.save_total_limit, None
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        run_dir = Path(self._get_output_dir(trial=trial))
        checkpoint = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.is_monteclora and self.args.should_save:
            # The counter counts training forwards, the same on every rank (noise differs by rank
            # through its seed), so one copy restores all ranks.
            checkpoints.write_sampler_state(checkpoint, sampler_state(self.model))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoints.mark_complete(checkpoint, self.state.global_step)
            rotate_checkpoints(str(run_dir), limit, self.state.best_model_checkpoint, use_mtime=True)

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any):
        if resume_from_checkpoint is not None and self.is_monteclora:
            load_sampler_state(self.model, checkpoints.read_sampler_state(Path(resume_from_checkpoint)))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


def _gather_zero3_sampler_parameters(model: torch.nn.Module) -> None:
    """Make v and alpha whole on this rank until the optimizer step.

    The regulariser reads them after the forward. ZeRO-3 keeps parameters under
    `stage3_param_persistence_threshold` whole, but only once it has traced a step: during the
    first step it releases them after their module's forward like any other. A no-op afterwards.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    released = [
        param
        for layer in monteclora_layers(model)
        for param in (layer.wishart_log_scale, layer.concentration_log)
        if getattr(param, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE
    ]
    if released:
        released[0].all_gather(param_list=released)
