"""MonteCLoRA on peft LoRA layers: math, sampler, layer, model dispatch and adapter I/O."""

from monte_ds.monteclora.io import export_lora_adapter, load_adapter, save_adapter
from monte_ds.monteclora.layer import MonteCLoRALinearA
from monte_ds.monteclora.model import (
    get_monteclora_model,
    load_sampler_state,
    monteclora_layers,
    monteclora_losses,
    predictive_sampling,
    sampler_state,
)


__all__ = [
    "MonteCLoRALinearA",
    "export_lora_adapter",
    "get_monteclora_model",
    "load_adapter",
    "load_sampler_state",
    "monteclora_layers",
    "monteclora_losses",
    "predictive_sampling",
    "sampler_state",
    "save_adapter",
]
