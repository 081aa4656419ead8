"""LoRA and DoRA, peft's LoraConfig from the adapter section's LoRA fields."""

from __future__ import annotations

import dataclasses

from peft import LoraConfig

from monte_ds import run_folder
from monte_ds.config import MonteCLoRAConfig
from monte_ds.monteclora.model import lora_config
from monte_ds.train.methods.options import MONTECLORA_LORA_FIELDS, MethodOptions
from monte_ds.train.methods.record import Method


def lora_peft_config(adapter: MonteCLoRAConfig, options: MethodOptions, tokenizer_path: str) -> LoraConfig:
    return lora_config(adapter)


def _dora_peft_config(adapter: MonteCLoRAConfig, options: MethodOptions, tokenizer_path: str) -> LoraConfig:
    return dataclasses.replace(lora_config(adapter), use_dora=True)


LORA = Method(
    name="lora", accepts=MONTECLORA_LORA_FIELDS, output=run_folder.LORA_ADAPTER_DIR, peft_config=lora_peft_config
)
DORA = Method(
    name="dora",
    accepts=MONTECLORA_LORA_FIELDS - {"use_dora"},  # implied
    output=run_folder.LORA_ADAPTER_DIR,
    peft_config=_dora_peft_config,
)
