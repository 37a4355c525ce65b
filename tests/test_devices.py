"""Devices: every command and the library run on CPU and on CUDA, and a seed means the same draws on both.

Each test is parametrized over DEVICES. The CUDA cases are collected everywhere and skipped where
torch sees no GPU, so a CPU machine stays green and a GPU machine (``scripts/gpu_check.sh``) runs them.
On the CPU the device path must give results identical to the default one; on CUDA the same seed
must give the same samples and likelihoods up to float error (difftime.rng's rule: every draw is
made on the CPU and moved).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import difftime as dt
from difftime.cli import main
from difftime.config import build_config
from difftime.data import load_data
from difftime.distributed import module_device, resolve_device, session
from difftime.errors import DifftimeError
from difftime.evaluation import draw_samples, likelihood_metrics, resolve_prior
from difftime.likelihood import elbo, ode_log_likelihood
from difftime.metrics import quality_metrics
from difftime.priors import fit_run_prior, load_prior, prior_dir
from difftime.rng import randn_like_on
from difftime.run import load_run
from difftime.sampling import SAMPLERS, sample
from difftime.training import train_run

pytestmark = pytest.mark.usefixtures("one_thread")

CUDA = torch.cuda.is_available()
_NO_CUDA = pytest.mark.skipif(not CUDA, reason="torch sees no CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=_NO_CUDA)]
# The names --device takes; "auto" is CUDA where there is one, so on a CPU machine it must equal "cpu".
DEVICE_NAMES = ["cpu", "auto", pytest.param("cuda", marks=_NO_CUDA)]
TINY_NET = {"kind": "unet", "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "mid_attention": False}


@pytest.fixture(scope="module", autouse=True)
def exact_cuda_matmuls():
    """CUDA convolutions default to TF32 (10-bit mantissa); the CPU comparisons below want float32."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _same(device: str, got: torch.Tensor, want: torch.Tensor, tol: float = 1e-4) -> None:
    """Identical on the CPU; equal up to float error (relative to the values' scale) on a GPU."""
    got = got.detach().cpu()
    if device == "cpu":
        assert torch.equal(got, want)
    else:
        scale = float(want.abs().max()) + 1.0
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * scale)


@pytest.fixture(scope="module")
def cpu_run(tiny_run):
    return load_run(tiny_run)


@pytest.fixture(scope="module")
def examples(cpu_run):
    """Two test digits in model space, dequantized with a fixed CPU generator."""
    data = load_data("digits", seed=cpu_run.seed)
    return cpu_run.scaler.encode(data.test[:2], generator=torch.Generator().manual_seed(0))


# --- the device rule ---------------------------------------------------------------------------------


def test_device_names_resolve_by_one_rule():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", torch.cuda.current_device()) if CUDA
                                      else torch.device("cpu"))
    for bad in ("gpu", "mps", "cuda:x", "", "cpu:3"):
        with pytest.raises(DifftimeError, match="expected auto, cpu, cuda or cuda:K"):
            resolve_device(bad)
    with session("auto") as device:  # outside torchrun the session only resolves the name
        assert device == str(resolve_device("auto"))


@pytest.mark.skipif(CUDA, reason="checks the error where torch sees no GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_a_gpu_is_one_line_naming_the_fix(name):
    with pytest.raises(DifftimeError, match="use --device cpu") as info:
        resolve_device(name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("device", DEVICES)
def test_draws_come_from_the_cpu_generator_and_move(device):
    x = torch.zeros(3, 4, dtype=torch.float64, device=device)
    z = randn_like_on(x, torch.Generator().manual_seed(7))
    assert z.device == x.device and z.dtype == torch.float64
    assert torch.equal(z.cpu(), torch.randn(3, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64))


@pytest.mark.parametrize("device", DEVICES)
def test_sample_integrates_on_the_model_device_or_the_one_given(device):
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731  (no parameters: the device must be given)
    kwargs = {"n": 3, "steps": 2, "sampler": "dpm++2m-sde"}
    want, _ = sample(zero, dt.VPSDE(), dt.StandardPrior((2,), 0.5), 0.5, generator=torch.Generator().manual_seed(1),
                     **kwargs)
    got, _ = sample(zero, dt.VPSDE(), dt.StandardPrior((2,), 0.5), 0.5, generator=torch.Generator().manual_seed(1),
                    device=device, **kwargs)
    assert got.device == resolve_device(device)
    _same(device, got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_torchrun_session_talks_nccl_on_cuda_and_gloo_on_cpu(monkeypatch, device):
    import difftime.distributed as distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("left"))
    with session(device) as rank_device:
        assert rank_device == ("cpu" if device == "cpu" else "cuda:0")
    assert calls == ["gloo" if device == "cpu" else "nccl", "left"]


# --- run directories: written on one device, loaded on any --------------------------------------------


@pytest.mark.parametrize("device", DEVICE_NAMES)
def test_load_run_on_a_device_gives_the_default_eps(tiny_run, cpu_run, examples, device):
    run = load_run(tiny_run, device=device)
    assert run.device == resolve_device(device) and module_device(run.model) == run.device
    t = torch.full((len(examples),), 0.3)
    with torch.no_grad():
        want = cpu_run.model(examples, t)
        got = run.model(examples.to(run.device), t.to(run.device))
    _same(run.device.type, got, want)


def test_load_run_refuses_a_bad_device_before_reading(tmp_path):
    with pytest.raises(DifftimeError, match="unknown device 'gpu'"):
        load_run(tmp_path, device="gpu")  # not a run directory either: the device is checked first


@pytest.mark.parametrize("device", DEVICES)
def test_train_and_resume_on_the_device(tmp_path, device):
    def config(steps: int) -> dict:
        return build_config(overrides={"data": "digits", "seed": 3, "net": TINY_NET, "train": {
            "steps": steps, "batch_size": 16, "warmup": 1, "log_every": 1, "ckpt_every": 2, "bf16": True}})

    straight = train_run(config(4), tmp_path / "straight", device=device, progress=False)
    train_run(config(2), tmp_path / "split", device=device, progress=False)
    resumed = train_run(config(4), tmp_path / "split", resume=True, device=device, progress=False)
    assert (straight.step, resumed.step, resumed.resumed_at_step) == (4, 4, 2)
    assert resumed.last_loss == pytest.approx(straight.last_loss, rel=1e-5 if device == "cpu" else 5e-2)
    # A run written on the device loads on the CPU, and on the device again.
    on_cpu, on_device = load_run(tmp_path / "split"), load_run(tmp_path / "split", device=device)
    for name, value in on_cpu.model.state_dict().items():
        assert torch.equal(on_device.model.state_dict()[name].cpu(), value), name
    if device == "cpu":  # resume is bitwise on the CPU
        want = load_run(tmp_path / "straight").model.state_dict()
        assert all(torch.equal(value, want[name]) for name, value in on_cpu.model.state_dict().items())


PRIOR_OPTIONS = {"gaussian": {}, "flow": {"transforms": 1, "hidden": [8]},
                 "glow": {"levels": 1, "steps_per_level": 1, "hidden": 8}}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", list(PRIOR_OPTIONS))
def test_fit_prior_on_the_device(tmp_path, tiny_run, cpu_run, device, family):
    data = load_data("digits", seed=cpu_run.seed)
    fits = {}
    for where in dict.fromkeys(("cpu", device)):
        run = tmp_path / where
        shutil.copytree(tiny_run, run)
        prior, fit = fit_run_prior(run, cpu_run.sde, cpu_run.shape, family, 0.5, data, steps=2, batch_size=32,
                                   lr=1e-3, progress=False, fit_options={"n_eval": 64, "eval_every": 1},
                                   device=where, **PRIOR_OPTIONS[family])
        assert module_device(prior) == resolve_device(where)
        assert fit["steps"] == (0 if family == "gaussian" else 2)  # the gaussian is moment-matched, not trained
        fits[where] = load_prior(prior_dir(run, family, 0.5))  # stored from the CPU, loads on the CPU
        x = prior.sample(4, generator=torch.Generator().manual_seed(0))
        assert x.device == module_device(prior) and torch.isfinite(prior.log_prob(x)).all()
    _same_fit(device, fits[device], fits["cpu"], cpu_run.shape)


def _same_fit(device: str, got, want, shape) -> None:
    """Fitted priors: the same weights on the CPU; on a GPU the same density up to float error (an Adam
    step moves a weight by about lr whatever its gradient's size, so weights with a near-zero gradient
    may step apart: compare what the fit is for, log nu)."""
    if device == "cpu":
        assert all(torch.equal(value, want.state_dict()[name]) for name, value in got.state_dict().items())
    else:
        x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(got.log_prob(x), want.log_prob(x), rtol=1e-2, atol=1e-2)


# --- sampling, likelihoods and metrics on the device ------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_gives_the_cpu_samples_for_a_seed(tiny_run, cpu_run, device, sampler):
    run = load_run(tiny_run, device=device)
    prior = resolve_prior(run, "standard", 0.6)
    kwargs = {"n": 3, "sampler": sampler, "steps": 3}
    want, nfe = sample(cpu_run.model, cpu_run.sde, prior, 0.6, generator=torch.Generator().manual_seed(5), **kwargs)
    got, got_nfe = sample(run.model, run.sde, prior, 0.6, generator=torch.Generator().manual_seed(5), **kwargs)
    assert got.device == run.device and got_nfe == nfe
    _same(device, got, want, tol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_draw_samples_follows_the_run_in_fp32_and_bf16(tiny_run, cpu_run, device):
    run = load_run(tiny_run, device=device)
    for precision in ("fp32", "bf16"):  # bf16 autocasts on the run's own device type
        args = ("standard", 0.6, "dpm++2m", 3, 6)
        want = draw_samples(cpu_run, resolve_prior(cpu_run, *args[:2]), *args[1:], seed=1, precision=precision)
        got = draw_samples(run, resolve_prior(run, *args[:2]), *args[1:], seed=1, precision=precision)
        assert got.x.shape == (6, 1, 8, 8) and got.nfe == want.nfe == 4
        if device == "cpu":
            assert np.array_equal(got.x, want.x)
        else:  # data levels: float error may move a value across a bin edge, rarely
            assert np.mean(got.x == want.x) > (0.95 if precision == "fp32" else 0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_elbo_and_pf_ode_on_the_device(tiny_run, cpu_run, examples, device):
    run = load_run(tiny_run, device=device)
    prior = dt.StandardPrior(cpu_run.shape, 0.6)
    got, want = ({"elbo": elbo(r.model, r.sde, examples.to(r.device), prior, 0.6, n_t=8, n_prior=2,
                               generator=torch.Generator().manual_seed(0)).total,
                  "ode": ode_log_likelihood(r.model, r.sde, examples.to(r.device), prior, 0.6, rtol=1e-4, atol=1e-4,
                                            generator=torch.Generator().manual_seed(0)).log_p}
                 for r in (run, cpu_run))
    for key in ("elbo", "ode"):
        assert got[key].device == run.device
        _same(device, got[key], want[key], tol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_likelihood_metrics_and_quality_on_the_device(tiny_run, cpu_run, device):
    run = load_run(tiny_run, device=device)
    raw = load_data("digits", seed=run.seed).test[:3]
    options = {"n_t": 4, "rtol": 1e-3, "atol": 1e-3, "progress": False}
    got = likelihood_metrics(run, {"standard": resolve_prior(run, "standard", 0.6)}, raw, 0.6, **options)
    want = likelihood_metrics(cpu_run, {"standard": resolve_prior(cpu_run, "standard", 0.6)}, raw, 0.6, **options)
    for metric in ("elbo", "nll"):
        a, b = got["standard"][metric]["bpd"], want["standard"][metric]["bpd"]
        assert a == b if device == "cpu" else a == pytest.approx(b, rel=5e-3)  # an adaptive solve: its tolerance
    samples = draw_samples(run, resolve_prior(run, "standard", 0.6), 0.6, "dpm++2m", 3, 20, seed=0).x
    quality = quality_metrics(samples, "digits", ["fd"], progress=False)
    assert quality["n_samples"] == 20 and quality["fd"]["value"] > 0


# --- the command line ------------------------------------------------------------------------------------


def _json_line(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cli_run(tiny_run, tmp_path_factory):
    """A copy of the tiny run with a gaussian prior at T=0.5, fitted on the CPU."""
    run = tmp_path_factory.mktemp("devices") / "run"
    shutil.copytree(tiny_run, run)
    assert main(["fit-prior", str(run), "--T", "0.5", "--prior", "gaussian", "--steps", "2", "--batch-size", "32",
                 "--n-eval", "64", "--eval-every", "1", "--device", "cpu", "--no-progress"]) == 0
    return run


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_cli_sample_on_a_device_matches_cpu(tmp_path, cli_run, capsys, name):
    outs = {}
    for where in dict.fromkeys(("cpu", name)):
        out = tmp_path / f"{where}.npz"
        assert main(["sample", str(cli_run), "--T", "0.5", "--prior", "gaussian", "--sampler", "dpm++2m-sde",
                     "--steps", "3", "--n", "5", "--seed", "2", "--device", where, "--out", str(out)]) == 0
        assert _json_line(capsys)["nfe"] == 4
        with np.load(out) as f:
            outs[where] = f["samples"]
    if name == "cuda":
        assert np.mean(outs["cuda"] == outs["cpu"]) > 0.95
    else:
        assert np.array_equal(outs[name], outs["cpu"])


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_cli_evaluate_on_a_device_matches_cpu(tmp_path, cli_run, capsys, name):
    results = {}
    for where in dict.fromkeys(("cpu", name)):
        out = tmp_path / f"{where}.json"
        assert main(["evaluate", str(cli_run), "--T", "0.5", "--prior", "gaussian", "--n", "3", "--n-t", "4",
                     "--tol", "1e-3", "--device", where, "--no-progress", "--out", str(out)]) == 0
        capsys.readouterr()
        results[where] = json.loads(out.read_text())
    for metric in ("elbo", "nll"):
        a, b = results[name][metric]["bpd"], results["cpu"][metric]["bpd"]
        assert a == b if name != "cuda" else a == pytest.approx(b, rel=5e-3)


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_cli_fit_prior_on_a_device_matches_cpu(tmp_path, tiny_run, capsys, name):
    fitted = {}
    for where in dict.fromkeys(("cpu", name)):
        run = tmp_path / where
        shutil.copytree(tiny_run, run)
        assert main(["fit-prior", str(run), "--T", "0.5", "--prior", "flow", "--transforms", "1", "--hidden", "8",
                     "--steps", "2", "--batch-size", "32", "--n-eval", "64", "--eval-every", "1", "--device", where,
                     "--no-progress"]) == 0
        assert _json_line(capsys)["steps"] == 2
        fitted[where] = load_prior(prior_dir(run, "flow", 0.5))
    _same_fit("cuda" if name == "cuda" else "cpu", fitted[name], fitted["cpu"], (1, 8, 8))


@pytest.mark.parametrize("name", DEVICE_NAMES)
def test_cli_grid_on_a_device_matches_cpu(tmp_path, cli_run, capsys, name):
    grids = {}
    for where in dict.fromkeys(("cpu", name)):
        out = tmp_path / f"{where}.json"
        assert main(["grid", str(cli_run), "--T", "0.5", "--prior", "gaussian", "--sampler", "dpm++2m", "--nfe", "4",
                     "--n", "4", "--fine-steps", "6", "--device", where, "--out", str(out)]) == 0
        grids[where] = _json_line(capsys)["ts"]
    if name == "cuda":
        assert len(grids["cuda"]) == len(grids["cpu"])  # the least-cost path may differ by float error
    else:
        assert grids[name] == grids["cpu"]


@pytest.mark.parametrize("command", [
    ["train", "--data", "digits", "--out", "{tmp}/r"],
    ["fit-prior", "{run}", "--T", "0.5", "--prior", "gaussian"],
    ["sample", "{run}", "--out", "{tmp}/s.npz"],
    ["evaluate", "{run}", "--metrics", "elbo"],
    ["grid", "{run}", "--nfe", "4", "--out", "{tmp}/g.json"],
    ["study", "--preset", "digits", "--out", "{tmp}/study"],
])
@pytest.mark.parametrize("device, message", [
    ("gpu", "unknown device 'gpu'; expected auto, cpu, cuda or cuda:K"),
    pytest.param("cuda", "sees no CUDA GPU", marks=pytest.mark.skipif(CUDA, reason="a GPU is visible")),
    ("cuda:99", "cuda:99"),
])
def test_a_bad_device_is_one_line_and_exit_2(tmp_path, tiny_run, capsys, command, device, message):
    argv = [a.format(tmp=tmp_path, run=tiny_run) for a in command] + ["--device", device]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difftime: error:") and "\n" not in err and message in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "study").exists()
    assert not (tiny_run / "priors").exists()
