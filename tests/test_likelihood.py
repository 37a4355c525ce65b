"""The ELBO decomposition and PF-ODE likelihood against the Gaussian closed forms of docs/design.md §3."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad

from difftime.likelihood import bits_per_dim, elbo, ode_log_likelihood
from difftime.sde import VESDE, VPSDE
from difftime.testing import ExactGaussianEps, GaussianMarginal, gaussian_log_density, marginal_moments

MU = torch.tensor([0.5, -0.3, 0.1], dtype=torch.float64)
LAM = torch.tensor([0.04, 0.25, 0.6], dtype=torch.float64)
N = 3000
SDES = {"vp": VPSDE(), "ve": VESDE(sigma_min=0.01, sigma_max=20.0)}


class StandardNormal:
    def __init__(self, std: float):
        self.std = std

    def log_prob(self, x):
        return gaussian_log_density(x, torch.zeros(x.shape[1:], dtype=x.dtype), torch.full(x.shape[1:], self.std**2,
                                                                                            dtype=x.dtype))


def _k(sde, t: float) -> torch.Tensor:
    return marginal_moments(sde, MU, LAM, torch.tensor([t], dtype=torch.float64))[1][0]


def _entropy(sde, eps: float) -> float:
    return float(0.5 * torch.log(2 * math.pi * math.e * _k(sde, eps)).sum())


def _kl_to_baseline(sde, T: float) -> float:
    t = torch.tensor([T], dtype=torch.float64)
    mean, var = marginal_moments(sde, MU, LAM, t)
    s2 = sde.prior_std(T) ** 2
    return float(0.5 * (var[0] / s2 - 1 - torch.log(var[0] / s2)).sum() + 0.5 * (mean[0] ** 2).sum() / s2)


def _data(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return MU + LAM.sqrt() * torch.randn(N, 3, generator=gen, dtype=torch.float64)


def _mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    return values.mean().item(), (values.std() / math.sqrt(len(values))).item()


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("T", [0.3, 0.6, 1.0])
def test_elbo_with_the_exact_score_and_prior_is_minus_the_entropy(sde_name, T):
    sde = SDES[sde_name]
    eps = 1e-3
    x = _data()
    terms = elbo(ExactGaussianEps(sde, MU, LAM), sde, x, GaussianMarginal(sde, MU, LAM, T), T, eps=eps,
                 n_t=32, n_prior=4, generator=torch.Generator().manual_seed(1))
    mean, se = _mean_and_se(terms.total)
    # The standard error (data spread plus Monte Carlo) is far below the KL this test must resolve.
    assert se < 0.08, se
    assert abs(mean + _entropy(sde, eps)) < 3 * se, (mean, -_entropy(sde, eps), se)
    assert torch.allclose(terms.total, terms.prior - terms.score + terms.constant)
    v = sde.v(torch.tensor([eps, T], dtype=torch.float64))
    assert terms.constant[0].item() == pytest.approx(1.5 * math.log(v[1] / v[0]), rel=1e-12)


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("T", [0.2, 0.6, 1.0])
def test_elbo_with_the_baseline_prior_pays_the_kl(sde_name, T):
    """E ELBO = -H(p_eps) - KL(p_T || N); with common random numbers the prior swap costs exactly KL."""
    sde = SDES[sde_name]
    eps = 1e-3
    x = _data()
    model = ExactGaussianEps(sde, MU, LAM)
    baseline = elbo(model, sde, x, StandardNormal(sde.prior_std(T)), T, eps=eps, n_t=32, n_prior=4,
                    generator=torch.Generator().manual_seed(2))
    matched = elbo(model, sde, x, GaussianMarginal(sde, MU, LAM, T), T, eps=eps, n_t=32, n_prior=4,
                   generator=torch.Generator().manual_seed(2))
    kl = _kl_to_baseline(sde, T)
    mean, se = _mean_and_se(baseline.total)
    assert abs(mean - (-_entropy(sde, eps) - kl)) < 3 * se, (mean, -_entropy(sde, eps) - kl, se)
    improvement, se_diff = _mean_and_se(matched.prior - baseline.prior)
    assert torch.equal(matched.score, baseline.score)
    assert abs(improvement - kl) < 3 * se_diff + 1e-9, (improvement, kl, se_diff)
    if kl > 0.01:
        assert se_diff < 0.1 * kl


@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_a_scaled_score_lowers_the_elbo_by_the_score_gap(sde_name):
    sde = SDES[sde_name]
    T, eps, delta = 0.6, 1e-3, 0.5
    x = _data()
    prior = GaussianMarginal(sde, MU, LAM, T)
    exact = elbo(ExactGaussianEps(sde, MU, LAM), sde, x, prior, T, eps=eps, n_t=16,
                 generator=torch.Generator().manual_seed(3))
    scaled = elbo(ExactGaussianEps(sde, MU, LAM, scale=1 + delta), sde, x, prior, T, eps=eps, n_t=16,
                  generator=torch.Generator().manual_seed(3))

    def integrand(t: float) -> float:
        tt = torch.tensor([t], dtype=torch.float64)
        return float(sde.g2(tt) * (1 / _k(sde, t)).sum())

    gap = delta**2 / 2 * quad(integrand, eps, T, limit=200, points=[0.01, 0.1])[0]
    drop, se = _mean_and_se(exact.total - scaled.total)
    assert se < 0.05 * gap
    assert abs(drop - gap) < 3 * se, (drop, gap, se)


@pytest.mark.parametrize("sde_name", sorted(SDES))
@pytest.mark.parametrize("T", [0.4, 1.0])
def test_ode_likelihood_is_the_exact_density_pointwise(sde_name, T):
    sde = SDES[sde_name]
    eps = 1e-3
    x = _data()[:64]
    logp, x_T, nfe = ode_log_likelihood(ExactGaussianEps(sde, MU, LAM), sde, x, GaussianMarginal(sde, MU, LAM, T),
                                        T, eps=eps, divergence="exact")
    t = torch.tensor([eps], dtype=torch.float64)
    mean, var = marginal_moments(sde, MU, LAM, t)
    truth = gaussian_log_density(x, mean[0], var[0])
    assert ((logp - truth).abs() / truth.abs()).max() < 1e-3
    assert nfe > 5
    # x_T is the ODE flow of x: its moments are the marginal's, mapped linearly per dimension.
    mT, vT = marginal_moments(sde, MU, LAM, torch.tensor([T], dtype=torch.float64))
    expected_xT = mT[0] + (x - mean[0]) * (vT[0] / var[0]).sqrt()
    assert torch.allclose(x_T, expected_xT, rtol=1e-3, atol=1e-3)


def test_hutchinson_agrees_with_exact_divergence_on_average():
    """On a rotated Gaussian, whose Jacobian is not diagonal, so no probe is exact by accident."""
    sde = SDES["vp"]
    rot, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    inner, base = ExactGaussianEps(sde, MU, LAM), GaussianMarginal(sde, MU, LAM, 0.5)

    class Rotated(torch.nn.Module):
        def forward(self, x, t):
            return inner(x @ rot, t) @ rot.T

    class RotatedPrior:
        def log_prob(self, x):
            return base.log_prob(x @ rot)

    x = _data()[:200] @ rot.T
    exact = ode_log_likelihood(Rotated(), sde, x, RotatedPrior(), 0.5, eps=1e-3, divergence="exact").log_p
    unrotated = ode_log_likelihood(inner, sde, x @ rot, base, 0.5, eps=1e-3, divergence="exact").log_p
    assert torch.allclose(exact, unrotated, rtol=1e-4)
    for noise in ("rademacher", "gaussian"):
        hutch = ode_log_likelihood(Rotated(), sde, x, RotatedPrior(), 0.5, eps=1e-3, divergence="hutchinson",
                                   noise=noise, generator=torch.Generator().manual_seed(0)).log_p
        diff, se = _mean_and_se(hutch - exact)
        assert abs(diff) < 3 * se, (noise, diff, se)
        assert (hutch - exact).abs().max() > 1e-2  # it is an estimate, not the exact value


@pytest.mark.parametrize(
    "levels, a, expected_offset",
    [(256, 1.0, 8.0), (256, 2.0, 7.0), (17, 2.0, math.log2(17) - 1), (None, 1.0, 0.0)],
)
def test_bits_per_dim_conversion_by_hand(levels, a, expected_offset):
    nll, d = 123.4, 64
    assert bits_per_dim(-nll, d, levels, a) == pytest.approx(nll / (d * math.log(2)) + expected_offset)


def test_bits_per_dim_of_a_uniform_dequantized_model_is_log2_levels():
    """A model uniform on the data's range in model space has bpd = log2(L) exactly (no skill)."""
    d, L, a = 10, 256, 2.0
    log_density = -d * math.log(a)  # uniform on [-1, 1)^d
    assert bits_per_dim(log_density, d, L, a) == pytest.approx(math.log2(L))
