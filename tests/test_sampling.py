"""Samplers on [eps, T] against the closed-form Gaussian ground truth of docs/design.md §3."""

from __future__ import annotations

import inspect

import pytest
import torch

from conftest import CountingModel
from difftime.errors import DifftimeError
from difftime.priors import GaussianPrior
from difftime.sampling import (
    DEFAULT_SAMPLE_EPS,
    SAMPLER_SPACINGS,
    SAMPLERS,
    SampleResult,
    default_sample_eps,
    default_spacing,
    sample,
    time_grid,
    timesteps,
)
from difftime.sde import VESDE, VPSDE
from difftime.testing import ExactGaussianEps, GaussianMarginal

MU = torch.tensor([0.6, -0.4], dtype=torch.float64)
LAM = torch.tensor([0.05, 0.3], dtype=torch.float64)
N = 20_000


def _moment_error(samples: torch.Tensor) -> float:
    """Largest error of the mean and the variance, in units of the data's standard deviation."""
    mean_err = ((samples.mean(0) - MU).abs() / LAM.sqrt()).max()
    var_err = ((samples.var(0) - LAM).abs() / LAM).max()
    return float(max(mean_err, var_err))


def _run(name, sde, T, steps, seed=0, prior=None, **kw):
    model = CountingModel(ExactGaussianEps(sde, MU, LAM))
    gen = torch.Generator().manual_seed(seed)
    prior = prior or GaussianMarginal(sde, MU, LAM, T)
    x_T = prior.sample(N, generator=gen)
    # dopri5 chooses its own steps and reads only the ends of its grid
    ts = timesteps(sde, T, sde.eps, steps or 1, default_spacing(name))
    x0, nfe = SAMPLERS[name](model, sde, x_T, ts, generator=gen, **kw)
    assert nfe == model.calls, f"{name} reported NFE {nfe} but made {model.calls} network calls"
    return x0, nfe


STEP_PAIRS = {"em": (10, 400), "pc": (10, 200), "euler": (5, 200), "heun": (3, 40)}


@pytest.mark.parametrize("name", sorted(STEP_PAIRS))
@pytest.mark.parametrize("T", [0.2, 0.5, 1.0])
def test_fixed_step_samplers_reproduce_the_data_moments(name, T):
    sde = VPSDE()
    coarse, fine = STEP_PAIRS[name]
    x_coarse, _ = _run(name, sde, T, coarse)
    x_fine, nfe = _run(name, sde, T, fine)
    err_coarse, err_fine = _moment_error(x_coarse), _moment_error(x_fine)
    # Sampling noise of 20k draws: mean ~0.007 sd, variance ~1% relative; 5% leaves room for both.
    assert err_fine < 0.05, (name, T, err_fine)
    if name != "pc":  # PC's Langevin corrector keeps it accurate even on a coarse grid
        assert err_fine < err_coarse, (name, T, err_coarse, err_fine)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(sigma_min=0.01, sigma_max=20.0)], ids=["vp", "ve"])
@pytest.mark.parametrize("T", [0.2, 1.0])
def test_adaptive_ode_sampler(sde, T):
    x0, nfe = _run("dopri5", sde, T, steps=None)
    assert _moment_error(x0) < 0.05
    assert 10 < nfe < 500


@pytest.mark.parametrize("name", ["em", "euler"])
def test_ve_samplers(name):
    sde = VESDE(sigma_min=0.01, sigma_max=20.0)
    x0, _ = _run(name, sde, 0.5, 400)
    assert _moment_error(x0) < 0.05


def test_standard_prior_at_short_T_biases_the_mean_and_the_matched_prior_removes_it():
    """The paper's point: at T = 0.3, x_T is far from N(0, I), and starting there pulls samples to 0.

    With the exact score the reverse dynamics are linear, and the error of the mean, e = E[x] - m mu,
    obeys de/dt = (alpha + g^2/k) e. Integrated from T to 0 this gives E[x_0] = mu (1 - m^2 lam / k(T))
    for a start at mean 0: a bias we can predict, not just observe.
    """
    sde = VPSDE()
    T = 0.3

    class Standard:
        def sample(self, n, generator=None):
            return torch.randn(n, 2, generator=generator, dtype=torch.float64)

    # The library's moment-matched prior, fitted from data samples rather than given the answer.
    data = MU + LAM.sqrt() * torch.randn(200_000, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    matched = GaussianPrior.from_data(sde, T, data)

    class Float64:
        def sample(self, n, generator=None):
            return matched.sample(n, generator=generator).double()

    biased, _ = _run("em", sde, T, 300, prior=Standard())
    exact, _ = _run("em", sde, T, 300, prior=Float64())
    m2 = sde.m(torch.tensor([T], dtype=torch.float64)) ** 2
    k = m2 * LAM + sde.v(torch.tensor([T], dtype=torch.float64))
    predicted = MU * (1 - m2 * LAM / k)
    standard_error = (LAM / N).sqrt()
    assert ((biased.mean(0) - predicted).abs() < 4 * standard_error).all(), (biased.mean(0), predicted)
    assert ((biased.mean(0) - MU).abs() > 10 * standard_error).all()
    assert (biased.mean(0).abs() < MU.abs()).all()
    assert ((exact.mean(0) - MU).abs() < 4 * standard_error).all()


def test_seeds_reproduce_and_differ():
    sde = VPSDE()
    a, _ = _run("em", sde, 0.5, 20, seed=1)
    b, _ = _run("em", sde, 0.5, 20, seed=1)
    c, _ = _run("em", sde, 0.5, 20, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_time_grid_uses_the_horizon_not_one():
    grid = time_grid(0.4, 1e-3, 4, torch.float64)
    assert torch.allclose(grid, torch.tensor([0.4, 0.30025, 0.2005, 0.10075, 1e-3], dtype=torch.float64))


def test_nfe_counts():
    sde = VPSDE()
    for name, steps, expected in (("em", 7, 8), ("euler", 7, 8), ("heun", 7, 15), ("pc", 7, 15)):
        model = CountingModel(ExactGaussianEps(sde, MU, LAM))
        x_T = torch.zeros(3, 2, dtype=torch.float64)
        _, nfe = SAMPLERS[name](model, sde, x_T, timesteps(sde, 0.5, sde.eps, steps, "time"))
        assert nfe == expected == model.calls, name


# --- the calling convention (docs/design.md §5) -------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_has_the_one_calling_convention(name):
    """(model, sde, x, ts) by position, everything else keyword-only, generator and denoise included."""
    params = list(inspect.signature(SAMPLERS[name]).parameters.values())
    assert [p.name for p in params[:4]] == ["model", "sde", "x", "ts"]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in params[:4])
    rest = {p.name: p for p in params[4:]}
    assert all(p.kind is p.KEYWORD_ONLY for p in rest.values()), name
    assert rest["generator"].default is None and rest["denoise"].default is True
    assert "spacing" not in rest and "steps" not in rest
    sde = VPSDE()
    x_T = torch.zeros(3, 2, dtype=torch.float64)
    result = SAMPLERS[name](ExactGaussianEps(sde, MU, LAM), sde, x_T, timesteps(sde, 0.5, 1e-3, 3, "time"),
                            generator=torch.Generator().manual_seed(0))
    assert isinstance(result, SampleResult) and result.x is result[0] and result.nfe == result[1]


def test_sample_builds_the_grid_from_the_default_spacing_table_and_ends_at_the_default_sample_eps():
    sde = VPSDE()
    model = ExactGaussianEps(sde, MU, LAM)
    prior = GaussianMarginal(sde, MU, LAM, 0.5)
    assert set(SAMPLER_SPACINGS) == set(SAMPLERS)
    assert {default_spacing(n) for n in ("em", "pc", "euler", "heun", "dopri5")} == {"time"}
    assert {default_spacing(n) for n in ("ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "ipndm")} == {"logsnr"}
    assert default_sample_eps(sde) == max(DEFAULT_SAMPLE_EPS, sde.eps) == 1e-3
    assert default_sample_eps(VPSDE(eps=0.01)) == 0.01
    for name in sorted(SAMPLERS):
        for spacing, eps in ((None, None), ("karras", None), ("quadratic", sde.eps)):
            got = sample(model, sde, prior, 0.5, n=6, sampler=name, steps=4, spacing=spacing, eps=eps,
                         generator=torch.Generator().manual_seed(1), batch=4)
            g = torch.Generator().manual_seed(1)
            x_T = prior.sample(6, generator=g)
            ts = timesteps(sde, 0.5, 1e-3 if eps is None else eps, 4, spacing or default_spacing(name))
            want = [SAMPLERS[name](model, sde, x_T[:4], ts, generator=g), SAMPLERS[name](model, sde, x_T[4:], ts,
                                                                                     generator=g)]
            assert isinstance(got, SampleResult) and got.nfe == want[1].nfe, name
            assert torch.equal(got.x, torch.cat([w.x for w in want])), (name, spacing, eps)
    with pytest.raises(DifftimeError, match="spacing"):
        sample(model, sde, prior, 0.5, n=2, sampler="heun", steps=4, spacing="cosine")
    with pytest.raises(TypeError):
        sample(model, sde, prior, 2, 0.5)  # n is keyword-only: (model, sde, prior, T) lead
