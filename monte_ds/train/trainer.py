"""`MonteCLoRATrainer`: TRL's SFTTrainer plus what a training method needs from a trainer.

The method comes as its record (`monte_ds.train.methods.Method`, MonteCLoRA's by default), whose
`TrainerHooks` the trainer calls: MonteCLoRA's regulariser and sampler state, AdaLoRA's rank
budget, orthogonality term and allocator state, LoRA+'s optimizer, prompt tuning's mirrored save.
For every method, the trainer:

- adds the method's regulariser to each micro-batch's loss, scaled exactly as the Trainer scales
  the task loss under gradient accumulation, and logs its values (averaged over ranks);
- restores on resume what checkpoints hold beyond the Trainer's (the method's state, TRL's token count);
- marks checkpoints complete only once every rank has written (see `checkpoints`);
- stops the run on every rank when any rank's loss is non-finite, and saves nothing more;
- exits with a message when a multi-rank run stops making progress (`watchdog`), never hangs.

Private Trainer/TRL hooks it still relies on, because no public one can do the job (their
names and signatures are pinned by tests/test_private_hooks.py and by pyproject.toml's bounds):

- `_save_checkpoint`: no event runs around the Trainer's writing of a checkpoint, and three things
  must: AdaLoRA's matrices are written unpruned, a diverged run writes none, and the marker
  follows every rank's files and the method's state, before older checkpoints are rotated. It
  calls `_get_output_dir` for the folder the Trainer just wrote.
- `_save`: prompt tuning's mirrored forward on the non-saving ranks must follow rank 0's
  `save_pretrained` at once, before any later collective of `save_model` (DeepSpeed's).
- `_total_train_tokens`: TRL's count of trained tokens, which its checkpoints lack; set on resume.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints
from trl import SFTConfig, SFTTrainer

from monte_ds.train import checkpoints
from monte_ds.train.methods import MONTECLORA, Method, MethodOptions
from monte_ds.train.watchdog import StallWatchdog


logger = logging.getLogger(__name__)


class MonteCLoRATrainer(SFTTrainer):
    """`SFTTrainer` with a method's hooks (by default MonteCLoRA's), divergence stop and safe checkpoints."""

    def __init__(
        self,
        model: Any = None,
        args: SFTConfig | None = None,
        *rest: Any,
        method: Method = MONTECLORA,
        method_options: MethodOptions | None = None,
        **kwargs: Any,
    ) -> None:
        self.method = method
        self.hooks = method.hooks(method_options or MethodOptions())
        # The Trainer rotates checkpoints before the new one is complete: its copy of the arguments
        # keeps none, and `_save_checkpoint` rotates to `save_total_limit` once the new one is.
        self.save_total_limit = None if args is None else args.save_total_limit
        if self.save_total_limit is not None:
            args = copy.copy(args)
            args.save_total_limit = None
        super().__init__(model, args, *rest, **kwargs)
        self.regulariser_logs: defaultdict[str, list[float]] = defaultdict(list)  # until the next log
        self.diverged = False
        if self.args.world_size > 1:
            self.add_callback(StallWatchdog(self.args.ddp_timeout, self.args.process_index))
        self.hooks.setup(self)

    @property
    def is_monteclora(self) -> bool:
        return self.method.name == MONTECLORA.name

    # -- loss ------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        if not self.model.training:
            return result  # evaluation: the eval-mode model is plain LoRA, the loss is the task loss
        regulariser = self.hooks.regulariser(self.model)
        if regulariser is None:
            return result
        loss, outputs = result if return_outputs else (result, None)
        loss = loss + regulariser.term.to(loss.device) / self.regulariser_divisor(num_items_in_batch)
        self._record(regulariser.logged)
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

    def _record(self, logged: Mapping[str, torch.Tensor]) -> None:
        """Queue the values, averaged over ranks (one collective), for the next log."""
        values = torch.stack([value.detach().to(self.accelerator.device) for value in logged.values()])
        values = self.accelerator.reduce(values, reduction="mean")
        for name, value in zip(logged, values.tolist(), strict=True):
            self.regulariser_logs[name].append(value)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """A training log also holds the regulariser's values, averaged over its window (as TRL's metrics)."""
        if self.model.training:
            logs.update({name: sum(values) / len(values) for name, values in self.regulariser_logs.items()})
            self.regulariser_logs.clear()
        super().log(logs, start_time)

    # -- optimizer --------------------------------------------------------------------------------
    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        optimizer = None
        if self.optimizer is None:
            optimizer = self.hooks.create_optimizer(self, self.model if model is None else model)
        if optimizer is None:
            return super().create_optimizer(model)
        self.optimizer = optimizer
        return optimizer

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
        with self.hooks.saving_checkpoint(self):
            super()._save_checkpoint(model, trial)  # rotates nothing (see __init__)
        run_dir = Path(self._get_output_dir(trial=trial))
        checkpoint = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            self.hooks.save_checkpoint_state(self, checkpoint)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoints.mark_complete(checkpoint, self.state.global_step, num_tokens=int(self._total_train_tokens))
            rotate_checkpoints(str(run_dir), self.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        self.hooks.after_save(self)

    def train(self, resume_from_checkpoint: str | None = None, **kwargs: Any):
        if resume_from_checkpoint is not None:
            checkpoint = Path(resume_from_checkpoint)
            self._total_train_tokens = checkpoints.read_marker(checkpoint).get("num_tokens", 0)
            self.hooks.resume(self, checkpoint)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
