"""The MonteCLoRA math (DESIGN.md): seeded streams, Bartlett draws, Dirichlet rsample, KL terms.

Everything here is pure: tensors in, tensors out. Randomness comes only from explicit
generators seeded by `stream_seed(...)`, never from the global torch RNG.
"""

from __future__ import annotations

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
    """The parameter-free part of one layer's noise for one forward.

    `noise = L_B @ Z` (r x n_in) with L_B the Bartlett factor of a W_r(I, nu) draw and Z
    standard normal; `row_sq[i] = sum_j L_B[i, j]^2` and `log_det = ln det(L_B L_B^T)` are
    what the Gaussian KL needs. With V = diag(v): chol(Sigma) = diag(sqrt(v)) L_B exactly.
    """

    noise: torch.Tensor
    row_sq: torch.Tensor
    log_det: torch.Tensor


def draw_bartlett(rank: int, n_in: int, dof: float, generator: torch.Generator, device: torch.device) -> BartlettDraw:
    """Draw Z, the Bartlett normals and the chi-square diagonal, in that fixed order, in fp32."""
    z = torch.randn(rank, n_in, generator=generator, device=device, dtype=torch.float32)
    lower = torch.randn(rank, rank, generator=generator, device=device, dtype=torch.float32).tril_(-1)
    # c_i ~ chi2(nu - i) = 2 * Gamma((nu - i) / 2)
    half_dof = (dof - torch.arange(rank, device=device, dtype=torch.float32)) / 2
    chi2 = 2 * torch._standard_gamma(half_dof, generator=generator)
    chol = lower + torch.diag(chi2.sqrt())
    return BartlettDraw(noise=chol @ z, row_sq=chol.square().sum(1), log_det=chi2.log().sum())


class _DirichletRSample(torch.autograd.Function):
    """Dirichlet sample with implicit reparameterisation gradients (as torch.distributions'
    rsample) but drawn from an explicit generator."""

    @staticmethod
    def forward(ctx, concentration: torch.Tensor, generator: torch.Generator) -> torch.Tensor:  # type: ignore[override]
        sample = torch._sample_dirichlet(concentration, generator=generator)
        ctx.save_for_backward(sample, concentration)
        return sample

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        sample, concentration = ctx.saved_tensors
        return _Dirichlet_backward(sample, concentration, grad_output), None


def dirichlet_rsample(concentration: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return _DirichletRSample.apply(concentration, generator)


def kl_gaussian(log_v: torch.Tensor, row_sq: torch.Tensor, log_det_bartlett: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, Sigma) || N(mu, I)) = 1/2 (tr Sigma - ln det Sigma - r), Sigma = diag(sqrt v) L_B L_B^T diag(sqrt v)."""
    trace = (log_v.exp() * row_sq).sum()
    log_det = log_v.sum() + log_det_bartlett
    return 0.5 * (trace - log_det - log_v.numel())


def kl_wishart(log_v: torch.Tensor, dof: float) -> torch.Tensor:
    """KL(W_r(V, nu) || W_r(I, nu)) = nu/2 (tr V - ln det V - r), V = diag(v)."""
    return 0.5 * dof * (log_v.exp().sum() - log_v.sum() - log_v.numel())


def kl_dirichlet(concentration: torch.Tensor, prior: float) -> torch.Tensor:
    """KL(Dir(alpha) || Dir(alpha0 * 1)), with lgamma used directly (no exp/log round trip)."""
    n = concentration.numel()
    total = concentration.sum()
    prior_t = concentration.new_tensor(prior)
    return (
        torch.lgamma(total)
        - torch.lgamma(prior_t * n)
        - torch.lgamma(concentration).sum()
        + n * torch.lgamma(prior_t)
        + ((concentration - prior) * (torch.digamma(concentration) - torch.digamma(total))).sum()
    )


def cooperative_loss(mixture_weights: torch.Tensor) -> torch.Tensor:
    """Eq. 13: sum_k pi_k^2, minimised when all components share the weight."""
    return mixture_weights.square().sum()
