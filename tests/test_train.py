"""Training: the DSM loss and its time sampling, learning the exact eps*, run dirs and resume."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad

from difftime.config import build_config
from difftime.data import gaussian_params, load_data
from difftime.nets import MLP, UNet
from difftime.run import load_run
from difftime.sde import VESDE, VPSDE, SubVPSDE
from difftime.testing import ExactGaussianEps
from difftime.training import Trainer, dsm_loss, sample_time

TINY_UNET = {"kind": "unet", "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "mid_attention": False}


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("weighting,importance", [("standard", False), ("likelihood", True),
                                                  ("likelihood", False)])
def test_time_weights_are_unbiased(sde, weighting, importance):
    """E[weight(t) h(t)] equals int lambda(t)/v(t) h(t) dt / (T - eps)-normalised as intended."""
    T, eps = 0.6, 1e-3
    gen = torch.Generator().manual_seed(0)
    t, w = sample_time(sde, 400_000, T, eps, weighting, importance, gen)
    assert t.min() >= eps * (1 - 1e-6) and t.max() <= T * (1 + 1e-6)
    h = lambda r: math.cos(3 * r)  # noqa: E731
    estimate = (w.double() * torch.cos(3 * t.double())).mean().item()
    if weighting == "standard":
        expected = quad(h, eps, T)[0] / (T - eps)
    else:
        g2v = lambda r: float(sde.g2(torch.tensor([r], dtype=torch.float64)) /  # noqa: E731
                              sde.v(torch.tensor([r], dtype=torch.float64)))
        expected = quad(lambda r: g2v(r) * h(r), eps, T, limit=400, points=[0.01])[0]
    assert estimate == pytest.approx(expected, rel=0.02)


def _gaussian_config(steps: int) -> dict:
    return build_config(overrides={
        "data": "gaussian:d=2,mean=0.5,scale=0.3", "seed": 0,
        "net": {"kind": "mlp", "hidden": 64, "depth": 2},
        "train": {"steps": steps, "batch_size": 512, "lr": 3e-3, "warmup": 50, "ema_decay": 0.98,
                  "log_every": 100, "ckpt_every": 10_000},
    })


def _relative_eps_error(model, sde, mu, lam) -> float:
    exact = ExactGaussianEps(sde, mu, lam)
    gen = torch.Generator().manual_seed(123)
    n = 4096
    x0 = mu + lam.sqrt() * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    t = 0.1 + 0.9 * torch.rand(n, generator=gen, dtype=torch.float64)
    xt, _ = sde.marginal_sample(x0, t, gen)
    with torch.no_grad():
        got = model(xt.float(), t.float()).double()
    want = exact(xt, t)
    return ((got - want).pow(2).sum() / want.pow(2).sum()).item()


def test_mlp_learns_the_exact_gaussian_eps(tmp_path):
    config = _gaussian_config(steps=1500)
    data = load_data(config["data"], seed=0)
    mu, lam = gaussian_params(config["data"])
    trainer = Trainer(config, data)
    before = _relative_eps_error(trainer.model, trainer.sde, mu, lam)
    trainer.fit(tmp_path, progress=False)
    after = _relative_eps_error(trainer.ema.module, trainer.sde, mu, lam)
    assert before > 0.5, before
    assert after < 0.01, after


def _digits_config(steps: int, **train) -> dict:
    return build_config(overrides={
        "data": "digits", "seed": 3, "net": TINY_UNET,
        "train": {"steps": steps, "batch_size": 32, "lr": 2e-3, "warmup": 5, "ema_decay": 0.9,
                  "log_every": 5, "ckpt_every": 1000, **train},
    })


def _eval_loss(model, sde, data) -> float:
    gen = torch.Generator().manual_seed(7)
    x0 = data.scaler.encode(data.test[:256], generator=gen)
    t, w = sample_time(sde, len(x0), 1.0, sde.eps, "standard", False, gen)
    with torch.no_grad():
        return dsm_loss(model, sde, x0, t, w, gen).mean().item()


def test_training_lowers_the_loss_on_digits_and_the_run_dir_round_trips(tmp_path):
    config = _digits_config(steps=60)
    data = load_data("digits")
    trainer = Trainer(config, data)
    initial = _eval_loss(trainer.model, trainer.sde, data)
    trainer.write_config(tmp_path)
    trainer.fit(tmp_path, progress=False)
    trained = _eval_loss(trainer.model, trainer.sde, data)
    assert trained < 0.6 * initial, (initial, trained)

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 8, 8, generator=gen)
    t = torch.rand(8, generator=gen)
    for weights, module in (("model", trainer.model), ("ema", trainer.ema.module)):
        run = load_run(tmp_path, weights=weights)
        module.eval()
        with torch.no_grad():
            assert torch.equal(run.model(x, t), module(x, t))
        assert run.step == 60 and run.shape == (1, 8, 8)
        assert run.sde.to_config() == trainer.sde.to_config()
        assert run.scaler == data.scaler


def test_resume_is_bitwise_identical(tmp_path):
    data = load_data("digits")
    straight = Trainer(_digits_config(steps=12), data)
    straight.fit(tmp_path / "a", progress=False)

    first = Trainer(_digits_config(steps=5), data)
    first.fit(tmp_path / "b", progress=False)
    resumed = Trainer(_digits_config(steps=12), data)
    resumed.load(tmp_path / "b")
    assert resumed.step == 5
    resumed.fit(tmp_path / "b", progress=False)

    for name, a in straight.model.state_dict().items():
        assert torch.equal(a, resumed.model.state_dict()[name]), name
    for name, a in straight.ema.module.state_dict().items():
        assert torch.equal(a, resumed.ema.module.state_dict()[name]), name
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)
    steps = [int(line.split('"step": ')[1].split(",")[0])
             for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "a resumed log must not repeat steps"


def test_likelihood_weighting_trains(tmp_path):
    config = _digits_config(steps=30, weighting="likelihood", bf16=True)
    data = load_data("digits")
    trainer = Trainer(config, data)
    initial = _eval_loss(trainer.model, trainer.sde, data)
    trainer.fit(tmp_path, progress=False)
    assert _eval_loss(trainer.model, trainer.sde, data) < initial


def test_networks_treat_examples_independently_and_use_time():
    """No batch mixing (GroupNorm, attention) and a real dependence on absolute t."""
    torch.manual_seed(0)
    for net, shape in ((UNet(ch=16, ch_mult=(1, 2, 2), attn_levels=(2,)), (5, 1, 28, 28)),
                       (UNet(in_channels=3, ch=16, ch_mult=(1, 2)), (5, 3, 12, 12)),
                       (MLP(dim=3, hidden=32), (5, 3))):
        for p in net.parameters():  # the U-Net starts at zero output; perturb so the test can fail
            torch.nn.init.normal_(p, std=0.05)
        x = torch.randn(shape)
        t = torch.rand(5)
        out = net(x, t)
        assert out.shape == x.shape
        assert torch.allclose(net(x[2:3], t[2:3]), out[2:3], atol=1e-5)
        assert not torch.allclose(net(x, t * 0.5), out, atol=1e-4)


def test_cifar10_preset_builds_and_takes_a_training_step_on_random_32x32_images(tmp_path):
    """The GPU-sized cifar10 preset (the DDPM CIFAR-10 U-Net, about 35.7M parameters): its network is
    built from the preset and one bf16 training step runs on random 32x32 RGB images."""
    import numpy as np

    from difftime.training import train_run

    rng = np.random.default_rng(0)
    data = tmp_path / "random32.npz"
    np.savez(data, train=rng.integers(0, 256, (8, 3, 32, 32), dtype=np.uint8),
             test=rng.integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    config = build_config("cifar10", overrides={"data": f"npz:{data}", "train": {"steps": 1, "batch_size": 2,
                                                                                 "warmup": 1, "log_every": 1}})
    result = train_run(config, tmp_path / "run", device="cpu", progress=False)
    assert result.step == 1 and math.isfinite(result.last_loss)
    assert 35e6 < result.params < 37e6  # Ho et al.'s 35.7M
    run = load_run(tmp_path / "run")
    assert run.shape == (3, 32, 32) and isinstance(run.model, UNet)


def test_resume_prunes_checkpoint_folders_a_kill_left_beyond_keep(tmp_path):
    """A kill after the last save but before its pruning leaves one folder too many; the resume prunes it."""
    import shutil

    from difftime.run import checkpoint_dir, saved_checkpoints

    data = load_data("digits")
    trainer = Trainer(_digits_config(steps=6, ckpt_every=2, keep_checkpoints=2), data)
    trainer.fit(tmp_path, progress=False)
    assert [p.name for p in saved_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]
    shutil.copytree(checkpoint_dir(tmp_path, 4), checkpoint_dir(tmp_path, 2))  # the folder the kill spared
    resumed = Trainer(_digits_config(steps=6, ckpt_every=2, keep_checkpoints=2), data)
    resumed.load(tmp_path)
    assert resumed.step == 6
    assert [p.name for p in saved_checkpoints(tmp_path)] == ["step-00000004", "step-00000006"]
