"""SDE quantities against independent numerical solutions of the moment ODEs and quadrature."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad, solve_ivp

from difftime.errors import DifftimeError
from difftime.sde import VESDE, VPSDE, SubVPSDE, sde_from_config

SDES = {
    "vp": VPSDE(b0=0.1, b1=20.0),
    "subvp": SubVPSDE(b0=0.1, b1=20.0),
    "ve": VESDE(sigma_min=0.01, sigma_max=50.0),
    "vp_long": VPSDE(b0=0.1, b1=20.0, T_max=2.0),
}
HORIZONS = [0.2, 0.4, 0.6, 1.0]


def f64(x: float) -> torch.Tensor:
    return torch.tensor([x], dtype=torch.float64)


def scalar(fn, t: float) -> float:
    return float(fn(f64(t))[0])


@pytest.fixture(params=sorted(SDES))
def sde(request):
    return SDES[request.param]


def test_mean_and_variance_solve_the_moment_odes(sde):
    """dm/dt = alpha m, dv/dt = 2 alpha v + g^2, with m(0) = 1, v(0) = 0."""

    def rhs(t, y):
        m, v = y
        a = scalar(sde.alpha, t)
        return [a * m, 2 * a * v + scalar(sde.g2, t)]

    ts = np.array([1e-3, 0.05, 0.2, 0.4, 0.6, 1.0, sde.T_max])
    sol = solve_ivp(rhs, (0.0, sde.T_max), [1.0, 0.0], t_eval=np.unique(ts), rtol=1e-11, atol=1e-13,
                    method="DOP853")
    t = torch.tensor(sol.t, dtype=torch.float64)
    np.testing.assert_allclose(sde.m(t).numpy(), sol.y[0], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(sde.v(t).numpy(), sol.y[1], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(sde.sigma(t).numpy() ** 2, sol.y[1], rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("s,t", [(0.1, 0.3), (0.25, 0.6), (0.5, 1.0), (1e-4, 0.2)])
def test_transitions_compose(sde, s, t):
    """0 -> s -> t equals 0 -> t, and the s -> t kernel is the moment-ODE solution started at s."""
    s_, t_ = f64(s), f64(t)
    mf, var = sde.transition(s_, t_)
    assert torch.allclose(mf * sde.m(s_), sde.m(t_), rtol=1e-12)
    assert torch.allclose(mf**2 * sde.v(s_) + var, sde.v(t_), rtol=1e-10)

    def rhs(r, y):
        a = scalar(sde.alpha, r)
        return [a * y[0], 2 * a * y[1] + scalar(sde.g2, r)]

    sol = solve_ivp(rhs, (s, t), [1.0, 0.0], rtol=1e-11, atol=1e-13, method="DOP853")
    assert float(mf) == pytest.approx(sol.y[0, -1], rel=1e-7)
    assert float(var) == pytest.approx(sol.y[1, -1], rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("T", HORIZONS)
def test_int_alpha_and_R_identity(sde, T):
    eps = 1e-3
    expected, _ = quad(lambda r: scalar(sde.alpha, r), eps, T, epsabs=1e-12, epsrel=1e-11)
    assert float(sde.int_alpha(f64(eps), f64(T))) == pytest.approx(expected, rel=1e-8, abs=1e-12)
    # g^2/v + 2 alpha = d ln v / dt, the identity behind R(T) = d/2 ln(v(T)/v(eps)).
    lhs, _ = quad(lambda r: scalar(sde.g2, r) / scalar(sde.v, r) + 2 * scalar(sde.alpha, r), eps, T,
                  epsrel=1e-11, limit=200)
    assert lhs == pytest.approx(math.log(scalar(sde.v, T) / scalar(sde.v, eps)), rel=1e-7)


@pytest.mark.parametrize("T", HORIZONS)
def test_importance_Z_is_the_integral_of_g2_over_v(sde, T):
    eps = 1e-3
    expected, _ = quad(lambda r: scalar(sde.g2, r) / scalar(sde.v, r), eps, T, epsrel=1e-11, limit=200)
    assert sde.importance_Z(T, eps) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("T", [0.3, 1.0])
def test_importance_inverse_cdf(sde, T):
    """CDF(t(u)) = u by quadrature, and the potential inverts exactly."""
    eps = 1e-5
    Z = sde.importance_Z(T, eps)
    u = torch.tensor([0.0, 0.01, 0.2, 0.5, 0.8, 0.999, 1.0], dtype=torch.float64)
    t = sde.importance_sample_t(u, T, eps)
    assert t[0] == pytest.approx(eps, rel=1e-6) and t[-1] == pytest.approx(T, rel=1e-9)
    assert (t.diff() > 0).all()
    for ui, ti in zip(u[1:-1].tolist(), t[1:-1].tolist(), strict=True):
        mass, _ = quad(lambda r: scalar(sde.g2, r) / scalar(sde.v, r), eps, ti, epsrel=1e-11, limit=400,
                       points=[min(ti, 1e-3)])
        assert mass / Z == pytest.approx(ui, abs=1e-6)
    tt = torch.linspace(1e-4, T, 50, dtype=torch.float64)
    back = sde.importance_potential_inverse(sde.importance_potential(tt))
    assert torch.allclose(back, tt, rtol=1e-9)


def test_importance_samples_follow_the_density(sde):
    """A histogram of t(u) with u ~ U[0,1) matches g^2/(v Z) on [eps, T]."""
    T, eps = 0.6, 1e-3
    gen = torch.Generator().manual_seed(0)
    t = sde.importance_sample_t(torch.rand(200_000, generator=gen, dtype=torch.float64), T, eps)
    edges = np.linspace(eps, T, 11)
    counts, _ = np.histogram(t.numpy(), bins=edges)
    Z = sde.importance_Z(T, eps)
    probs = [quad(lambda r: scalar(sde.g2, r) / scalar(sde.v, r), a, b)[0] / Z
             for a, b in zip(edges[:-1], edges[1:], strict=True)]
    np.testing.assert_allclose(counts / len(t), probs, atol=4e-3)


def test_marginal_sample_moments(sde):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.full((100_000, 2), 0.7, dtype=torch.float64)
    t = torch.full((len(x0),), 0.4, dtype=torch.float64)
    xt, z = sde.marginal_sample(x0, t, gen)
    assert torch.allclose(xt, sde.m(t)[:, None] * x0 + sde.sigma(t)[:, None] * z)
    m, v = scalar(sde.m, 0.4), scalar(sde.v, 0.4)
    assert xt.mean().item() == pytest.approx(0.7 * m, abs=4 * math.sqrt(v / 2e5))
    assert xt.var().item() == pytest.approx(v, rel=0.02)


def test_baseline_priors():
    assert SDES["vp"].prior_std(0.3) == 1.0 and SDES["subvp"].prior_std(1.0) == 1.0
    ve = SDES["ve"]
    for T in HORIZONS:
        # Table 1 of the paper: N(0, (sigma^2(T) - sigma^2(0)) I), not sigma_max^2.
        assert ve.prior_std(T) ** 2 == pytest.approx(0.01**2 * (5000 ** (2 * T) - 1), rel=1e-12)
        assert ve.prior_std(T) ** 2 == pytest.approx(scalar(ve.v, T), rel=1e-12)
    x = torch.randn(5, 3, dtype=torch.float64)
    lp = ve.log_prior_density_standard(x, 0.4)
    ref = torch.distributions.Normal(0.0, ve.prior_std(0.4)).log_prob(x).sum(1)
    assert torch.allclose(lp, ref)


def test_vp_closed_forms_by_hand():
    sde = SDES["vp"]
    T = 0.4
    B = 0.1 * T + 0.5 * 19.9 * T**2
    assert scalar(sde.m, T) == pytest.approx(math.exp(-B / 2), rel=1e-14)
    assert scalar(sde.v, T) == pytest.approx(1 - math.exp(-B), rel=1e-14)
    # docs/design.md §2: for VP at T = 0.4, x_T = 0.44 x_0 + 0.90 z.
    assert scalar(sde.m, T) == pytest.approx(0.44, abs=0.005)
    assert scalar(sde.sigma, T) == pytest.approx(0.90, abs=0.005)
    eps = 1e-5
    Beps = 0.1 * eps + 0.5 * 19.9 * eps**2
    assert sde.importance_Z(T, eps) == pytest.approx(math.log(math.expm1(B) / math.expm1(Beps)), rel=1e-12)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: VPSDE(b0=0.0), "b0 must be > 0"),
        (lambda: VPSDE(b0=1.0, b1=0.5), "must be > beta_min"),
        (lambda: SubVPSDE(b0=-1.0), "b0 must be > 0"),
        (lambda: VESDE(sigma_min=1.0, sigma_max=0.5), "sigma_max must be > sigma_min"),
        (lambda: VESDE(sigma_min=0.0), "sigma_min must be > 0"),
        (lambda: VPSDE(eps=0.0), "eps must satisfy"),
        (lambda: VPSDE(eps=1.5), "eps must satisfy"),
        (lambda: VPSDE(T_max=-1.0), "T_max must be a positive"),
        (lambda: VPSDE().check_horizon(1.5), "T <= T_max"),
        (lambda: VPSDE().check_horizon(0.5, eps=0.6), "0 < eps < T"),
        (lambda: VPSDE().importance_Z(0.0), "0 < eps < T"),
        (lambda: sde_from_config({"kind": "nope"}), "unknown SDE kind"),
        (lambda: sde_from_config({"kind": "vp", "beta": 1}), "bad arguments"),
    ],
)
def test_invalid_arguments_are_refused(make, message):
    with pytest.raises(DifftimeError, match=message):
        make()


def test_config_round_trip(sde):
    again = sde_from_config(sde.to_config())
    t = torch.linspace(0.01, sde.T_max, 7, dtype=torch.float64)
    assert type(again) is type(sde)
    assert torch.equal(again.v(t), sde.v(t)) and torch.equal(again.g2(t), sde.g2(t))


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
def test_log_snr_is_log_m_over_sigma_and_inverts(sde):
    t = torch.tensor([1e-5, 1e-3, 0.1, 0.4, 0.9, 1.0], dtype=torch.float64)
    lam = sde.log_snr(t)
    assert torch.allclose(lam, torch.log(sde.m(t) / sde.sigma(t)), rtol=1e-10, atol=1e-10)
    assert (lam[1:] < lam[:-1]).all()
    assert torch.allclose(sde.t_from_log_snr(lam), t, rtol=1e-8, atol=1e-12)
