"""LoRA+: a LoRA adapter trained by peft's LoRA+ optimizer, B learning `loraplus_lr_ratio` times faster than A."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft.optimizers import create_loraplus_optimizer

from monte_ds import run_folder
from monte_ds.train.methods.lora import lora_peft_config
from monte_ds.train.methods.options import MONTECLORA_LORA_FIELDS, MethodOptions
from monte_ds.train.methods.record import Method, TrainerHooks


if TYPE_CHECKING:
    from monte_ds.train.trainer import MonteCLoRATrainer


class LoraPlusHooks(TrainerHooks):
    def __init__(self, lr_ratio: float, lr_embedding: float) -> None:
        self.lr_ratio = lr_ratio
        self.lr_embedding = lr_embedding

    def create_optimizer(self, trainer: MonteCLoRATrainer, model: torch.nn.Module) -> torch.optim.Optimizer:
        optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
        kwargs.pop("lr", None)
        return create_loraplus_optimizer(
            model,
            optimizer_cls,
            lr=trainer.args.learning_rate,
            loraplus_lr_ratio=self.lr_ratio,
            loraplus_lr_embedding=self.lr_embedding,
            loraplus_weight_decay=trainer.args.weight_decay,
            **kwargs,
        )


def _hooks(options: MethodOptions) -> LoraPlusHooks:
    return LoraPlusHooks(options.loraplus_lr_ratio, options.loraplus_lr_embedding)


LORAPLUS = Method(
    name="loraplus",
    accepts=MONTECLORA_LORA_FIELDS | {"loraplus_lr_ratio", "loraplus_lr_embedding"},
    output=run_folder.LORA_ADAPTER_DIR,
    peft_config=lora_peft_config,
    hooks=_hooks,
)
