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
from monte_ds.monteclora.engine import LOG_PARAMS, MonteCLoRAEngine
from monte_ds.monteclora.math import STREAM_INIT, seeded_generator, stream_seed


# The adapter's ln v and ln alpha, stacked for all layers of a device into one parameter held by
# the first layer's A (its name is under `lora_A`, so peft marks, saves and loads it with the
# adapter). Adapters saved before held one (r, 1) and one (1, N) parameter per layer, under the
# legacy names; `io.load_adapter` converts them.
LEGACY_PARAMS = ("wishart_log_scale", "concentration_log")
EXTRA_PARAMS = (LOG_PARAMS, *LEGACY_PARAMS)


class MonteCLoRALinearA(nn.Linear):
    """A = mu + epsilon * ||pi||_2 * diag(sqrt v) * L_B * Z in training; A = mu in eval.

    Trainable: `weight` (mu), and this layer's row of the adapter's stacked `monteclora_log_params`
    (ln v, r values: they scale A's rows; ln alpha, N values), read through the views
    `wishart_log_scale` (r x 1) and `concentration_log` (1 x N). Parameterised in log space so v
    and alpha stay positive without clipping, and ln det V is exact. One stacked tensor per adapter
    instead of two per layer: each parameter tensor costs a gradient accumulation, the optimizer's
    per-tensor work and, sharded, a collective (docs/performance.md). A forward's weight delta
    (row scale times noise) comes from the adapter's engine, computed for all layers at once.
    """

    def __init__(
        self, lora_a: nn.Linear, config: MonteCLoRAConfig, engine: MonteCLoRAEngine, seeded_init: bool = True
    ) -> None:
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
        # Plain tensors until the engine stacks every layer's into the adapter's parameter.
        self.initial_log_params: tuple[torch.Tensor, torch.Tensor] | None = (
            torch.zeros(self.out_features, device=device, dtype=torch.float32),
            self._initial_log_concentration(config, device),
        )

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
    def wishart_log_scale(self) -> torch.Tensor:
        """ln v (r x 1): a view of this layer's row of the stacked parameter (writable under no_grad)."""
        return self.engine.log_params_row(self)[: self.out_features].unsqueeze(-1)

    @property
    def concentration_log(self) -> torch.Tensor:
        """ln alpha (1 x N): a view of this layer's row of the stacked parameter."""
        row = self.engine.log_params_row(self)
        return row[row.shape[0] - self.engine.config.n_components :].unsqueeze(0)

    def log_params_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer's rows of the stacked parameter's gradient: (ln v (r x 1), ln alpha (1 x N))."""
        stack, slot = self.engine.row_of(self)
        grad = self.engine.stacked_parameters()[stack].grad
        if grad is None:
            return None
        n = self.engine.config.n_components
        return grad[slot, : self.out_features].unsqueeze(-1), grad[slot, grad.shape[1] - n :].unsqueeze(0)

    @property
    def wishart_scale(self) -> torch.Tensor:
        """v > 0, the diagonal of the Wishart scale matrix V."""
        return self.engine.log_params_row(self, full=True)[: self.out_features].exp()

    @property
    def concentration(self) -> torch.Tensor:
        """alpha > 0, the Dirichlet concentration of the mixture weights."""
        return self.engine.log_params_row(self, full=True)[-self.engine.config.n_components :].exp()

    def sampled_weight(self) -> torch.Tensor:
        """The weight used by this forward: the mean, or the mean plus this forward's noise."""
        delta = self.engine.weight_delta(self)
        if delta is None:
            return self.weight
        if delta.dtype != self.weight.dtype:  # bf16 weights: later forwards compute deltas in their dtype
            self.engine.note_weight_dtype(self, self.weight.dtype)
            delta = delta.to(self.weight.dtype)
        return self.weight + delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sampled_weight())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, r={self.out_features}, "
            f"n_components={self.engine.config.n_components}, sample_scaler={self.engine.config.sample_scaler}"
        )
