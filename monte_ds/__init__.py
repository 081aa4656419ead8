"""monte-ds: MonteCLoRA fine-tuning at scale.

MonteCLoRA is LoRA whose A matrix is re-sampled every training step from a
Gaussian mixture with Wishart covariance and Dirichlet mixture weights; at
inference it is a plain LoRA adapter (the mean).
"""

import logging


# bitsandbytes' CPU backend warns at import, on CPUs with AVX512-BF16, that the optional `kernels`
# package (a faster 4-bit GEMM) is missing; its fallback kernel is what runs, nothing needs doing,
# and the line would come before every monte-ds message (bad input must be one line).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from monte_ds.config import MonteCLoRAConfig
from monte_ds.monteclora import (
    export_lora_adapter,
    get_monteclora_model,
    load_adapter,
    load_sampler_state,
    monteclora_layers,
    monteclora_losses,
    predictive_sampling,
    sampler_state,
    save_adapter,
)
from monte_ds.monteclora.model import monteclora_engines


__all__ = [
    "MonteCLoRAConfig",
    "export_lora_adapter",
    "get_monteclora_model",
    "load_adapter",
    "load_sampler_state",
    "monteclora_engines",
    "monteclora_layers",
    "monteclora_losses",
    "predictive_sampling",
    "sampler_state",
    "save_adapter",
]
__version__ = "0.1.0"
