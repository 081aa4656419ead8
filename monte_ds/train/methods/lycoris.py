"""LoHa and LoKr, peft's LyCORIS adapters (Hadamard and Kronecker products of low-rank factors).

They read the adapter section's `lora_alpha` as their `alpha`, so LoRA-like methods share one base config.
"""

from __future__ import annotations

from typing import Any

from peft import LoHaConfig, LoKrConfig

from monte_ds import run_folder
from monte_ds.config import MonteCLoRAConfig
from monte_ds.train.methods.options import TARGETING, MethodOptions
from monte_ds.train.methods.record import Method, Refusal


_ACCEPTS = TARGETING | {"r", "lora_alpha", "rank_dropout", "module_dropout"}


def _lycoris_fields(adapter: MonteCLoRAConfig, options: MethodOptions) -> dict[str, Any]:
    return {
        "task_type": "CAUSAL_LM",
        "target_modules": adapter.resolved_target_modules,
        "modules_to_save": adapter.modules_to_save,
        "r": adapter.r,
        "alpha": adapter.lora_alpha,
        "rank_dropout": options.rank_dropout,
        "module_dropout": options.module_dropout,
    }


def _loha_config(adapter: MonteCLoRAConfig, options: MethodOptions, tokenizer_path: str) -> LoHaConfig:
    return LoHaConfig(**_lycoris_fields(adapter, options))


def _lokr_config(adapter: MonteCLoRAConfig, options: MethodOptions, tokenizer_path: str) -> LoKrConfig:
    return LoKrConfig(
        **_lycoris_fields(adapter, options),
        decompose_both=options.decompose_both,
        decompose_factor=options.decompose_factor,
    )


def _not_quantized(name: str) -> Refusal:
    return Refusal(
        lambda setup: setup.quantized, "quantization.mode", f"peft's {name} has no bitsandbytes layers; use none"
    )


LOHA = Method(
    name="loha",
    accepts=_ACCEPTS,
    output=run_folder.PEFT_ADAPTER_DIR,
    peft_config=_loha_config,
    refusals=(
        _not_quantized("loha"),
        Refusal(
            lambda setup: setup.zero_stage == 3,
            "distributed.deepspeed",
            "peft's LoHa sizes its factors from the base weight's shape, which ZeRO-3 partitions "
            "before the adapter is attached; use ZeRO-2 or FSDP2",
        ),
    ),
)
LOKR = Method(
    name="lokr",
    accepts=_ACCEPTS | {"decompose_both", "decompose_factor"},
    output=run_folder.PEFT_ADAPTER_DIR,
    peft_config=_lokr_config,
    refusals=(_not_quantized("lokr"),),
)
