"""MonteCLoRA's A: the LoRA down-projection whose weight is re-sampled every training forward.

It replaces peft's `lora_A[adapter]` inside any peft LoRA linear layer (full precision or
bitsandbytes 4/8-bit): peft's layer calls `lora_B(lora_A(dropout(x))) * scaling`, so the base
layer's kernel is untouched and the noise is applied on quantized bases too. The mean weight
is peft's own `lora_A` parameter (same object, same name), so at eval the layer is exactly
plain LoRA and peft's merge/unmerge see the mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from monte_ds.config import MonteCLoRAConfig
from monte_ds.monteclora.engine import MonteCLoRAEngine, full_fp32
from monte_ds.monteclora.math import STREAM_INIT, seeded_generator, stream_seed

# Parameter names: they contain "lora_" so peft marks, saves and loads them with the adapter.
WISHART_PARAM = "wishart_log_scale"
DIRICHLET_PARAM = "concentration_log"
EXTRA_PARAMS = (WISHART_PARAM, DIRICHLET_PARAM)


class MonteCLoRALinearA(nn.Linear):
    """A = mu + epsilon * ||pi||_2 * diag(sqrt v) * L_B * Z in training; A = mu in eval.

    Trainable: `weight` (mu), `wishart_log_scale` (ln v, shape r x 1: it scales A's rows) and
    `concentration_log` (ln alpha, shape 1 x N). Parameterised in log space so v and alpha stay
    positive without clipping, and ln det V is exact. Stored 2-D because peft flags 1-D tensors
    under `lora_A` as unsharded ZeRO-3 leftovers when it saves. The noise and the row scale of a
    forward come from the adapter's engine, drawn for all layers at once.
    """

    def __init__(self, lora_a: nn.Linear, config: MonteCLoRAConfig, engine: MonteCLoRAEngine, seeded_init: bool = True) -> None:
        super().__init__(lora_a.in_features, lora_a.out_features, bias=False, device="meta")
        self.weight = lora_a.weight  # the mean: peft's parameter itself
        # nu defaults to this layer's own rank (ranks may differ per layer).
        self.dof = float(self.out_features if config.wishart_df is None else config.wishart_df)
        self.engine = engine
        self.adapter_name = engine.adapter_name
        self.layer_index = engine.register(self)
        device = self.weight.device
        if seeded_init:
            self._seeded_mean_init(config)
        self.wishart_log_scale = nn.Parameter(torch.zeros(self.out_features, 1, device=device, dtype=torch.float32))
        self.concentration_log = nn.Parameter(self._initial_log_concentration(config, device).unsqueeze(0))

    def _seeded_mean_init(self, config: MonteCLoRAConfig) -> None:
        """Re-draw peft's Kaiming-uniform init of A from (seed, layer) instead of the global RNG,
        so two models built with the same seed are identical. Skipped where the weight is not
        materialised (meta device, or already partitioned by ZeRO-3 init)."""
        if self.weight.device.type == "meta" or self.weight.shape != (self.out_features, self.in_features):
            return
        generator = seeded_generator(torch.device("cpu"), stream_seed(config.seed, STREAM_INIT, 0, self.layer_index))
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)), as peft
        uniform = torch.rand(self.weight.shape, generator=generator, dtype=torch.float32)
        with torch.no_grad():
            self.weight.copy_((2 * uniform - 1) * bound)

    def _initial_log_concentration(self, config: MonteCLoRAConfig, device: torch.device) -> torch.Tensor:
        n = config.n_components
        if config.dirichlet_init == "ones" or device.type == "meta":
            return torch.zeros(n, device=device, dtype=torch.float32)
        # U(0, 1) init (paper §6.4), seeded by (seed, layer) so two builds agree.
        generator = seeded_generator(torch.device("cpu"), stream_seed(config.seed, STREAM_INIT, 1, self.layer_index))
        uniform = torch.rand(n, generator=generator, dtype=torch.float32).clamp_min(1e-6)
        return uniform.log().to(device)

    @property
    def wishart_scale(self) -> torch.Tensor:
        """v > 0, the diagonal of the Wishart scale matrix V."""
        return full_fp32(self.wishart_log_scale).flatten().exp()

    @property
    def concentration(self) -> torch.Tensor:
        """alpha > 0, the Dirichlet concentration of the mixture weights."""
        return full_fp32(self.concentration_log).flatten().exp()

    def sampled_weight(self) -> torch.Tensor:
        """The weight used by this forward: the mean, or the mean plus this forward's noise."""
        noise = self.engine.weight_noise(self)
        if noise is None:
            return self.weight
        row_scale, draw = noise
        delta = row_scale * draw
        if delta.dtype != self.weight.dtype:
            delta = delta.to(self.weight.dtype)
        return self.weight + delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sampled_weight())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, r={self.out_features}, "
            f"n_components={self.concentration_log.shape[-1]}, sample_scaler={self.engine.config.sample_scaler}"
        )
