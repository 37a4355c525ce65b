"""The command line: train, resume, sample, and one clear line with exit code 2 for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from difftime.cli import main
from difftime.io import sha256_file


@pytest.fixture(scope="module")
def trained_run(tiny_run):
    return tiny_run


def _fingerprint(run):
    return {p.name: sha256_file(p) for p in sorted(run.iterdir()) if p.is_file()}


def test_train_writes_a_complete_run_dir(trained_run):
    names = {p.name for p in trained_run.iterdir()}
    assert {"config.json", "model.safetensors", "ema.safetensors", "state.safetensors",
            "state.json", "metrics.jsonl"} <= names
    config = json.loads((trained_run / "config.json").read_text())
    assert config["resolved"]["net"]["kind"] == "unet"
    assert config["resolved"]["scaler"]["levels"] == 17
    assert config["config"]["train"]["steps"] == 6
    assert json.loads((trained_run / "state.json").read_text())["step"] == 6
    assert not [p for p in trained_run.iterdir() if p.name.endswith(".tmp")]


def test_resume_extends_training(tmp_path, trained_run, capsys):
    run = tmp_path / "copy"
    shutil.copytree(trained_run, run)
    assert main(["train", "--resume", str(run), "--steps", "9", "--no-progress"]) == 0
    assert json.loads((run / "state.json").read_text())["step"] == 9
    assert "resuming" in capsys.readouterr().err


def test_sample_writes_data_space_images_and_a_grid(tmp_path, trained_run, capsys):
    out = tmp_path / "s.npz"
    assert main(["sample", str(trained_run), "--T", "0.5", "--steps", "7", "--n", "9",
                 "--out", str(out), "--grid", str(tmp_path / "g.png")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["nfe"] == 8 and report["T"] == 0.5
    with np.load(out) as f:
        samples = f["samples"]
    assert samples.shape == (9, 1, 8, 8) and samples.dtype == np.uint8 and samples.max() <= 16
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_steps_per_unit_time_makes_nfe_proportional_to_T(tmp_path, trained_run, capsys):
    nfes = []
    for T in ("0.2", "0.4", "0.8"):
        assert main(["sample", str(trained_run), "--T", T, "--steps-per-unit-time", "50", "--n", "2",
                     "--out", str(tmp_path / f"{T}.npz")]) == 0
        nfes.append(json.loads(capsys.readouterr().out.strip())["nfe"])
    assert nfes == [11, 21, 41]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--data", "digits"], "needs --out"),
        (["train", "--data", "nope:x", "--out", "{tmp}/r"], "nope"),
        (["train", "--preset", "nope", "--out", "{tmp}/r"], "unknown preset"),
        (["train", "--data", "digits", "--T", "-1", "--out", "{tmp}/r"], "positive number"),
        (["train", "--data", "digits", "--T", "1.5", "--out", "{tmp}/r"], "T <= sde.T_max"),
        (["train", "--data", "digits", "--steps", "zero", "--out", "{tmp}/r"], "expected an integer"),
        (["train", "--config", "{tmp}/bad_key.json", "--out", "{tmp}/r"], "unknown config key 'train.stpes'"),
        (["train", "--config", "{tmp}/bad_type.json", "--out", "{tmp}/r"], "'train.lr' must be of type float"),
        (["train", "--config", "{tmp}/bad_json.json", "--out", "{tmp}/r"], "not valid JSON"),
        (["train", "--config", "{tmp}/missing.json", "--out", "{tmp}/r"], "does not exist"),
        (["train", "--resume", "{tmp}"], "not a difftime run directory"),
        (["sample", "{tmp}", "--out", "{tmp}/s.npz"], "not a difftime run directory"),
        (["sample", "{run}", "--T", "2", "--out", "{tmp}/s.npz"], "T <= T_max"),
        (["sample", "{run}", "--out", "{tmp}/s.txt"], "must end in .npz"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, trained_run, capsys, argv, message):
    (tmp_path / "bad_key.json").write_text(json.dumps({"train": {"stpes": 3}}))
    (tmp_path / "bad_type.json").write_text(json.dumps({"train": {"lr": "fast"}}))
    (tmp_path / "bad_json.json").write_text("{not json")
    before = _fingerprint(trained_run)
    argv = [a.format(tmp=tmp_path, run=trained_run) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difftime: error:") and "\n" not in err and "Traceback" not in err
    assert message in err, err
    assert _fingerprint(trained_run) == before
    assert not (tmp_path / "r" / "config.json").exists()


def test_an_existing_run_is_never_overwritten(trained_run, tiny_config, capsys):
    before = _fingerprint(trained_run)
    assert main(["train", "--data", "digits", "--config", str(tiny_config), "--out", str(trained_run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _fingerprint(trained_run) == before


def test_a_corrupt_checkpoint_is_refused(tmp_path, trained_run, capsys):
    run = tmp_path / "corrupt"
    shutil.copytree(trained_run, run)
    data = bytearray((run / "ema.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (run / "ema.safetensors").write_bytes(bytes(data))
    assert main(["sample", str(run), "--out", str(tmp_path / "s.npz")]) == 2
    assert "checksum" in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists()
    assert main(["train", "--resume", str(run), "--steps", "8"]) == 2


def test_console_script_and_debug_flag(tmp_path):
    exe = [sys.executable, "-m", "difftime.cli"]
    proc = subprocess.run([*exe, "sample", str(tmp_path), "--out", str(tmp_path / "s.npz")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    proc = subprocess.run([*exe, "--debug", "sample", str(tmp_path), "--out", str(tmp_path / "s.npz")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_fit_prior_sample_and_evaluate(tmp_path, trained_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["fit-prior", str(run), "--T", "0.4", "--prior", "gaussian", "--no-progress"]) == 0
    folder = run / "priors" / "gaussian-T0.4"
    assert {p.name for p in folder.iterdir()} == {"config.json", "prior.safetensors", "fit_curve.json", "fit_curve.png"}
    capsys.readouterr()
    assert main(["fit-prior", str(run), "--T", "0.4", "--prior", "gaussian"]) == 2
    assert "--overwrite" in capsys.readouterr().err

    assert main(["sample", str(run), "--T", "0.4", "--prior", "gaussian", "--sampler", "heun", "--steps", "3",
                 "--n", "4", "--out", str(tmp_path / "s.npz")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["nfe"] == 7 and report["prior"] == "gaussian"

    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run), "--T", "0.4", "--prior", "gaussian", "--n", "4", "--n-t", "8",
                 "--tol", "1e-3", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    e = result["elbo"]
    parts = e["prior_bpd"] + e["score_bpd"] + e["constant_bpd"] + e["dequantization_bpd"]
    assert parts == pytest.approx(e["bpd"], rel=1e-9)
    assert e["dequantization_bpd"] == pytest.approx(np.log2(17) - 1)
    assert np.isfinite(result["nll"]["bpd"]) and result["nll"]["nfe_mean"] > 0
    assert result["prior_improvement"]["nats"] > 0  # matching the moments beats N(0, I) at T = 0.4
    assert result["n"] == 4 and result["seed"] == 0 and "torch" in result["versions"]
    assert result["run_config"]["train"]["steps"] == 6


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit-prior", "{run}", "--T", "1.5", "--prior", "gaussian"], "T <= T_max"),
        (["fit-prior", "{run}", "--T", "0.4", "--prior", "glw"], "invalid choice"),
        (["fit-prior", "{run}", "--T", "0.4", "--prior", "standard"], "needs no fitting"),
        (["sample", "{run}", "--T", "0.4", "--prior", "flow", "--out", "{tmp}/s.npz"], "fit-prior"),
        (["sample", "{run}", "--sampler", "ddim2", "--out", "{tmp}/s.npz"],
         "unknown sampler 'ddim2'; choose from em, pc, euler, heun, dopri5, ddim, dpm++2m, dpm++3m, dpm++2m-sde"),
        (["sample", "{run}", "--spacing", "cosine", "--out", "{tmp}/s.npz"],
         "unknown spacing 'cosine'; choose from time, logsnr, quadratic, karras"),
        (["evaluate", "{run}", "--metrics", "fd", "--sampler", "unipc3"], "unknown sampler 'unipc3'; choose from em"),
        (["sample", "{run}", "--nfe", "10", "--out", "{tmp}/s.npz"], "--nfe N and --study DIR go together"),
        (["evaluate", "{run}", "--metrics", "elbo,bogus"], "unknown"),
        (["evaluate", "{run}", "--out", "{tmp}/r.txt"], "must end in .json"),
        (["evaluate", "{run}", "--T", "0"], "positive number"),
    ],
)
def test_prior_commands_refuse_bad_input(tmp_path, trained_run, capsys, argv, message):
    before = _fingerprint(trained_run)
    assert main([a.format(tmp=tmp_path, run=trained_run) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difftime: error:") and "\n" not in err and message in err, err
    assert _fingerprint(trained_run) == before
    assert not (trained_run / "priors").exists()


def test_evaluate_quality_metrics_records_what_they_were_computed_from(tmp_path, trained_run, capsys):
    out = tmp_path / "q.json"
    assert main(["evaluate", str(trained_run), "--T", "0.5", "--metrics", "fd,kid,pr", "--n", "20",
                 "--steps", "5", "--no-progress", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["sampling"]["nfe"] == 6 and result["sampling"]["n"] == 20
    # The samples end at the sampling eps and use the default sampler; the likelihood eps stays the run's.
    assert result["sampling"]["eps"] == 1e-3 and result["eps"] == 1e-5
    assert (result["sampling"]["sampler"], result["sampling"]["spacing"]) == ("dpm++2m", "logsnr")
    quality = result["quality"]
    assert quality["n_samples"] == 20 and quality["reference_split"] == "test"
    assert quality["fd"]["value"] > 0 and 0 <= quality["pr"]["precision"] <= 1
    assert "fd" in capsys.readouterr().out


def _sample(argv, capsys):
    assert main(["sample", *map(str, argv)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with np.load(report["out"]) as f:
        return report, f["samples"]


@pytest.fixture
def grids(monkeypatch):
    """(spacing, steps, eps) of every time grid a sampler builds."""
    import difftime.sampling

    seen = []
    timesteps = difftime.sampling.timesteps
    monkeypatch.setattr(difftime.sampling, "timesteps",
                        lambda sde, T, eps, steps, spacing="logsnr", **kw: seen.append((spacing, steps, eps))
                        or timesteps(sde, T, eps, steps, spacing, **kw))
    return seen


def test_sample_defaults_are_the_library_defaults(tmp_path, trained_run, capsys, grids):
    from difftime.sampling import DEFAULT_SAMPLE_EPS, DEFAULT_SAMPLER, DEFAULT_SPACING

    assert (DEFAULT_SAMPLER, DEFAULT_SPACING, DEFAULT_SAMPLE_EPS) == ("dpm++2m", "logsnr", 1e-3)
    report, plain = _sample([trained_run, "--T", "0.6", "--n", "6", "--out", tmp_path / "a.npz"], capsys)
    # dpm++2m on the log-SNR grid, 10 steps down to eps 1e-3 (not the training eps 1e-5), then the Tweedie step.
    assert (report["sampler"], report["spacing"], report["eps"], report["steps"]) == ("dpm++2m", "logsnr", 1e-3, 10)
    assert report["denoise"] is True and report["nfe"] == report["steps"] + 1 == 11
    assert grids == [("logsnr", 10, 1e-3)]
    explicit = [trained_run, "--T", "0.6", "--n", "6", "--sampler", "dpm++2m", "--spacing", "logsnr", "--steps", "10"]
    _, same = _sample([*explicit, "--eps", "1e-3", "--out", tmp_path / "b.npz"], capsys)
    np.testing.assert_array_equal(plain, same)
    _, other_eps = _sample([*explicit, "--eps", "1e-5", "--out", tmp_path / "c.npz"], capsys)
    assert not np.array_equal(plain, other_eps)  # the end time is really 1e-3, not the run's eps
    report, _ = _sample([*explicit, "--no-denoise", "--out", tmp_path / "d.npz"], capsys)
    assert report["nfe"] == 10 and report["denoise"] is False


def test_sample_takes_any_sampler_and_spacing(tmp_path, trained_run, capsys, grids):
    base = [trained_run, "--T", "0.6", "--n", "6", "--sampler", "ddim", "--steps", "4"]
    report, _ = _sample([*base, "--spacing", "karras", "--out", tmp_path / "k.npz"], capsys)
    assert (report["sampler"], report["spacing"], report["steps"], report["nfe"]) == ("ddim", "karras", 4, 5)
    assert grids == [("karras", 4, 1e-3)]
    # A 3M sampler with fewer steps than its order runs at lower order: not an error.
    report, _ = _sample([trained_run, "--sampler", "dpm++3m", "--steps", "2", "--n", "2", "--out", tmp_path / "3.npz"],
                        capsys)
    assert report["nfe"] == 3 and grids[-1][:2] == ("logsnr", 2)
    # The classic samplers keep their uniform t grid unless --spacing is given.
    em = [trained_run, "--sampler", "em", "--steps", "5", "--n", "4"]
    report, _ = _sample([*em, "--out", tmp_path / "e.npz"], capsys)
    assert report["spacing"] == "time" and report["nfe"] == 6 and grids[-1][:2] == ("time", 5)
    report, _ = _sample([*em, "--spacing", "quadratic", "--out", tmp_path / "f.npz"], capsys)
    assert report["spacing"] == "quadratic" and grids[-1][:2] == ("quadratic", 5)
