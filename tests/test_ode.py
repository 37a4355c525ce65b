"""The PF-ODE solve in a smoother variable, per-example error control and truncate mode.

Everything is checked against the Gaussian closed form of docs/design.md §3: with data
N(mu, diag(lam)), the exact eps-network and nu = p_T, the PF-ODE log p_eps(x) is the Gaussian
log-density of p_eps at x, point by point, whatever the horizon T.
"""

from __future__ import annotations

import math

import pytest
import torch

from difftime.errors import DifftimeError
from difftime.likelihood import ode_flow, ode_log_likelihood
from difftime.sde import VESDE, VPSDE, SubVPSDE
from difftime.testing import ExactGaussianEps, GaussianMarginal, gaussian_log_density, marginal_moments

pytestmark = pytest.mark.usefixtures("one_thread")

# One narrow coordinate (lam = 1e-3, about the width of 8-bit dequantization noise in [-1, 1]) makes
# the t-parameterised flow stiff near eps, as on real images.
MU = torch.tensor([0.5, -0.3, 0.1], dtype=torch.float64)
LAM = torch.tensor([1e-3, 0.01, 0.04], dtype=torch.float64)
EPS = 1e-5
SDES = {"vp": VPSDE(), "subvp": SubVPSDE(), "ve": VESDE(sigma_min=0.01, sigma_max=20.0)}


def _data(n: int = 24, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return MU + LAM.sqrt() * torch.randn(n, 3, generator=gen, dtype=torch.float64)


def _truth(sde, x: torch.Tensor) -> torch.Tensor:
    mean, var = marginal_moments(sde, MU, LAM, torch.tensor([EPS], dtype=torch.float64))
    return gaussian_log_density(x, mean[0], var[0])


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| / |b|, with |b| floored at 1 nat so that a log-density near 0 is not divided by ~0."""
    return (a - b).abs() / b.abs().clamp(min=1.0)


def _flow_map(sde, x: torch.Tensor, T: float) -> torch.Tensor:
    """The closed-form flow: x_T - m_T mu = sqrt(k(T)/k(eps)) (x - m_eps mu) per coordinate."""
    m0, k0 = marginal_moments(sde, MU, LAM, torch.tensor([EPS], dtype=torch.float64))
    mT, kT = marginal_moments(sde, MU, LAM, torch.tensor([T], dtype=torch.float64))
    return mT[0] + (x - m0[0]) * (kT[0] / k0[0]).sqrt()


@pytest.mark.parametrize("method, tol", [("bosh3", 1e-7), ("dopri5", 1e-7)])
@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_logsnr_and_t_give_the_same_log_likelihood_and_both_are_exact(sde_name, method, tol):
    sde, T = SDES[sde_name], 0.8
    x = _data()
    truth = _truth(sde, x)
    model, prior = ExactGaussianEps(sde, MU, LAM), GaussianMarginal(sde, MU, LAM, T)
    logp = {}
    for variable in ("t", "logsnr", "log_sigma"):
        logp[variable], x_T, _ = ode_log_likelihood(
            model, sde, x, prior, T, eps=EPS, rtol=tol, atol=tol, divergence="exact", variable=variable, method=method)
        assert _rel(logp[variable], truth).max() < 1e-4, variable
        assert torch.allclose(x_T, _flow_map(sde, x, T), rtol=1e-5, atol=1e-5), variable
    assert _rel(logp["logsnr"], logp["t"]).max() < 1e-4
    assert _rel(logp["log_sigma"], logp["t"]).max() < 1e-4


@pytest.mark.parametrize("error_control", ["example", "batch"])
def test_default_tolerance_is_accurate_under_either_error_control(error_control):
    sde, T = SDES["vp"], 1.0
    x = _data(64, seed=1)
    result = ode_log_likelihood(ExactGaussianEps(sde, MU, LAM), sde, x, GaussianMarginal(sde, MU, LAM, T), T,
                                eps=EPS, divergence="exact", error_control=error_control)
    logp, nfe = result.log_p, result.nfe
    # In bits/dim (d = 3) the default tolerance is well inside the 0.002 accuracy gate.
    assert ((logp - _truth(sde, x)).abs() / (3 * math.log(2))).max() < 2e-3
    assert nfe > 5


def test_float32_input_gives_a_float32_answer_close_to_float64():
    sde, T = SDES["vp"], 1.0
    x = _data(16)
    model, prior = ExactGaussianEps(sde, MU, LAM), GaussianMarginal(sde, MU, LAM, T)
    logp32, x_T32, _ = ode_log_likelihood(model, sde, x.float(), prior, T, eps=EPS, divergence="exact")
    assert logp32.dtype == torch.float32 and x_T32.dtype == torch.float32
    assert ((logp32.double() - _truth(sde, x)).abs() / (3 * math.log(2))).max() < 2e-3


@pytest.mark.parametrize("variable, method", [("logsnr", "dopri5"), ("t", "bosh3")])
def test_truncate_mode_equals_separate_solves(variable, method):
    sde = SDES["vp"]
    Ts = [0.2, 0.5, 1.0]
    x = _data(16, seed=2)
    model = ExactGaussianEps(sde, MU, LAM)
    tol = dict(rtol=1e-8, atol=1e-8, method=method) if method == "dopri5" else dict(rtol=1e-7, atol=1e-7)
    x_Ts, integrals, nfe = ode_flow(model, sde, x, Ts, eps=EPS, divergence="exact", variable=variable, **tol)
    assert x_Ts.shape == (3, *x.shape) and integrals.shape == (3, len(x))
    separate_nfe = 0
    for k, T in enumerate(Ts):
        x_T, integral, n = ode_flow(model, sde, x, T, eps=EPS, divergence="exact", variable=variable, **tol)
        separate_nfe += n
        assert x_T.shape == x.shape and integral.shape == (len(x),)  # a float T keeps the old shapes
        assert torch.allclose(x_Ts[k], x_T, rtol=1e-6, atol=1e-7), T
        assert torch.allclose(integrals[k], integral, rtol=1e-6, atol=1e-6), T
        assert torch.allclose(x_Ts[k], _flow_map(sde, x, T), rtol=1e-6, atol=1e-6), T
    assert nfe < separate_nfe
    # The first horizon is reached by the very steps a solve to it alone takes (equal up to rounding).
    x_first, integral_first, _ = ode_flow(model, sde, x, Ts[0], eps=EPS, divergence="exact", variable=variable, **tol)
    assert torch.allclose(x_Ts[0], x_first, rtol=1e-12, atol=1e-12)
    assert torch.allclose(integrals[0], integral_first, rtol=1e-12, atol=1e-12)

    # With nu = p_T at each T, every horizon gives the same exact log p_eps.
    priors = [GaussianMarginal(sde, MU, LAM, T) for T in Ts]
    logp = ode_log_likelihood(model, sde, x, priors, Ts, eps=EPS, divergence="exact", variable=variable, **tol).log_p
    truth = _truth(sde, x)
    assert logp.shape == (3, len(x))
    assert _rel(logp, truth).max() < 1e-5


def test_several_hutchinson_probes_are_unbiased_and_less_noisy():
    """On a rotated Gaussian (a Jacobian that is not diagonal), K fixed probes average K VJPs."""
    sde, T = SDES["vp"], 0.5
    rot, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64))
    inner = ExactGaussianEps(sde, MU, LAM)

    class Rotated(torch.nn.Module):
        def forward(self, x, t):
            return inner(x @ rot, t) @ rot.T

    x = _data(200, seed=3) @ rot.T
    _, exact, _ = ode_flow(Rotated(), sde, x, T, eps=EPS, divergence="exact")
    errors = {}
    for k in (1, 8):
        _, hutch, _ = ode_flow(Rotated(), sde, x, T, eps=EPS, divergence="hutchinson", n_probes=k,
                               generator=torch.Generator().manual_seed(0))
        errors[k] = hutch - exact
        assert abs(errors[k].mean()) < 3 * errors[k].std() / math.sqrt(len(x)), k
    assert errors[1].abs().max() > 1e-2  # an estimate, not the exact value
    assert errors[8].std() < 0.6 * errors[1].std()


def test_bad_arguments_are_refused():
    sde = SDES["vp"]
    x = _data(4)
    model = ExactGaussianEps(sde, MU, LAM)
    with pytest.raises(DifftimeError, match="variable"):
        ode_flow(model, sde, x, 1.0, eps=EPS, variable="sigma")
    with pytest.raises(DifftimeError, match="error_control"):
        ode_flow(model, sde, x, 1.0, eps=EPS, error_control="worst")
    with pytest.raises(DifftimeError, match="increasing"):
        ode_flow(model, sde, x, [0.5, 0.2], eps=EPS)
