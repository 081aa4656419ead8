"""The math against torch.distributions and independent closed forms (docs/math.md, 'The losses')."""

import math

import pytest
import torch
from torch.distributions import Dirichlet, MultivariateNormal, kl_divergence

from monte_ds.monteclora.math import (
    STREAM_DIRICHLET,
    STREAM_INIT,
    STREAM_PREDICTIVE,
    STREAM_PREDICTIVE_DIRICHLET,
    STREAM_TRAIN,
    dirichlet_rsample,
    draw_bartlett,
    kl_dirichlet,
    kl_gaussian,
    kl_wishart,
    seeded_generator,
    stream_seed,
)


CPU = torch.device("cpu")


def general_wishart_kl(v1: torch.Tensor, nu1: float, v2: torch.Tensor, nu2: float) -> torch.Tensor:
    """KL(W(diag v1, nu1) || W(diag v2, nu2)), the general closed form (float64)."""
    r = v1.numel()
    ratio = v1 / v2

    def mvlgamma(a: float) -> torch.Tensor:
        return torch.mvlgamma(torch.tensor(a, dtype=torch.float64), r)

    def mvdigamma(a: float) -> torch.Tensor:
        return torch.digamma(torch.tensor(a, dtype=torch.float64) - torch.arange(r, dtype=torch.float64) / 2).sum()

    return (
        0.5 * nu2 * (torch.log(v2).sum() - torch.log(v1).sum())
        + 0.5 * nu1 * (ratio.sum() - r)
        + mvlgamma(nu2 / 2)
        - mvlgamma(nu1 / 2)
        + 0.5 * (nu1 - nu2) * mvdigamma(nu1 / 2)
    )


@pytest.mark.parametrize("alpha", [[1.0, 1.0, 1.0, 1.0], [0.3, 2.0, 5.0, 0.7], [1e4, 1e-3, 50.0, 2.0]])
@pytest.mark.parametrize("prior", [1.0, 0.5])
def test_dirichlet_kl_matches_torch_distributions(alpha, prior):
    a = torch.tensor(alpha, dtype=torch.float64)
    expected = kl_divergence(Dirichlet(a), Dirichlet(torch.full_like(a, prior)))
    assert torch.allclose(kl_dirichlet(a, prior), expected, rtol=1e-9, atol=1e-9)
    # fp32, as in training: finite and close even at alpha = 1e4
    got32 = kl_dirichlet(a.float(), prior)
    assert torch.isfinite(got32)
    assert abs(got32.item() - expected.item()) <= 1e-3 * max(1.0, abs(expected.item()))


def test_dirichlet_kl_is_finite_where_log_exp_lgamma_overflows():
    # sum(alpha) = 4e4: exp(lgamma) overflows fp32 (peft's and the official code's failure)
    a = torch.full((4,), 1e4)
    assert torch.isinf(torch.exp(torch.lgamma(a.sum())))
    assert torch.isfinite(kl_dirichlet(a, 1.0))


@pytest.mark.parametrize("v", [[1.0, 1.0, 1.0], [0.5, 2.0, 3.0], [1e-8, 1.0, 1e8]])
def test_wishart_kl_matches_the_general_closed_form(v):
    v64 = torch.tensor(v, dtype=torch.float64)
    for nu in (3.0, 7.5):
        expected = general_wishart_kl(v64, nu, torch.ones_like(v64), nu)
        assert torch.allclose(kl_wishart(v64.log(), nu), expected, rtol=1e-9)
        assert torch.isfinite(kl_wishart(v64.log().float(), nu))


@pytest.mark.parametrize("v", [[1.0, 1.0, 1.0, 1.0], [0.1, 2.0, 3.0, 0.5], [1e-8, 1e8, 1.0, 1.0]])
def test_gaussian_kl_matches_torch_distributions(v):
    """Each layer of one batched draw: its KL from row_sq / log_det equals torch's KL of the
    Gaussian whose Cholesky factor is rebuilt from the same generator stream."""
    r, layers = 4, 3
    draw = draw_bartlett(layers, r, 8, float(r), seeded_generator(CPU, 7), CPU)
    log_v = torch.tensor(v, dtype=torch.float64).log()
    # rebuild L = diag(sqrt v) L_B from the same generator stream, independently of row_sq / log_det
    g = seeded_generator(CPU, 7)
    torch.randn(layers, r, 8, generator=g)
    lower = torch.randn(layers, r, r, generator=g).tril(-1)
    half_dof = ((r - torch.arange(r, dtype=torch.float32)) / 2).expand(layers, r).contiguous()
    chi2 = 2 * torch._standard_gamma(half_dof, generator=g)
    got = kl_gaussian(log_v.expand(layers, r), draw.row_sq.double(), draw.log_det.double())
    assert got.shape == (layers,)
    for layer in range(layers):
        chol = (lower[layer] + torch.diag(chi2[layer].sqrt())).double() * log_v.mul(0.5).exp().unsqueeze(1)
        if max(v) <= 10:
            expected = kl_divergence(
                MultivariateNormal(torch.zeros(r, dtype=torch.float64), scale_tril=chol),
                MultivariateNormal(torch.zeros(r, dtype=torch.float64), torch.eye(r, dtype=torch.float64)),
            )
            assert torch.allclose(got[layer], expected, rtol=1e-5)
    assert torch.isfinite(kl_gaussian(log_v.float(), draw.row_sq, draw.log_det)).all()


def test_noise_is_the_bartlett_factor_times_a_standard_normal():
    r, layers, n_in = 3, 2, 5
    draw = draw_bartlett(layers, r, n_in, 4.0, seeded_generator(CPU, 9), CPU)
    g = seeded_generator(CPU, 9)
    z = torch.randn(layers, r, n_in, generator=g)
    lower = torch.randn(layers, r, r, generator=g).tril(-1)
    chi2 = 2 * torch._standard_gamma(
        ((4.0 - torch.arange(r, dtype=torch.float32)) / 2).expand(layers, r).contiguous(), generator=g
    )
    chol = lower + torch.diag_embed(chi2.sqrt())
    assert torch.allclose(draw.noise, chol @ z, atol=1e-6)
    assert torch.allclose(draw.row_sq, chol.square().sum(-1))
    assert torch.allclose(draw.log_det, torch.linalg.slogdet(chol @ chol.transpose(1, 2)).logabsdet, atol=1e-4)


def test_bartlett_factor_gives_wishart_moments():
    """E[L_B L_B^T] = nu I: row_sq (the diagonal of Sigma/v) averages nu, each ~ chi2(nu)."""
    r, nu, n = 4, 6.0, 4000
    row_sq = draw_bartlett(n, r, 2, nu, seeded_generator(CPU, 3), CPU).row_sq
    se = math.sqrt(2 * nu / n)  # chi2(nu) has variance 2 nu
    assert torch.all((row_sq.mean(0) - nu).abs() < 5 * se)


def test_dirichlet_rsample_equals_torch_rsample_with_the_same_stream():
    """A batch of rows (one per layer) gives torch's own rsample and implicit gradients."""
    alpha = torch.tensor([[0.4, 1.5, 3.0, 0.9], [2.0, 0.3, 1.0, 5.0]], requires_grad=True)
    torch.manual_seed(11)
    reference = Dirichlet(alpha).rsample()
    (reference * torch.arange(8.0).view(2, 4)).sum().backward()
    reference_grad = alpha.grad.clone()
    alpha.grad = None
    ours = dirichlet_rsample(alpha, seeded_generator(CPU, 11))
    (ours * torch.arange(8.0).view(2, 4)).sum().backward()
    assert torch.equal(ours, reference)
    assert torch.allclose(alpha.grad, reference_grad)


def test_batched_kl_terms_equal_the_per_row_terms():
    alpha = torch.tensor([[0.4, 1.5, 3.0], [2.0, 0.3, 50.0]])
    log_v = torch.tensor([[0.1, -0.5], [2.0, 0.0]])
    for row in range(2):
        assert torch.allclose(kl_dirichlet(alpha, 1.3)[row], kl_dirichlet(alpha[row], 1.3))
        assert torch.allclose(kl_wishart(log_v, torch.tensor([2.0, 5.0]))[row], kl_wishart(log_v[row], [2.0, 5.0][row]))


def test_stream_seed_separates_every_key():
    streams = (STREAM_TRAIN, STREAM_DIRICHLET, STREAM_INIT, STREAM_PREDICTIVE, STREAM_PREDICTIVE_DIRICHLET)
    assert len(set(streams)) == len(streams)  # each use of randomness has its own tag
    seeds = {
        stream_seed(seed, rank, stream, step, layer)
        for seed in range(3)
        for rank in range(3)
        for stream in streams
        for step in range(5)
        for layer in range(7)
    }
    assert len(seeds) == 3 * 3 * len(streams) * 5 * 7
    assert stream_seed(1, 2, 3) == stream_seed(1, 2, 3)
