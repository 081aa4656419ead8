"""The MonteCLoRA math (docs/math.md): seeded streams, batched Bartlett and Dirichlet draws, KL terms.

Everything here is pure: tensors in, tensors out. Randomness comes only from explicit
generators seeded by `stream_seed(...)`, never from the global torch RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable
from torch.distributions.dirichlet import _Dirichlet_backward  # torch's own implicit gradient


_MASK64 = (1 << 64) - 1

# Stream tags: each use of randomness draws from its own stream.
STREAM_TRAIN = 0  # training forwards
STREAM_DIRICHLET = 1  # the mixture weights pi of a training forward
STREAM_INIT = 2  # parameter initialisation (uniform Dirichlet init)
STREAM_PREDICTIVE = 3  # posterior-predictive draws at evaluation
STREAM_PREDICTIVE_DIRICHLET = 4


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(*keys: int) -> int:
    """A 63-bit seed that is a deterministic, well-mixed function of integer keys
    (e.g. seed, rank, stream, forward index, layer index)."""
    h = 0
    for key in keys:
        h = _splitmix64(h ^ (key & _MASK64))
    return h & ((1 << 63) - 1)


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class BartlettDraw:
    """The parameter-free part of the noise of `count` equally shaped layers for one forward.

    `noise[l] = L_B[l] @ Z[l]` (r x n_in) with L_B[l] the Bartlett factor of a W_r(I, nu) draw
    and Z[l] standard normal; `row_sq[l, i] = sum_j L_B[l, i, j]^2` and
    `log_det[l] = ln det(L_B[l] L_B[l]^T)` are what the Gaussian KL needs. With V = diag(v):
    chol(Sigma) = diag(sqrt v) L_B exactly.
    """

    noise: torch.Tensor  # (count, r, n_in)
    row_sq: torch.Tensor  # (count, r)
    log_det: torch.Tensor  # (count,)


def draw_bartlett(
    count: int, rank: int, n_in: int, dof: float, generator: torch.Generator, device: torch.device
) -> BartlettDraw:
    """Draw Z, the Bartlett normals and the chi-square diagonals of `count` layers, in that
    fixed order, in fp32, as a handful of batched ops."""
    z = torch.randn(count, rank, n_in, generator=generator, device=device, dtype=torch.float32)
    lower = torch.randn(count, rank, rank, generator=generator, device=device, dtype=torch.float32).tril_(-1)
    # c_i ~ chi2(nu - i) = 2 * Gamma((nu - i) / 2)
    half_dof = (dof - torch.arange(rank, device=device, dtype=torch.float32)) / 2
    chi2 = 2 * torch._standard_gamma(half_dof.expand(count, rank).contiguous(), generator=generator)
    chol = lower + torch.diag_embed(chi2.sqrt())
    return BartlettDraw(noise=torch.bmm(chol, z), row_sq=chol.square().sum(-1), log_det=chi2.log().sum(-1))


def dirichlet_sample(concentration: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Dirichlet draws, one per row of `concentration`, from an explicit generator (no gradient:
    attach one with `dirichlet_attach`)."""
    return torch._sample_dirichlet(concentration.detach(), generator=generator)


class _DirichletAttach(torch.autograd.Function):
    """The value of a Dirichlet sample drawn from `concentration`, with the implicit
    reparameterisation gradient of torch.distributions' rsample (batched over rows)."""

    @staticmethod
    def forward(ctx, concentration: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(sample, concentration)
        return sample.view_as(sample)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        sample, concentration = ctx.saved_tensors
        return _Dirichlet_backward(sample, concentration, grad_output), None


def dirichlet_attach(concentration: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    return _DirichletAttach.apply(concentration, sample)


def dirichlet_rsample(concentration: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """pi ~ Dir(concentration), reparameterised, one draw per row."""
    return dirichlet_attach(concentration, dirichlet_sample(concentration, generator))


def kl_gaussian(log_v: torch.Tensor, row_sq: torch.Tensor, log_det_bartlett: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, Sigma) || N(mu, I)) = 1/2 (tr Sigma - ln det Sigma - r), Sigma = diag(sqrt v) L_B L_B^T diag(sqrt v).

    Batched over leading dimensions: `log_v` and `row_sq` are (..., r), `log_det_bartlett` is (...).
    """
    trace = (log_v.exp() * row_sq).sum(-1)
    log_det = log_v.sum(-1) + log_det_bartlett
    return 0.5 * (trace - log_det - log_v.shape[-1])


def kl_wishart(log_v: torch.Tensor, dof: float | torch.Tensor) -> torch.Tensor:
    """KL(W_r(V, nu) || W_r(I, nu)) = nu/2 (tr V - ln det V - r), V = diag(v); batched over rows of (..., r)."""
    return 0.5 * dof * (log_v.exp().sum(-1) - log_v.sum(-1) - log_v.shape[-1])


def kl_dirichlet(concentration: torch.Tensor, prior: float) -> torch.Tensor:
    """KL(Dir(alpha) || Dir(alpha0 * 1)) per row of (..., N), with lgamma used directly (no
    exp/log round trip, which overflows in fp32 once sum(alpha) exceeds about 35)."""
    n = concentration.shape[-1]
    total = concentration.sum(-1)
    prior_terms = n * math.lgamma(prior) - math.lgamma(prior * n)
    return (
        torch.lgamma(total)
        - torch.lgamma(concentration).sum(-1)
        + prior_terms
        + ((concentration - prior) * (torch.digamma(concentration) - torch.digamma(total).unsqueeze(-1))).sum(-1)
    )


def cooperative_loss(mixture_weights: torch.Tensor) -> torch.Tensor:
    """Eq. 13: sum_k pi_k^2 per row, minimised when all components share the weight."""
    return mixture_weights.square().sum(-1)
