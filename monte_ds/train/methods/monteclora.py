"""MonteCLoRA: monte-ds's own adapter (LoRA with a Bayesian, sampled A), its regulariser in the
training loss and its sampler's noise counter in every checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from monte_ds import run_folder
from monte_ds.config import MonteCLoRAConfig
from monte_ds.errors import InputError
from monte_ds.monteclora import (
    export_lora_adapter,
    get_monteclora_model,
    load_sampler_state,
    monteclora_layers,
    monteclora_losses,
    sampler_state,
    save_adapter,
)
from monte_ds.monteclora.engine import REGULARISER_TERMS
from monte_ds.train import checkpoints
from monte_ds.train.methods.options import MONTECLORA_FIELDS
from monte_ds.train.methods.record import Method, Regulariser, TrainerHooks


if TYPE_CHECKING:
    from monte_ds.train.trainer import MonteCLoRATrainer

logger = logging.getLogger(__name__)

REGULARISER_TOTAL = "regulariser"  # the logged name of the whole term, beside REGULARISER_TERMS


class MonteCLoRAHooks(TrainerHooks):
    def setup(self, trainer: MonteCLoRATrainer) -> None:
        if next(monteclora_layers(trainer.model), None) is None:
            raise InputError(
                "MonteCLoRATrainer trains MonteCLoRA unless given another method's record "
                "(method=monte_ds.train.methods.REGISTRY[name]); this model has no MonteCLoRA layers"
            )
        cast = keep_trainable_fp32(trainer.model)
        if cast:
            logger.info("kept %d MonteCLoRA parameters in fp32 (TRL had cast them to bf16)", len(cast))

    def regulariser(self, model: torch.nn.Module) -> Regulariser:
        terms = monteclora_losses(model)
        logged = {name: terms[name].float() for name in REGULARISER_TERMS}
        return Regulariser(terms["total"], {**logged, REGULARISER_TOTAL: terms["total"].float()})

    def save_checkpoint_state(self, trainer: MonteCLoRATrainer, checkpoint: Path) -> None:
        # The counter counts training forwards, the same on every rank (noise differs by rank
        # through its seed), so one copy restores all ranks.
        checkpoints.write_sampler_state(checkpoint, sampler_state(trainer.model))

    def resume(self, trainer: MonteCLoRATrainer, checkpoint: Path) -> None:
        load_sampler_state(trainer.model, checkpoints.read_sampler_state(checkpoint))


def keep_trainable_fp32(model: torch.nn.Module) -> list[str]:
    """Cast the trainable parameters back to fp32 and return their names.

    TRL casts a QLoRA adapter to bf16: MonteCLoRA's epsilon-scaled perturbation of A would round
    away in bf16, and A's fp32 output must meet an fp32 B.
    """
    cast = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
            cast.append(name)
    return cast


def _attach(model: PreTrainedModel, adapter: MonteCLoRAConfig) -> torch.nn.Module:
    return get_monteclora_model(model, adapter)


def _save(trainer: MonteCLoRATrainer, output_dir: Path) -> None:
    """The MonteCLoRA adapter (what inference loads), and its posterior mean as a plain peft LoRA adapter."""
    save_adapter(trainer.model, output_dir / run_folder.ADAPTER_DIR)
    export_lora_adapter(trainer.model, output_dir / run_folder.LORA_ADAPTER_DIR)


MONTECLORA = Method(
    name="monteclora",
    accepts=MONTECLORA_FIELDS,
    output=run_folder.ADAPTER_DIR,
    attach_with=_attach,
    save_with=_save,
    hooks=lambda options: MonteCLoRAHooks(),
)
