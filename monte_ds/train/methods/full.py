"""Full fine-tuning: no adapter, every weight trained, the whole model saved."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from monte_ds import run_folder
from monte_ds.config import MonteCLoRAConfig
from monte_ds.train.methods.record import Method, Refusal


def _no_adapter(model: PreTrainedModel, adapter: MonteCLoRAConfig) -> torch.nn.Module:
    return model


FULL = Method(
    name="full",
    accepts=frozenset(),
    output=run_folder.MODEL_DIR,
    attach_with=_no_adapter,
    saves_model=True,
    refusals=(
        Refusal(
            lambda setup: setup.quantized,
            "quantization.mode",
            "full fine-tuning trains every weight, and quantized weights cannot be trained",
        ),
    ),
)
