"""`Method`: everything the pipeline knows about one `adapter.method`, in one record, and
`TrainerHooks`, what a method adds to `MonteCLoRATrainer`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
from peft import PeftConfig, get_peft_model
from transformers import PreTrainedModel

from monte_ds.atomic import atomic_directory
from monte_ds.config import MonteCLoRAConfig
from monte_ds.errors import UserError
from monte_ds.train.methods.options import MethodOptions


if TYPE_CHECKING:
    from monte_ds.train.trainer import MonteCLoRATrainer

PeftConfigBuilder = Callable[[MonteCLoRAConfig, MethodOptions, str], PeftConfig]
Attach = Callable[[PreTrainedModel, MonteCLoRAConfig], torch.nn.Module]
Save = Callable[["MonteCLoRATrainer", Path], None]


class Regulariser(NamedTuple):
    """A micro-batch's term added to the training loss, and the values logged for it (name: scalar)."""

    term: torch.Tensor
    logged: Mapping[str, torch.Tensor]


class TrainerHooks:
    """What one method adds to `MonteCLoRATrainer`, called at fixed points; this base adds nothing."""

    def setup(self, trainer: MonteCLoRATrainer) -> None:
        """Once the Trainer is built: add callbacks, fix dtypes."""

    def regulariser(self, model: torch.nn.Module) -> Regulariser | None:
        """The extra term of this training micro-batch's loss, read after its forward; None: none."""
        return None

    def create_optimizer(self, trainer: MonteCLoRATrainer, model: torch.nn.Module) -> torch.optim.Optimizer | None:
        """An optimizer of the method's own; None: the Trainer's."""
        return None

    def saving_checkpoint(self, trainer: MonteCLoRATrainer) -> AbstractContextManager[None]:
        """Held while the Trainer writes a checkpoint."""
        return nullcontext()

    def save_checkpoint_state(self, trainer: MonteCLoRATrainer, checkpoint: Path) -> None:
        """Write the method's own state into `checkpoint` (main process, before it is marked complete)."""

    def resume(self, trainer: MonteCLoRATrainer, checkpoint: Path) -> None:
        """Restore the method's own state from `checkpoint`, before training resumes."""

    def after_save(self, trainer: MonteCLoRATrainer) -> None:
        """After the Trainer has saved the model, on every rank."""


@dataclass(frozen=True)
class Setup:
    """The rest of the config, as far as a method can refuse it."""

    quantized: bool
    zero_stage: int | None
    fsdp: bool


@dataclass(frozen=True)
class Refusal:
    """A setup the method cannot run in (`applies`), and the one-line error naming `key` that says why."""

    applies: Callable[[Setup], bool]
    key: str
    reason: str

    def check(self, setup: Setup) -> None:
        if self.applies(setup):
            raise UserError(self.reason, key=self.key)


@dataclass(frozen=True)
class Method:
    """One `adapter.method`: its options, adapter, output, refusals and trainer hooks.

    A peft method gives its `peft_config`; MonteCLoRA and full fine-tuning, which have none,
    `attach_with` instead. `output` is the run folder entry (`run_folder.*_DIR`) that inference
    needs; `save_with` replaces the Trainer's `save_model` into it.
    """

    name: str
    accepts: frozenset[str]
    output: str
    peft_config: PeftConfigBuilder | None = None
    attach_with: Attach | None = None
    save_with: Save | None = None
    saves_model: bool = False  # `output` is a whole model, not an adapter of the base
    refusals: tuple[Refusal, ...] = ()
    check_options: Callable[[MonteCLoRAConfig, MethodOptions], None] | None = None  # rules across options
    hooks: Callable[[MethodOptions], TrainerHooks] = field(default=lambda options: TrainerHooks())

    def __post_init__(self) -> None:
        if (self.peft_config is None) == (self.attach_with is None):
            raise ValueError(f"method {self.name!r}: give exactly one of peft_config and attach_with")

    @property
    def targets_modules(self) -> bool:
        return "target_modules" in self.accepts

    def attach(
        self, model: PreTrainedModel, adapter: MonteCLoRAConfig, options: MethodOptions, tokenizer_path: str
    ) -> torch.nn.Module:
        """`model` with the method's adapter (set the seed first: it initialises the adapter)."""
        if self.attach_with is not None:
            return self.attach_with(model, adapter)
        return get_peft_model(model, self.peft_config(adapter, options, tokenizer_path))

    def check_setup(self, setup: Setup) -> None:
        for refusal in self.refusals:
            refusal.check(setup)

    def inference_dir(self, output_dir: Path) -> Path:
        return output_dir / self.output

    def save(self, trainer: MonteCLoRATrainer, output_dir: Path) -> None:
        """Save what inference needs; collective under ZeRO-3/FSDP2, so every rank calls it. The
        Trainer's `save_model` gathers the parameters on every backend."""
        if self.save_with is not None:
            self.save_with(trainer, output_dir)
            return
        directory = self.inference_dir(output_dir)
        with atomic_directory(directory) if trainer.args.should_save else nullcontext(directory) as target:
            trainer.save_model(str(target))
