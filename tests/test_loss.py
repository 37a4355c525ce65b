"""The training objective (difftime.training.loss) and the EDM wrapper (difftime.nets.precond): the
log-SNR-normal draw of t, the min-SNR and EDM weightings and the cosine schedule, against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from difftime.config import build_config
from difftime.data import load_data
from difftime.errors import DifftimeError
from difftime.nets import EDMPreconditioned, net_from_config
from difftime.run import load_run
from difftime.sde import VESDE, VPSDE, SubVPSDE, broadcast_to
from difftime.training import Trainer, sample_time
from difftime.training.loss import lr_factor

SDES = [VPSDE(), SubVPSDE(), VESDE()]
IDS = ["vp", "subvp", "ve"]
TINY_UNET = {"kind": "unet", "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "mid_attention": False}


class _Zero(torch.nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


class _Random(torch.nn.Module):
    def forward(self, x, t):
        return torch.sin(3 * x) + t[:, None]


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_edm_preconditioning_with_zero_output_is_the_exact_eps_of_gaussian_data(sde):
    """For x0 ~ N(0, sd^2 I), E[z | x_t] = s x_t / (s^2 + m^2 sd^2): the skip path alone."""
    sd = 0.7
    net = EDMPreconditioned(_Zero(), sde, sd)
    gen = torch.Generator().manual_seed(0)
    t = torch.linspace(sde.eps, sde.T_max, 257)
    xt = torch.randn(257, 3, generator=gen) * 5
    t64 = t.double()
    m, s = sde.m(t64), sde.sigma(t64)
    exact = (s / (s**2 + m**2 * sd**2))[:, None] * xt.double()
    assert torch.allclose(net(xt, t).double(), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_edm_loss_weight_turns_the_eps_error_into_the_inner_networks_error(sde):
    """w(t) ||eps_hat - z||^2 = ||F - F_target||^2 with F_target = (c_skip u - z) / c_out, and sample_time's
    "edm" weight is the same w(t)."""
    sd = 0.5
    net = EDMPreconditioned(_Random(), sde, sd)
    gen = torch.Generator().manual_seed(1)
    t = sde.eps + (sde.T_max - sde.eps) * torch.rand(64, generator=gen)
    x0 = torch.randn(64, 4, generator=gen) * sd
    xt, z = sde.marginal_sample(x0, t, gen)
    c_in, c_skip, c_out = (broadcast_to(c, xt).double() for c in net.coefficients(t))
    u = xt.double() * c_in
    f = net.inner(u.float(), t).double()
    target = (c_skip * u - z.double()) / c_out
    w = net.loss_weight(t).double()
    lhs = w * (net(xt, t).double() - z.double()).pow(2).sum(1)
    rhs = (f - target).pow(2).sum(1)
    assert torch.allclose(lhs, rhs, rtol=1e-3)
    _, w_loss = sample_time(sde, 64, sde.T_max, sde.eps, "edm", False, torch.Generator().manual_seed(2),
                            sigma_data=sd)
    t_loss, _ = sample_time(sde, 64, sde.T_max, sde.eps, "edm", False, torch.Generator().manual_seed(2),
                            sigma_data=sd)
    assert torch.allclose(w_loss, net.loss_weight(t_loss), rtol=1e-4)


@pytest.mark.parametrize("sde", SDES, ids=IDS)
def test_log_snr_normal_draw_is_the_truncated_normal_on_the_horizon(sde):
    T, eps, mean, std = 0.6, 1e-3, 1.2, 1.2
    t, w = sample_time(sde, 50_000, T, eps, "standard", False, torch.Generator().manual_seed(0),
                       t_distribution="log-snr-normal", log_snr_mean=mean, log_snr_std=std)
    assert t.min() >= eps * (1 - 1e-6) and t.max() <= T * (1 + 1e-6)
    assert torch.all(w == 1)
    lam = sde.log_snr(t.double()).numpy()
    lo, hi = (float(sde.log_snr(torch.tensor(v, dtype=torch.float64))) for v in (T, eps))
    law = stats.truncnorm((lo - mean) / std, (hi - mean) / std, loc=mean, scale=std)
    assert stats.kstest(lam, law.cdf).pvalue > 1e-3


def test_min_snr_weight_is_min_snr_gamma_over_snr():
    sde = VPSDE()
    t, w = sample_time(sde, 10_000, 1.0, sde.eps, "min-snr", False, torch.Generator().manual_seed(0),
                       min_snr_gamma=5.0)
    snr = torch.exp(2 * sde.log_snr(t.double()))
    assert torch.allclose(w.double(), torch.minimum(snr, torch.tensor(5.0)) / snr, rtol=1e-4)
    assert torch.all(w[snr < 5] == 1) and torch.all(w[snr > 5.01] < 1)


def test_cosine_schedule_warms_up_then_decays_to_zero():
    steps, warmup = 1000, 100
    f = [lr_factor(s, steps, warmup, "cosine") for s in range(steps)]
    assert f[0] == pytest.approx(1 / warmup) and f[warmup - 1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[warmup - 1:], f[warmup:], strict=False))
    assert f[-1] < 1e-4 and f[-1] > 0
    assert f[warmup - 1 + (steps - warmup + 1) // 2] == pytest.approx(0.5, abs=0.01)
    assert [lr_factor(s, steps, warmup, "constant") for s in (0, 99, 500, 999)] == [0.01, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("override,match", [
    ({"train": {"t_distribution": "lognormal"}}, "train.t_distribution"),
    ({"train": {"weighting": "snr"}}, "train.weighting"),
    ({"train": {"weighting": "likelihood", "t_distribution": "log-snr-normal"}}, "t_distribution='uniform'"),
    ({"train": {"lr_schedule": "linear"}}, "train.lr_schedule"),
    ({"train": {"adam_betas": [0.9, 1.5]}}, "train.adam_betas"),
    ({"train": {"log_snr_std": 0}}, "train.log_snr_std"),
    ({"net": {"precond": "vp"}}, "net.precond"),
    ({"net": {"sigma_data": -1}}, "net.sigma_data"),
])
def test_bad_recipe_options_fail_with_one_line(override, match):
    with pytest.raises(DifftimeError, match=match):
        build_config(overrides=override)


def test_precond_needs_the_sde():
    with pytest.raises(DifftimeError, match="needs the run's SDE"):
        net_from_config({"kind": "mlp", "dim": 2, "precond": "edm"})


def test_a_preconditioned_run_trains_saves_and_loads_back(tmp_path):
    config = build_config(overrides={
        "data": "digits", "seed": 3, "net": {**TINY_UNET, "precond": "edm", "sigma_data": 0.5},
        "train": {"steps": 20, "batch_size": 32, "lr": 2e-3, "warmup": 5, "ema_decay": 0.9, "log_every": 5,
                  "ckpt_every": 1000, "t_distribution": "log-snr-normal", "weighting": "edm",
                  "lr_schedule": "cosine", "adam_betas": [0.9, 0.99]},
    })
    data = load_data("digits")
    trainer = Trainer(config, data)
    assert isinstance(trainer.model, EDMPreconditioned)
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    trainer.write_config(tmp_path)
    first = trainer.train_step()["loss"]
    trainer.fit(tmp_path, progress=False)
    assert math.isfinite(first)
    assert trainer.lr_at(19) < 0.05 * config["train"]["lr"]  # the cosine has almost reached zero
    run = load_run(tmp_path)
    assert isinstance(run.model, EDMPreconditioned) and run.model.sigma_data == 0.5
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 1, 8, 8, generator=gen), torch.rand(8, generator=gen)
    trainer.ema.module.eval()
    with torch.no_grad():
        assert torch.equal(run.model(x, t), trainer.ema.module(x, t))
