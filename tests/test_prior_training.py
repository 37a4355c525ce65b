"""Flow training that uses its budget: actnorm data init, the warm-up + cosine schedule,
early stopping against the held-out noise, the time limit and the stored fit curve."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from difftime.data import load_data
from difftime.priors import fit_prior, fit_run_prior, heldout_nll, heldout_set, make_prior
from difftime.priors.fit import bad_count, lr_factor
from difftime.priors.glow import ActNorm
from difftime.sde import VPSDE

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def moons():
    return load_data("toy:moons", seed=0)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", seed=0)


class ShiftPrior(nn.Module):
    """N(mu, I) in 2-D with a trainable mean: its held-out NLL is a closed-form function of mu."""

    def __init__(self, T: float, mu: torch.Tensor) -> None:
        super().__init__()
        self.T, self.shape = T, (2,)
        self.mu = nn.Parameter(mu.clone().float())

    def log_prob(self, x):
        return -0.5 * ((x - self.mu) ** 2).sum(1) - math.log(2 * math.pi)

    def sample(self, n, generator=None):
        return self.mu.detach() + torch.randn(n, 2, generator=generator)


class DriftPrior(ShiftPrior):
    """Trains towards mu* + 3 while the held-out optimum is mu*: the held-out NLL rises steadily."""

    def log_prob(self, x):
        return super().log_prob(x - 3.0 if self.training else x)


class ScriptedPrior(ShiftPrior):
    """Training moves a scalar p by lr per step (Adam on a constant gradient); the held-out NLL is the
    standard normal's plus curve(p), the same for every example (a resolved change however small)."""

    def __init__(self, T: float, curve) -> None:
        super().__init__(T, torch.zeros(2))
        self.mu.requires_grad_(False)
        self.p = nn.Parameter(torch.zeros(()))
        self.curve = curve

    def log_prob(self, x):
        base = super().log_prob(x)
        if self.training:
            return base + self.p
        p = float(self.p.detach())
        return base - (self.curve_x(p, x) if hasattr(self, "curve_x") else self.curve(p))


def test_actnorm_data_init_gives_zero_mean_unit_variance_per_channel():
    x = torch.randn(64, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * torch.tensor([0.1, 2.0, 7.0])[
        None, :, None, None] + torch.tensor([3.0, -1.0, 0.5])[None, :, None, None]
    norm = ActNorm(3)
    norm.initialize(x)
    y, logdet = norm(x)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.std((0, 2, 3), correction=0), torch.ones(3), atol=1e-5)
    assert torch.allclose(norm.inverse(y), x, atol=1e-5)
    assert torch.allclose(logdet, -x.std((0, 2, 3), correction=0).log().sum().expand(64) * 16, atol=1e-4)


def test_glow_data_init_normalises_every_actnorm_and_keeps_the_gaussian_start(digits):
    sde, T = VPSDE(), 0.4
    glow = make_prior("glow", sde, T, digits, levels=2, steps_per_level=2, hidden=16)
    # Push the input of every later actnorm off unit scale, as a trained layer would.
    with torch.no_grad():
        for level in glow.steps:
            for step in level:
                step.invconv.log_s.add_(0.7)
    x = heldout_set(sde, T, digits, 2048, seed=5).reshape(-1, *digits.shape)
    outputs = []
    hooks = [step.actnorm.register_forward_hook(lambda m, i, o: outputs.append(o[0]))
             for level in glow.steps for step in level]
    glow.data_init(x)
    outputs.clear()
    glow.encode(x)
    for h in hooks:
        h.remove()
    assert len(outputs) == 4
    for y in outputs:
        assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(y.shape[1]), atol=1e-4)
        assert torch.allclose(y.std((0, 2, 3), correction=0), torch.ones(y.shape[1]), atol=1e-4)
    # On the unperturbed Glow the data init is a small move away from its Gaussian base.
    fresh = make_prior("glow", sde, T, digits, levels=2, steps_per_level=2, hidden=16)
    before = heldout_nll(fresh, sde, T, digits, n_eval=1000, seed=1)
    fresh.data_init(x)
    assert abs(heldout_nll(fresh, sde, T, digits, n_eval=1000, seed=1) - before) < 0.5


def test_warmup_cosine_schedule_values_and_the_optimizer_follows_it(moons):
    w, total = 10, 110
    f = [lr_factor("warmup_cosine", k, total, w) for k in range(total)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.5) and f[-1] == pytest.approx(0.5 * (
        1 + math.cos(math.pi * 99 / 100)))
    assert all(a >= b for a, b in zip(f[9:], f[10:], strict=False))
    assert lr_factor("constant", 50, total, w) == 1.0 and lr_factor("cosine", 0, total, w) == 1.0
    sde, T = VPSDE(), 0.4
    prior = ShiftPrior(T, torch.zeros(2))
    res = fit_prior(prior, sde, T, moons, steps=40, eval_every=10, warmup=5, lr=0.02, n_eval=200, patience=100,
                    progress=False)
    lrs = [h["lr"] for h in res["history"][1:]]  # the lr of the step just before each evaluation
    assert lrs == pytest.approx([0.02 * lr_factor("warmup_cosine", k - 1, 40, 5) for k in (10, 20, 30, 40)])


def test_patience_counts_only_degradations_the_heldout_noise_resolves(moons):
    sde, T = VPSDE(), 0.4
    x = heldout_set(sde, T, moons, 1000)
    # Start at the held-out mean: every step wanders around the optimum, within the noise.
    prior = ShiftPrior(T, x.mean(0))
    res = fit_prior(prior, sde, T, moons, steps=200, eval_every=5, batch_size=16, lr=2e-3, patience=2,
                    schedule="constant", n_eval=1000, progress=False)
    worse = [h["test_nll"] > res["history"][0]["test_nll"] for h in res["history"][1:]]
    assert sum(worse) >= 10  # a fixed count of 2 non-improving evaluations would have stopped it
    assert res["stopped"] == "steps" and res["steps"] == 200
    assert all(h["delta_vs_best"] <= 2 * h["se_vs_best"] for h in res["history"])
    # A steady degradation is resolved at once: after 2 bad evaluations the fit goes back to its best
    # weights with lr / 3, twice, and then stops.
    drift = DriftPrior(T, x.mean(0))
    res = fit_prior(drift, sde, T, moons, steps=200, eval_every=5, lr=0.05, patience=2, schedule="constant",
                    n_eval=1000, progress=False)
    assert res["stopped"] == "patience" and res["steps"] < 100 and res["best_step"] == 0 and res["lr_cuts"] == 2
    cut_at = [k for k, h in enumerate(res["history"]) if h.get("lr_cut")]
    assert cut_at[0] == 2 and len(cut_at) == 2  # the first two evaluations are already resolved and rising
    assert [h["lr"] for h in res["history"][1:]] == pytest.approx(
        [0.05 / 3 ** sum(c < k for c in cut_at) for k in range(1, len(res["history"]))])
    assert torch.allclose(drift.mu.detach(), x.mean(0))  # the best (initial) weights are restored
    res = fit_prior(DriftPrior(T, x.mean(0)), sde, T, moons, steps=200, eval_every=5, lr=0.05, patience=2,
                    lr_cuts=0, schedule="constant", n_eval=1000, progress=False)
    assert res["stopped"] == "patience" and res["steps"] == 10
    # A rise the noise resolves, then a steady fall that is still above the best: it keeps training.
    falls = fit_prior(ScriptedPrior(T, lambda p: 0.1 - 0.01 * (p / 5 - 1) if p > 0.5 else 0.0), sde, T, moons,
                      steps=50, eval_every=5, lr=1.0, patience=2, lr_cuts=0, schedule="constant", n_eval=200,
                      progress=False)
    assert falls["stopped"] == "steps" and falls["best_step"] == 0
    assert all(h["delta_vs_best"] > 2 * h["se_vs_best"] for h in falls["history"][1:])  # every one resolved
    rises = fit_prior(ScriptedPrior(T, lambda p: 0.01 * p), sde, T, moons, steps=50, eval_every=5, lr=1.0,
                      patience=2, lr_cuts=0, schedule="constant", n_eval=200, progress=False)
    assert rises["stopped"] == "patience" and rises["steps"] == 10
    # The rule itself: within the noise the count restarts; a resolved rise counts unless still falling.
    assert bad_count(3, delta=0.05, se=0.03, z=2.0, falling=False) == 0
    assert bad_count(1, delta=0.07, se=0.03, z=2.0, falling=False) == 2
    assert bad_count(1, delta=0.07, se=0.03, z=2.0, falling=True) == 1
    assert bad_count(0, delta=math.inf, se=0.0, z=2.0, falling=False) == 1
    # The time limit ends the fit at its first evaluation past the limit.
    res = fit_prior(ShiftPrior(T, x.mean(0)), sde, T, moons, steps=200, eval_every=50, time_limit=1e-9,
                    n_eval=200, progress=False)
    assert res["stopped"] == "time" and res["steps"] == 1


def test_fit_run_prior_stores_the_fit_curve(tmp_path, moons):
    sde, T = VPSDE(), 0.4
    _, fit = fit_run_prior(tmp_path, sde, moons.shape, "flow", T, moons, steps=20, batch_size=64, lr=1e-3,
                           progress=False, fit_options={"eval_every": 10, "n_eval": 200}, transforms=1,
                           hidden=[8])
    folder = tmp_path / "priors" / "flow-T0.4"
    curve = json.loads((folder / "fit_curve.json").read_text())
    assert [h["step"] for h in curve["history"]] == [0, 10, 20] and curve["n_eval"] == 200
    assert (folder / "fit_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert fit["history"] == curve["history"]


def test_glow_defaults_to_the_full_gaussian_start(digits):
    sde, T = VPSDE(), 0.2
    glow = make_prior("glow", sde, T, digits, levels=2, steps_per_level=1, hidden=8)
    assert glow.config()["base"] == "full"
    x = heldout_set(sde, T, digits, 300)
    torch.testing.assert_close(glow.log_prob(x), make_prior("gaussian", sde, T, digits).log_prob(x), atol=3e-5,
                               rtol=0)
    assert make_prior("glow", sde, T, digits, levels=1, max_full_dim=10).config()["base"] == "diagonal"


def test_an_unresolved_gain_keeps_the_start(moons):
    """A best step whose held-out gain is within the noise is not kept: the prior returns to its start."""
    sde, T = VPSDE(), 0.4
    # A gain of 1e-4 nats shared by every example: its SE is 0, so it is resolved and kept.
    resolved = ScriptedPrior(T, lambda p: -1e-4 if p > 0.5 else 0.0)
    res = fit_prior(resolved, sde, T, moons, steps=10, eval_every=5, lr=1.0, schedule="constant", n_eval=200,
                    progress=False)
    assert res["gain"]["resolved"] and not res["kept_start"] and res["best_step"] > 0 and float(resolved.p.detach()) > 0
    # Now a gain of +-0.01 nats per example whose mean is half its standard error: it is the best
    # evaluation (the only other is the start), but not resolved, so the start is kept.
    held = heldout_set(sde, T, moons, 1000)  # fit_prior's early-stopping set (seed 0)
    sign = torch.sign(torch.sin(1e4 * held[:, 0])).double()
    a = 0.01
    b = 0.5 * a * float(sign.std()) / math.sqrt(len(sign)) - a * float(sign.mean())
    noisy = ScriptedPrior(T, lambda p: 0.0)
    noisy.curve_x = lambda p, x: -(b + a * torch.sign(torch.sin(1e4 * x[:, 0]))) if p > 0.5 else 0.0 * x[:, 0]
    res = fit_prior(noisy, sde, T, moons, steps=5, eval_every=5, lr=1.0, schedule="constant", n_eval=1000,
                    progress=False)
    assert res["gain"]["mean"] == pytest.approx(0.5 * res["gain"]["se"], rel=1e-3)
    assert res["kept_start"] and res["best_step"] == 0 and float(noisy.p.detach()) == 0.0
    assert res["test_nll"] == res["history"][0]["test_nll"] and not res["gain"]["resolved"]
    res = fit_prior(noisy, sde, T, moons, steps=5, eval_every=5, lr=1.0, schedule="constant", n_eval=1000,
                    require_gain=False, progress=False)
    assert not res["kept_start"] and res["best_step"] == 5
