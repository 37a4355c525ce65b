"""Likelihood evaluation of a trained digits run: finite, ordered, and consistent across priors."""

from __future__ import annotations

import math

import pytest
import torch

from difftime.config import build_config
from difftime.data import load_data
from difftime.evaluation import likelihood_metrics, resolve_prior
from difftime.priors import make_prior, prior_dir, save_prior
from difftime.run import load_run
from difftime.training import Trainer

T = 0.4


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    config = build_config(overrides={
        "data": "digits", "seed": 0,
        "net": {"kind": "unet", "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "mid_attention": False},
        "train": {"steps": 150, "batch_size": 64, "lr": 2e-3, "warmup": 10, "ema_decay": 0.95,
                  "log_every": 50, "ckpt_every": 1000},
    })
    data = load_data("digits")
    trainer = Trainer(config, data)
    trainer.write_config(out)
    trainer.fit(out, progress=False)
    run = load_run(out)
    save_prior(make_prior("gaussian", run.sde, T, data), prior_dir(out, "gaussian", T))
    return load_run(out), data


def test_prior_swap_moves_the_elbo_by_the_measured_improvement(digits_run):
    run, data = digits_run
    raw = data.test[:48]
    priors = {name: resolve_prior(run, name, T) for name in ("standard", "gaussian")}
    results = likelihood_metrics(run, priors, raw, T, ("elbo", "nll"), n_t=16, n_prior=8, rtol=1e-4, atol=1e-4,
                                 seed=0, progress=False)
    std, gauss = results["standard"], results["gaussian"]
    for r in results.values():
        assert math.isfinite(r["elbo"]["bpd"]) and math.isfinite(r["nll"]["bpd"])
        # The exact likelihood of the PF-ODE model sits below the variational bound's bits/dim here,
        # and a model that learned anything beats the uniform distribution over 17 levels.
        assert r["nll"]["bpd"] < r["elbo"]["bpd"]
        assert r["nll"]["bpd"] < math.log2(17)
    # Common random numbers: only the prior term differs between the two ELBO evaluations.
    assert gauss["elbo"]["score_nats"] == pytest.approx(std["elbo"]["score_nats"], rel=1e-12)
    d_elbo_nats = gauss["elbo"]["nats"] - std["elbo"]["nats"]
    improvement = gauss["prior_improvement"]
    assert improvement["nats"] > 5 * improvement["se"] > 0
    assert abs(d_elbo_nats - improvement["nats"]) < 4 * improvement["se"] + 0.05 * improvement["nats"]
    assert gauss["elbo"]["bpd"] < std["elbo"]["bpd"]
    assert gauss["nll"]["bpd"] < std["nll"]["bpd"]
    # Shared draws: the prior swap moves the ELBO by exactly the improvement, example by example.
    assert d_elbo_nats == pytest.approx(improvement["nats"], rel=1e-9)
    # A prior's figures do not depend on the company it is evaluated in.
    alone = likelihood_metrics(run, {"gaussian": priors["gaussian"]}, raw, T, ("elbo", "nll"), n_t=16, n_prior=8,
                               rtol=1e-4, atol=1e-4, seed=0, progress=False)["gaussian"]
    assert alone == gauss


def test_dequantization_repeats_average_and_record(digits_run):
    run, data = digits_run
    prior = resolve_prior(run, "standard", T)
    one = likelihood_metrics(run, {"standard": prior}, data.test[:8], T, ("elbo",), n_t=4, n_prior=2,
                             dequant_repeats=1, seed=1, progress=False)["standard"]
    three = likelihood_metrics(run, {"standard": prior}, data.test[:8], T, ("elbo",), n_t=4, n_prior=2,
                               dequant_repeats=3, seed=1, progress=False)["standard"]
    assert one["dequant_repeats"] == 1 and three["dequant_repeats"] == 3
    assert three["elbo"]["bpd"] != one["elbo"]["bpd"]
    # The same estimand: the two estimates agree within their standard errors.
    assert abs(three["elbo"]["bpd"] - one["elbo"]["bpd"]) < 3 * (one["elbo"]["bpd_se"] + three["elbo"]["bpd_se"])


def test_evaluate_is_reproducible_from_the_seed(digits_run):
    run, data = digits_run
    prior = resolve_prior(run, "gaussian", T)
    a = likelihood_metrics(run, {"gaussian": prior}, data.test[:8], T, ("elbo",), n_t=4, seed=3, progress=False)
    b = likelihood_metrics(run, {"gaussian": prior}, data.test[:8], T, ("elbo",), n_t=4, seed=3, progress=False)
    assert a == b
    torch.manual_seed(123)  # global RNG state must not matter
    c = likelihood_metrics(run, {"gaussian": prior}, data.test[:8], T, ("elbo",), n_t=4, seed=3, progress=False)
    assert a == c


def test_bf16_sampling_stays_close_to_fp32_and_bad_precision_is_refused(tiny_run, one_thread):
    """bfloat16 autocast changes the network's rounding only: its output is float32 and within
    bf16 round-off of the float32 network, and the same seed gives nearly the same samples."""
    from difftime.errors import DifftimeError
    from difftime.evaluation import _BF16Network, draw_samples, resolve_prior
    from difftime.run import load_run

    run = load_run(tiny_run)
    x, t = torch.randn(16, *run.shape, generator=torch.Generator().manual_seed(0)), torch.full((16,), 0.5)
    with torch.no_grad():
        exact, half = run.model(x, t), _BF16Network(run.model)(x, t)
    err = (half - exact).abs().max() / exact.abs().max()
    assert half.dtype == torch.float32 and 0 < err < 0.05
    prior = resolve_prior(run, "standard", 1.0)
    full, nfe, _ = draw_samples(run, prior, 1.0, "dpm++2m", 5, 32, seed=1)
    bf16, nfe_bf16, _ = draw_samples(run, prior, 1.0, "dpm++2m", 5, 32, seed=1, precision="bf16")
    assert nfe == nfe_bf16 and (bf16 == full).mean() > 0.9
    with pytest.raises(DifftimeError, match="precision must be one of fp32, bf16"):
        draw_samples(run, prior, 1.0, "dpm++2m", 5, 4, precision="fp16")
