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
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import Partial

from monte_ds.config import MonteCLoRAConfig
from monte_ds.monteclora.math import (
    STREAM_DIRICHLET,
    STREAM_INIT,
    STREAM_PREDICTIVE,
    STREAM_PREDICTIVE_DIRICHLET,
    STREAM_TRAIN,
    cooperative_loss,
    dirichlet_rsample,
    kl_dirichlet,
    kl_gaussian,
    kl_wishart,
    seeded_generator,
    stream_seed,
)
from monte_ds.monteclora.sampler import LayerShape, NoiseSource

# Parameter names: they contain "lora_" so peft marks, saves and loads them with the adapter.
WISHART_PARAM = "wishart_log_scale"
DIRICHLET_PARAM = "concentration_log"
EXTRA_PARAMS = (WISHART_PARAM, DIRICHLET_PARAM)
# The mixture weights of a forward come from their own stream, paired with the noise stream.
_MIXTURE_STREAM = {STREAM_TRAIN: STREAM_DIRICHLET, STREAM_PREDICTIVE: STREAM_PREDICTIVE_DIRICHLET}


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter FSDP2 keeps sharded outside the forward (a differentiable
    all-gather). Each rank's regulariser differs (its own noise), so the gradient flowing back is
    averaged over ranks, as FSDP does for the task loss; plain tensors pass through."""
    return param.full_tensor(grad_placements=[Partial("avg")]) if isinstance(param, DTensor) else param


class MonteCLoRALinearA(nn.Linear):
    """A = mu + epsilon * ||pi||_2 * diag(sqrt v) * L_B * Z in training; A = mu in eval.

    Trainable: `weight` (mu), `wishart_log_scale` (ln v, shape r x 1: it scales A's rows) and
    `concentration_log` (ln alpha, shape 1 x N). Parameterised in log space so v and alpha stay
    positive without clipping, and ln det V is exact. Stored 2-D because peft flags 1-D tensors
    under `lora_A` as unsharded ZeRO-3 leftovers when it saves.
    """

    def __init__(self, lora_a: nn.Linear, config: MonteCLoRAConfig, source: NoiseSource) -> None:
        super().__init__(lora_a.in_features, lora_a.out_features, bias=False, device="meta")
        self.weight = lora_a.weight  # the mean: peft's parameter itself
        self.sample_scaler = config.sample_scaler
        self.sparse_mixture = config.sparse_mixture
        self.dirichlet_prior = config.dirichlet_prior
        self.dof = config.degrees_of_freedom
        self.source = source
        self.layer_index = source.register(LayerShape(self.out_features, self.in_features, self.dof))
        # (forward index, row_sq, log_det) of the last training forward: what the KL needs.
        self.last_forward: tuple[int, torch.Tensor, torch.Tensor] | None = None
        device = self.weight.device
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
        return self._log_v().exp()

    @property
    def concentration(self) -> torch.Tensor:
        """alpha > 0, the Dirichlet concentration of the mixture weights."""
        return self._log_alpha().exp()

    def _log_v(self) -> torch.Tensor:
        return _full(self.wishart_log_scale).float().flatten()

    def _log_alpha(self) -> torch.Tensor:
        return _full(self.concentration_log).float().flatten()

    def mixture_weights(self, stream: int, index: int) -> torch.Tensor:
        """pi ~ Dir(alpha), reparameterised, from the (seed, rank, stream, index, layer) stream."""
        alpha = self.concentration
        generator = seeded_generator(alpha.device, self.source.key_seed(stream, index, self.layer_index))
        return dirichlet_rsample(alpha, generator)

    def _draw_key(self) -> tuple[int, int] | None:
        """(noise stream, index) of this forward, or None where the mean is used."""
        if self.training:
            return STREAM_TRAIN, self.source.current_index
        if self.source.predictive_draw is not None:
            return STREAM_PREDICTIVE, self.source.predictive_draw
        return None

    def sampled_weight(self) -> torch.Tensor:
        """The weight used by this forward: the mean, or the mean plus this forward's noise."""
        key = self._draw_key()
        if key is None:
            return self.weight
        stream, index = key
        draw = self.source.take((stream, index, self.layer_index), self.weight.device)
        if stream == STREAM_TRAIN:
            self.last_forward = (index, draw.row_sq, draw.log_det)
        with torch.autocast(self.weight.device.type, enabled=False):
            if self.sparse_mixture:
                mixture_norm = draw.noise.new_ones(())  # one-hot(argmax pi) has norm 1
            else:
                mixture_norm = self.mixture_weights(_MIXTURE_STREAM[stream], index).norm()
            row_scale = self.sample_scaler * mixture_norm * (0.5 * self.wishart_log_scale.float()).exp()
            delta = row_scale * draw.noise
        return self.weight + delta.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sampled_weight())

    def regularizers(self) -> dict[str, torch.Tensor]:
        """KL_N, KL_W, KL_D and the cooperative loss of the last training forward, in fp32.

        Recomputed from the seeded streams rather than kept from the forward, so they have
        gradients even when the forward ran without autograd (reentrant checkpointing).
        """
        if self.last_forward is None:
            raise RuntimeError("monteclora_losses: no training-mode forward has run yet")
        index, row_sq, log_det = self.last_forward
        with torch.autocast(self.weight.device.type, enabled=False):
            log_v = self._log_v()
            alpha = self.concentration
            pi = self.mixture_weights(STREAM_DIRICHLET, index)
            return {
                "kl_gaussian": kl_gaussian(log_v, row_sq.to(log_v.device), log_det.to(log_v.device)),
                "kl_wishart": kl_wishart(log_v, self.dof),
                "kl_dirichlet": kl_dirichlet(alpha, self.dirichlet_prior),
                "cooperative": cooperative_loss(pi),
            }

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, r={self.out_features}, "
            f"n_components={self.concentration_log.numel()}, sample_scaler={self.sample_scaler}"
        )
