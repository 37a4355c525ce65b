"""Retrofitting a diffusers DDPM: the schedule check, the time map, the sampler against DDPMPipeline, the CLI.

The model is a tiny UNet2DModel trained for a few seconds on digits with diffusers' own DDPM recipe
(``scheduler.add_noise`` and an MSE on eps), so that its reverse process behaves like a real
checkpoint's: an untrained network amplifies the start noise by up to 1/m(1) ~ 150, and its samples
then say little about either sampler.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from difftime.cli import main  # noqa: E402
from difftime.data import load_data  # noqa: E402
from difftime.errors import DifftimeError  # noqa: E402
from difftime.nets.diffusers import KERNEL_TOL, DiffusersEps, check_schedule, check_unet_config  # noqa: E402
from difftime.priors import StandardPrior  # noqa: E402
from difftime.run import load_run  # noqa: E402
from difftime.sampling import predictor_corrector, timesteps  # noqa: E402

N = 200  # betas 5e-4..0.1: N beta_1 = 0.1 and N beta_N = 20, difftime's default VP
UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    attention_head_dim=8,
)


@pytest.fixture(scope="module")
def ddpm_dir(tmp_path_factory):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**UNET)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=N, beta_start=0.1 / N, beta_end=20 / N, clip_sample=False)
    dataset = load_data("digits")
    x0_all = dataset.scaler.encode(dataset.train, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    for _ in range(300):
        x0 = x0_all[torch.randint(len(x0_all), (64,), generator=g)]
        step = torch.randint(N, (64,), generator=g)
        z = torch.randn(x0.shape, generator=g)
        loss = (unet(scheduler.add_noise(x0, z, step), step).sample - z).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("ddpm") / "pipe"
    diffusers.DDPMPipeline(unet=unet.eval(), scheduler=scheduler).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(ddpm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "imported"
    assert main(["import", f"diffusers:{ddpm_dir}", "--data", "digits", "--out", str(out)]) == 0
    return out


def _diffusers_unet(ddpm_dir):
    return diffusers.UNet2DModel.from_pretrained(
        ddpm_dir / "unet", use_safetensors=True, low_cpu_mem_usage=False
    ).eval()


def _diffusers_neg_log_abar():
    """-log alphas_cumprod as diffusers computes it, at steps -1 (where it is 0), 0, ..., N-1."""
    s = diffusers.DDPMScheduler(num_train_timesteps=N, beta_start=0.1 / N, beta_end=20 / N)
    return np.concatenate([[0.0], -np.log(s.alphas_cumprod.double().numpy())])


def test_linear_ddpm_is_the_vp_sde():
    schedule, prediction = check_schedule({"num_train_timesteps": N, "beta_start": 0.1 / N, "beta_end": 20 / N})
    assert prediction == "epsilon"
    assert schedule.sde().to_config() == {"kind": "vp", "b0": 0.1, "b1": 20.0, "T_max": 1.0, "eps": 1 / N}
    np.testing.assert_allclose(
        schedule.neg_log_alphas_cumprod().numpy(), _diffusers_neg_log_abar(), rtol=1e-5, atol=1e-7
    )
    # the standard DDPM (1000 steps, 1e-4..0.02) is the same SDE, closer still
    standard, _ = check_schedule({})
    assert standard.sde().to_config()["b1"] == pytest.approx(20.0)
    assert standard.kernel_error() == pytest.approx(0.0013, abs=1e-4)
    assert standard.kernel_error() < schedule.kernel_error() < KERNEL_TOL


@pytest.mark.parametrize(
    "change, message",
    [
        ({"beta_schedule": "scaled_linear"}, "beta_schedule 'scaled_linear' is not supported"),
        ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule 'squaredcos_cap_v2' is not supported"),
        (
            {"trained_betas": (np.linspace(1e-4**0.5, 0.02**0.5, N) ** 2).tolist(), "num_train_timesteps": N},
            "trained_betas are not linear",
        ),
        ({"num_train_timesteps": 100, "beta_start": 1e-3, "beta_end": 0.2}, "too few steps"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({"prediction_type": "flow"}, "prediction_type 'flow' is unknown"),
    ],
)
def test_schedule_mismatch_is_refused(change, message):
    with pytest.raises(DifftimeError, match=message):
        check_schedule({"num_train_timesteps": 1000, **change})


def test_linear_trained_betas_are_accepted():
    schedule, _ = check_schedule({"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()})
    assert (schedule.beta_start, schedule.beta_end) == pytest.approx((1e-4, 0.02))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"_class_name": "UNet2DConditionModel"}, "UNet2DConditionModel is not supported"),
        ({"time_embedding_type": "fourier"}, "time_embedding_type 'fourier'"),
        ({"num_class_embeds": 10}, "class-conditional"),
        ({"out_channels": 3}, "out_channels 3 != in_channels 1"),
    ],
)
def test_unsupported_unets_are_refused(change, message):
    assert check_unet_config(dict(UNET)) == (1, 8, 8)
    with pytest.raises(DifftimeError, match=message):
        check_unet_config({**UNET, **change})


def test_time_map_lands_on_training_steps(run_dir):
    model = load_run(run_dir).model
    assert isinstance(model, DiffusersEps)
    sde = model.sde
    c = _diffusers_neg_log_abar()
    # The time whose m(t)^2 is diffusers' alphas_cumprod[i] maps to step i exactly.
    t_exact = sde.B_inverse(torch.tensor(c[1:]))
    np.testing.assert_allclose(model.timestep(t_exact).numpy(), np.arange(N), atol=1e-3)
    # The nominal grid t_i = (i + 1) / N stays within a few steps of i, increasing.
    tau = model.timestep(torch.arange(1, N + 1, dtype=torch.float64) / N).numpy()
    assert np.abs(tau - np.arange(N)).max() < 3.5 and np.all(np.diff(tau) > 0)


def test_wrapped_eps_is_the_unet_at_the_mapped_step(run_dir, ddpm_dir):
    run, unet = load_run(run_dir), _diffusers_unet(ddpm_dir)
    sde, c = run.sde, _diffusers_neg_log_abar()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = torch.tensor([0, 1, 17, 99, 150, N - 1])
    with torch.no_grad():
        # at exact noise levels: the UNet called as DDPMPipeline calls it, with integer steps
        ours = run.model(x, sde.B_inverse(torch.tensor(c[1:][steps.numpy()])).float())
        np.testing.assert_allclose(ours.numpy(), unet(x, steps).sample.numpy(), atol=1e-4)
        # anywhere: the fractional step whose interpolated log alphas_cumprod is -B(t)
        t = torch.tensor([0.005, 0.0123, 0.2, 0.4, 0.77, 1.0])
        tau = np.interp(sde.B(t.double()).numpy(), c, np.arange(-1, N))
        expected = unet(x, torch.tensor(tau, dtype=torch.float32)).sample
        np.testing.assert_allclose(run.model(x, t).numpy(), expected.numpy(), atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_v_and_sample_prediction_are_converted_exactly(prediction_type, run_dir):
    base = load_run(run_dir).model
    net = DiffusersEps(dict(base.unet.config), N, 0.1 / N, 20 / N, prediction_type=prediction_type)
    net.load_state_dict(base.state_dict())
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0.01, 0.3, 0.6, 0.95])
    m, s = net.sde.m(t).view(-1, 1, 1, 1), net.sde.sigma(t).view(-1, 1, 1, 1)
    with torch.no_grad():
        out = base(x, t)  # the raw UNet output at tau(t)
        eps = net(x, t)
    # v = m eps - s x0 and x = m x0 + s eps, solved for eps; "sample" predicts x0
    expected = m * out + s * x if prediction_type == "v_prediction" else (x - m * out) / s
    torch.testing.assert_close(eps, expected, atol=1e-5, rtol=1e-5)


def test_learned_variance_channels_are_dropped():
    config = {**UNET, "out_channels": 2}
    assert check_unet_config(config, variance_type="learned_range") == (1, 8, 8)
    net = DiffusersEps(config, N, 0.1 / N, 20 / N).eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        full = net.unet(x, net.timestep(t).float()).sample
        torch.testing.assert_close(net(x, t), full[:, :1])


def test_sampler_matches_ddpm_pipeline_from_the_same_seed(run_dir, ddpm_dir):
    """T = 1, standard prior, N - 1 reverse-diffusion steps on [1/N, 1] + the final denoise = DDPM's N calls.

    Both consume one generator identically (x_T, then one normal draw per step but the last), so each
    sample is paired with its DDPMPipeline twin. The samplers still differ by O(beta^2) per step (the
    continuous VP vs the discrete chain, variance beta vs DDPM's posterior variance), which a model
    that is not an exact score turns into different samples: the paired check allows 15% of the spread
    (measured 8% here, 5% after 600 training steps, 13% after 150). Scaling eps by 0.95 gives 43% and
    a 9-se shift of a pixel mean, by 1.05 gives 17%; an unpaired seed gives 100%. The distribution
    checks use the unpaired standard errors of n samples.
    """
    n = 256
    pipe = diffusers.DDPMPipeline.from_pretrained(ddpm_dir, use_safetensors=True, low_cpu_mem_usage=False)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(
        batch_size=n, generator=torch.Generator().manual_seed(1), num_inference_steps=N, output_type="pt"
    ).images  # (x / 2 + 0.5).clamp(0, 1)
    run = load_run(run_dir)
    assert run.sde.eps == 1 / N

    def ours(model):
        g = torch.Generator().manual_seed(1)
        x_T = StandardPrior.for_sde(run.sde, 1.0, run.shape).sample(n, generator=g)
        ts = timesteps(run.sde, 1.0, run.sde.eps, N - 1, "time")
        x0, nfe = predictor_corrector(model, run.sde, x_T, ts, generator=g, corrector_steps=0)
        assert nfe == N
        return (x0 / 2 + 0.5).clamp(0, 1)

    def paired_gap(x):
        return float((x - ref).pow(2).mean().sqrt() / ref.std())

    x = ours(run.model)
    assert paired_gap(x) < 0.15
    se_mean = ref.std(0) / math.sqrt(n)
    assert float(((x.mean(0) - ref.mean(0)).abs() / se_mean).max()) < 4
    # se of log(std_a / std_b) for two unpaired sets of n normal samples is ~ 1 / sqrt(n)
    assert abs(math.log(float(x.std() / ref.std()))) < 4 / math.sqrt(n)
    bad = ours(lambda x, t: 0.95 * run.model(x, t))  # the checks have teeth: a 5% error in eps fails both
    assert paired_gap(bad) > 0.3 and float(((bad.mean(0) - ref.mean(0)).abs() / se_mean).max()) > 4


def test_fit_prior_sample_evaluate_at_T04(run_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    assert main(["fit-prior", str(run), "--T", "0.4", "--prior", "gaussian", "--no-progress"]) == 0
    out = tmp_path / "s.npz"
    # 0.4 N - 1 steps on [1/N, 0.4]: DDPM's own last 40% of the grid, 40% of the network calls
    assert (
        main(
            [
                "sample",
                str(run),
                "--T",
                "0.4",
                "--prior",
                "gaussian",
                "--steps",
                str(int(0.4 * N) - 1),
                "--n",
                "16",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    with np.load(out) as f:
        assert f["samples"].shape == (16, 1, 8, 8) and f["samples"].max() <= 16 and int(f["nfe"]) == 0.4 * N
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(run),
                "--T",
                "0.4",
                "--prior",
                "gaussian",
                "--metrics",
                "elbo",
                "--n",
                "8",
                "--n-t",
                "2",
                "--no-progress",
                "--out",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "e.json").read_text())
    assert math.isfinite(result["elbo"]["bpd"]) and result["eps"] == 1 / N


def test_study_accepts_an_imported_run(run_dir):
    from difftime.study import study_config

    config = study_config(None, None, {}, run=str(run_dir))
    assert config["data"] == "digits" and config["sde"]["eps"] == 1 / N and config["train"]["T"] == 1.0


def _cli_error(argv, capsys):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


def test_import_refuses_bad_input_with_one_line(ddpm_dir, run_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(ddpm_dir, bad)
    cfg = bad / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "beta_schedule": "scaled_linear"}))
    assert "beta_schedule 'scaled_linear' is not supported" in _cli_error(
        ["import", f"diffusers:{bad}", "--data", "digits", "--out", str(tmp_path / "r1")], capsys
    )
    assert "has shape (2,), but the UNet" in _cli_error(
        ["import", f"diffusers:{ddpm_dir}", "--data", "toy:moons", "--out", str(tmp_path / "r2")], capsys
    )
    assert "source must be diffusers:DIR" in _cli_error(
        ["import", str(ddpm_dir), "--data", "digits", "--out", str(tmp_path / "r3")], capsys
    )
    pickled = tmp_path / "pickled"
    shutil.copytree(ddpm_dir / "unet", pickled)
    shutil.copy(ddpm_dir / "scheduler" / "scheduler_config.json", pickled)
    (pickled / "diffusion_pytorch_model.safetensors").rename(pickled / "diffusion_pytorch_model.bin")
    assert "never unpickles" in _cli_error(
        ["import", f"diffusers:{pickled}", "--data", "digits", "--out", str(tmp_path / "r4")], capsys
    )
    assert "does not train it" in _cli_error(["train", "--resume", str(run_dir)], capsys)
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 5))


def test_a_bare_unet_folder_with_its_scheduler_imports(ddpm_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(ddpm_dir / "unet", bare)
    shutil.copy(ddpm_dir / "scheduler" / "scheduler_config.json", bare)
    assert main(["import", f"diffusers:{bare}", "--data", "digits", "--out", str(tmp_path / "r")]) == 0
    assert isinstance(load_run(tmp_path / "r", weights="model").model, DiffusersEps)


def test_without_diffusers_the_error_names_the_extra(run_dir, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "diffusers", None)
    with pytest.raises(DifftimeError, match=r"difftime\[diffusers\]"):
        load_run(run_dir)
