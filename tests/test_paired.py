"""ELBO on common random numbers across T, and paired differences, against the Gaussian closed forms of
docs/design.md §3."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difftime.errors import DifftimeError
from difftime.likelihood import ELBO_DESIGNS, elbo_across_T
from difftime.sde import VESDE, VPSDE
from difftime.stats import adjacent_differences, normal_quantile, paired_difference, unpaired_difference
from difftime.testing import ExactGaussianEps, GaussianMarginal, gaussian_log_density, marginal_moments

MU = torch.tensor([0.5, -0.3, 0.1], dtype=torch.float64)
LAM = torch.tensor([0.04, 0.25, 0.6], dtype=torch.float64)
N = 2000
EPS = 1e-3
SDES = {"vp": VPSDE(), "ve": VESDE(sigma_min=0.01, sigma_max=20.0)}


class StandardNormal:
    """N(0, I): the VP baseline prior at every T."""

    def log_prob(self, x):
        return gaussian_log_density(x, torch.zeros(x.shape[1:], dtype=x.dtype), torch.ones(x.shape[1:], dtype=x.dtype))


def _data(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return MU + LAM.sqrt() * torch.randn(N, 3, generator=gen, dtype=torch.float64)


def _moments(sde, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var = marginal_moments(sde, MU, LAM, torch.tensor([t], dtype=torch.float64))
    return mean[0], var[0]


def _kl_to_standard(sde, T: float) -> float:
    """KL(p_T || N(0, I)) = 1/2 sum [k - 1 - ln k] + 1/2 m^2 ||mu||^2."""
    mean, k = _moments(sde, T)
    return float(0.5 * (k - 1 - k.log()).sum() + 0.5 * (mean**2).sum())


def _entropy(sde, eps: float) -> float:
    return float(0.5 * torch.log(2 * math.pi * math.e * _moments(sde, eps)[1]).sum())


def _paired_elbo(design: str, Ts, seed: int, n_t: int = 64, priors=None, sde_name: str = "vp"):
    sde = SDES[sde_name]
    return elbo_across_T(ExactGaussianEps(sde, MU, LAM), sde, _data(), priors or StandardNormal(), Ts, eps=EPS,
                         n_t=n_t, n_prior=4, generator=torch.Generator().manual_seed(seed), design=design)


@pytest.mark.parametrize("design", ELBO_DESIGNS)
def test_paired_elbo_differences_are_the_kl_differences(design):
    """E[ELBO(T1) - ELBO(T2)] = KL(p_T2 || N) - KL(p_T1 || N) with eps*, resolved by the paired se."""
    sde = SDES["vp"]
    Ts = [0.3, 0.4, 0.6]
    result = _paired_elbo(design, Ts, seed=1)
    assert result.total.shape == (3, N) and result.Ts == (0.3, 0.4, 0.6) and result.design == design
    assert torch.allclose(result.total, result.prior - result.score + result.constant)
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        diff = result.difference(i, j)
        truth = _kl_to_standard(sde, Ts[j]) - _kl_to_standard(sde, Ts[i])
        assert abs(diff.mean - truth) < 3 * diff.se, (Ts[i], Ts[j], diff, truth)
        assert diff.se < abs(truth) / 4, (diff.se, truth)  # the test resolves the difference it checks


@pytest.mark.parametrize("design", ELBO_DESIGNS)
def test_paired_se_is_a_fraction_of_the_unpaired_one(design):
    """Same draw count: shared draws across T against independent draws per T."""
    Ts = [0.4, 0.5]
    paired = _paired_elbo(design, Ts, seed=1)
    first, second = _paired_elbo(design, Ts, seed=2), _paired_elbo(design, Ts, seed=3)
    shared = paired.difference(1, 0)
    unpaired = unpaired_difference(second.total[1], first.total[0])
    # Same examples, but independent draws at each T: only the draws are not shared.
    same_examples = paired_difference(second.total[1], first.total[0])
    assert shared.se <= unpaired.se / 5, (shared.se, unpaired.se)
    assert shared.se <= same_examples.se / 5, (shared.se, same_examples.se)
    truth = _kl_to_standard(SDES["vp"], 0.4) - _kl_to_standard(SDES["vp"], 0.5)
    for diff in (shared, unpaired, same_examples):
        assert abs(diff.mean - truth) < 3 * diff.se


@pytest.mark.parametrize("design", ELBO_DESIGNS)
@pytest.mark.parametrize("sde_name", sorted(SDES))
def test_with_the_exact_prior_the_elbo_is_minus_the_entropy_at_every_T(design, sde_name):
    sde = SDES[sde_name]
    Ts = [0.2, 0.5, 1.0]
    priors = {T: GaussianMarginal(sde, MU, LAM, T) for T in Ts}
    result = _paired_elbo(design, Ts, seed=4, n_t=32, priors=priors, sde_name=sde_name)
    for k, T in enumerate(Ts):
        total = result.total[k]
        mean, se = total.mean().item(), (total.std() / math.sqrt(N)).item()
        assert se < 0.08, se
        assert abs(mean + _entropy(sde, EPS)) < 3 * se, (T, mean, -_entropy(sde, EPS), se)
        v = sde.v(torch.tensor([EPS, T], dtype=torch.float64))
        assert result.constant[k, 0].item() == pytest.approx(1.5 * math.log(v[1] / v[0]), rel=1e-12)
    # With the exact prior and score, the ELBO does not depend on T: the paired differences vanish.
    for diff in adjacent_differences(result.total):
        assert abs(diff.mean) < 3 * diff.se, diff


class Recording(torch.nn.Module):
    """The exact eps-net, recording every (x_t, t) it is called with."""

    def __init__(self, sde):
        super().__init__()
        self.inner, self.calls = ExactGaussianEps(sde, MU, LAM), []

    def forward(self, x, t):
        self.calls.append((x.clone(), t.clone()))
        return self.inner(x, t)


@pytest.mark.parametrize("design", ELBO_DESIGNS)
def test_draws_are_stratified_and_shared_across_T(design):
    sde, n_t, Ts = SDES["vp"], 8, [0.3, 0.7]
    x = _data()[:50]
    model = Recording(sde)
    elbo_across_T(model, sde, x, StandardNormal(), Ts, eps=EPS, n_t=n_t, n_prior=2, chunk=64,
                  generator=torch.Generator().manual_seed(5), design=design)
    xt = torch.cat([c[0] for c in model.calls])
    t = torch.cat([c[1] for c in model.calls])
    per_T = len(Ts) if design == "inverse_cdf" else 1
    assert len(t) == per_T * len(x) * n_t  # nested: one network call per draw serves every T
    xt, t = xt.reshape(per_T, len(x), n_t, 3), t.reshape(per_T, len(x), n_t)
    ends = torch.tensor([EPS], dtype=torch.float64)
    for k in range(per_T):
        T = Ts[k] if design == "inverse_cdf" else max(Ts)
        # F_T(t_j) = (phi(t_j) - phi(eps)) / Z(T) puts exactly one draw per example in each stratum [j/n, (j+1)/n).
        u = (sde.importance_potential(t[k].flatten()) - sde.importance_potential(ends)) / sde.importance_Z(T, EPS)
        strata = (u.reshape(len(x), n_t) * n_t).floor().long()
        assert torch.equal(strata, torch.arange(n_t).expand(len(x), -1))
    # The same z_j at every T: z = (x_t - m(t) x) / sigma(t).
    m, sigma = sde.m(t)[..., None], sde.sigma(t)[..., None]
    z = (xt - m * x[None, :, None]) / sigma
    assert torch.allclose(z[0], z[-1], atol=1e-6)
    assert z.std() > 0.5


def test_designs_agree_at_T_max_and_rows_do_not_depend_on_the_rest_of_the_grid():
    """Same seed: nested at T_max is inverse_cdf at T_max; an inverse_cdf row is the same alone or in a grid."""
    grid = _paired_elbo("inverse_cdf", [0.3, 0.6, 0.6], seed=6, n_t=8)
    alone = _paired_elbo("inverse_cdf", [0.6], seed=6, n_t=8)
    nested = _paired_elbo("nested", [0.3, 0.6], seed=6, n_t=8)
    for field in ("prior", "score", "constant", "total"):
        assert torch.equal(getattr(grid, field)[1], getattr(grid, field)[2])
        assert torch.equal(getattr(grid, field)[1], getattr(alone, field)[0])
        assert torch.allclose(getattr(nested, field)[1], getattr(alone, field)[0], rtol=1e-12, atol=1e-12)
    # The designs differ only in the score term: the x_T draws and the constant are shared at every T.
    assert torch.equal(nested.prior[0], grid.prior[0]) and torch.equal(nested.constant[0], grid.constant[0])
    # nested at T < T_max keeps only the draws with t <= T, so it differs from the inverse-CDF row.
    assert not torch.allclose(nested.score[0], grid.score[0])


def test_priors_may_be_a_mapping_a_callable_or_one_prior():
    Ts = [0.3, 0.6]
    sde = SDES["vp"]
    mapping = _paired_elbo("inverse_cdf", Ts, seed=7, n_t=4, priors={T: GaussianMarginal(sde, MU, LAM, T) for T in Ts})
    factory = _paired_elbo("inverse_cdf", Ts, seed=7, n_t=4, priors=lambda T: GaussianMarginal(sde, MU, LAM, T))
    assert torch.equal(mapping.total, factory.total)
    one = _paired_elbo("inverse_cdf", Ts, seed=7, n_t=4, priors=StandardNormal())
    assert torch.equal(one.score, mapping.score) and not torch.equal(one.prior, mapping.prior)
    terms = mapping.terms(1)
    assert torch.equal(terms.total, mapping.total[1]) and terms.total_se.shape == (N,)
    with pytest.raises(DifftimeError, match="no prior for T=0.6"):
        _paired_elbo("inverse_cdf", Ts, seed=7, n_t=4, priors={0.3: StandardNormal()})
    with pytest.raises(DifftimeError, match="design"):
        _paired_elbo("bogus", Ts, seed=7, n_t=4)


def test_paired_and_unpaired_differences_by_hand():
    a = torch.tensor([1.0, 2.0, 4.0, 7.0])
    b = torch.tensor([0.5, 2.5, 3.0, 6.0])
    diff = paired_difference(a, b)
    d = a - b  # 0.5, -0.5, 1.0, 1.0
    se = math.sqrt(((d - d.mean()) ** 2).sum().item() / 3) / 2
    assert diff.mean == pytest.approx(0.5) and diff.se == pytest.approx(se) and diff.n == 4 and diff.paired
    assert diff.lo == pytest.approx(0.5 - 1.959964 * se, rel=1e-6) and diff.hi == pytest.approx(0.5 + 1.959964 * se,
                                                                                                rel=1e-6)
    assert diff.resolved == (diff.lo > 0)
    assert normal_quantile(0.9) == pytest.approx(1.644854, rel=1e-6)
    un = unpaired_difference(a, b)
    assert un.mean == pytest.approx(0.5) and not un.paired
    assert un.se == pytest.approx(math.sqrt(a.var().item() / 4 + b.var().item() / 4))
    rows = adjacent_differences(torch.stack([b, a, a + 1]))
    assert [r.mean for r in rows] == pytest.approx([0.5, 1.0]) and rows[1].se == pytest.approx(0.0)
    assert set(diff.to_dict()) == {"mean", "se", "lo", "hi", "n", "level", "paired"}
    assert math.isnan(paired_difference([1.0], [0.0]).se)
    with pytest.raises(ValueError):
        paired_difference(a, b[:3])
    with pytest.raises(ValueError):
        adjacent_differences(a)


def test_likelihood_across_T_one_solve_matches_a_solve_per_T(tiny_run, one_thread):
    """Truncate mode: one PF-ODE solve to max T gives each T's log-likelihood as a solve per T would
    (same probes, same dequantization), and the ELBO rows of a run per T (inverse_cdf) equal the
    one-run rows with that design: the draws at T do not depend on the grid."""
    from difftime.data import load_data
    from difftime.evaluation import likelihood_across_T
    from difftime.priors import StandardPrior
    from difftime.run import load_run

    run, other = load_run(tiny_run), load_run(tiny_run)
    Ts = (0.4, 1.0)
    priors = {T: {"standard": StandardPrior.for_sde(run.sde, T, run.shape)} for T in Ts}
    raw = load_data("digits").test[:4]
    opts = {"n_t": 8, "n_prior": 2, "rtol": 1e-4, "atol": 1e-4, "divergence": "hutchinson", "progress": False}
    one = likelihood_across_T({T: run for T in Ts}, priors, raw, elbo_design="inverse_cdf", **opts)
    per_T = likelihood_across_T({0.4: other, 1.0: run}, priors, raw, **opts)  # not one network object
    assert one.one_solve and not per_T.one_solve and per_T.elbo_design == "inverse_cdf"
    # Solver tolerance 1e-4 (0.012 apart when the tiny run trains on one thread); a wrong T moves it by > 0.1.
    np.testing.assert_allclose(one.per_example["nll"], per_T.per_example["nll"], atol=3e-2)
    np.testing.assert_allclose(one.per_example["elbo"], per_T.per_example["elbo"], rtol=1e-9)
    # Adjacent differences from the table equal the difference of the cells' means.
    d = one.difference("nll", (1.0, "standard"), (0.4, "standard"))
    assert d.mean == pytest.approx(one.summaries[1.0]["standard"]["nll"]["bpd"]
                                   - one.summaries[0.4]["standard"]["nll"]["bpd"], abs=1e-9)


def test_likelihood_across_T_n_nll_solves_the_first_examples_only(tiny_run, one_thread):
    """``n_nll`` runs the PF-ODE on the first n_nll examples: their bits/dim equal a run on those
    examples alone (the same dequantization rows, the same probes), while the ELBO keeps all."""
    from difftime.data import load_data
    from difftime.evaluation import likelihood_across_T
    from difftime.priors import StandardPrior
    from difftime.run import load_run

    run = load_run(tiny_run)
    Ts = (0.4, 1.0)
    priors = {T: {"standard": StandardPrior.for_sde(run.sde, T, run.shape)} for T in Ts}
    raw = load_data("digits").test[:6]
    opts = {"n_t": 4, "n_prior": 2, "rtol": 1e-4, "atol": 1e-4, "divergence": "hutchinson", "progress": False}
    part = likelihood_across_T({T: run for T in Ts}, priors, raw, n_nll=3, **opts)
    alone = likelihood_across_T({T: run for T in Ts}, priors, raw[:3], **opts)
    assert part.per_example["elbo"].shape == (2, 1, 6) and part.per_example["nll"].shape == (2, 1, 3)
    np.testing.assert_allclose(part.per_example["nll"], alone.per_example["nll"], rtol=1e-6)
    summary = part.summaries[1.0]["standard"]
    assert summary["n"] == 6 and summary["nll"]["n"] == 3
    assert summary["nll"]["bpd"] == pytest.approx(float(part.per_example["nll"][1, 0].mean()), abs=1e-9)
    with pytest.raises(DifftimeError, match="n_nll must be between 2 and the 6 examples"):
        likelihood_across_T({T: run for T in Ts}, priors, raw, n_nll=7, **opts)
