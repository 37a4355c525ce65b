"""The headroom diagnostic against Gaussian closed forms (docs/design.md §3): with the exact eps* the model's
marginal at T is p_T up to KL(p_{T_max} || N) (~1e-5 nats here), so a prior equal to p_T has zero
headroom and N(0, I) has headroom KL(p_T || N) - KL(p_{T_max} || N)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from difftime.headroom import headroom_table, model_marginal_log_prob, prior_headroom
from difftime.sde import VPSDE
from difftime.testing import ExactGaussianEps, GaussianMarginal

pytestmark = pytest.mark.usefixtures("one_thread")

MU = torch.tensor([1.0, -0.5, 0.3, 0.0], dtype=torch.float64)
LAM = torch.tensor([0.05, 0.3, 1.0, 2.5], dtype=torch.float64)


def _kl_to_standard(sde, T: float) -> float:
    """KL(p_T || N(0, I)) = 1/2 sum [k - 1 - ln k] + 1/2 m^2 ||mu||^2, with k = m^2 lam + v."""
    t = torch.tensor([T], dtype=torch.float64)
    m, v = float(sde.m(t)[0]), float(sde.v(t)[0])
    k = m * m * LAM + v
    return float(0.5 * (k - 1 - k.log()).sum() + 0.5 * m * m * MU.pow(2).sum())


@pytest.mark.parametrize("T", [0.1, 0.3])
def test_headroom_is_zero_for_the_exact_marginal_and_the_kl_for_the_standard_prior(T):
    sde = VPSDE()
    model = ExactGaussianEps(sde, MU, LAM)
    exact = GaussianMarginal(sde, MU, LAM, T)
    x_T = exact.sample(400, torch.Generator().manual_seed(0)).float()
    out = prior_headroom(model, sde, {"exact": exact}, x_T, T, rtol=1e-5, atol=1e-5)
    json.dumps(out)
    assert out["model"]["divergence"] == "exact" and out["model"]["nfe"] > 0
    # Pointwise: the PF-ODE marginal is p_T up to log N(x_1) - log p_1(x_1) (|.| ~ m(1) = 0.007).
    log_model, _ = model_marginal_log_prob(model, sde, x_T, T, rtol=1e-5, atol=1e-5)
    assert torch.allclose(log_model, exact.log_prob(x_T).double(), atol=0.05)

    zero = out["priors"]["exact"]["headroom"]
    assert zero["lo"] <= 0 <= zero["hi"], zero
    assert abs(zero["mean"]) < 0.01 and zero["se"] < 0.01
    residual = _kl_to_standard(sde, 1.0)  # what N(0,I) at T_max loses: ~1e-5 nats
    standard = out["priors"]["standard"]["headroom"]
    expected = _kl_to_standard(sde, T) - residual
    assert expected > 0.1  # the check has teeth: N(0, I) is far from p_T at these T
    assert abs(standard["mean"] - expected) < 4 * standard["se"] + 1e-3, (standard, expected)
    assert standard["mean_per_dim"] == pytest.approx(standard["mean"] / 4)
    # The measured KL lower bound of the exact prior is KL(p_T || N) itself, on the same x_T.
    kl = out["priors"]["exact"]["kl_lower_bound"]
    assert kl["lo"] <= _kl_to_standard(sde, T) <= kl["hi"], kl
    assert "| exact |" in headroom_table([out])


def test_headroom_at_T_max_needs_no_solve_and_bad_input_is_one_error():
    from difftime.errors import DifftimeError

    sde = VPSDE()
    model = ExactGaussianEps(sde, MU, LAM)
    x_T = torch.randn(50, 4, generator=torch.Generator().manual_seed(1))
    out = prior_headroom(model, sde, {"exact": GaussianMarginal(sde, MU, LAM, 1.0)}, x_T, 1.0)
    assert out["model"]["nfe"] == 0
    assert out["priors"]["standard"]["headroom"]["mean"] == 0 and math.isclose(
        out["priors"]["standard"]["headroom"]["se"], 0.0, abs_tol=1e-12)
    with pytest.raises(DifftimeError, match="at least one prior"):
        prior_headroom(model, sde, {}, x_T, 0.5)
    with pytest.raises(DifftimeError, match="horizon"):
        prior_headroom(model, sde, {"s": GaussianMarginal(sde, MU, LAM, 0.5)}, x_T, 1.5)


def test_evaluate_headroom_cli(tmp_path, tiny_run, capsys):
    import shutil

    from difftime.cli import main

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(["fit-prior", str(run), "--T", "0.4", "--prior", "gaussian", "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(run), "--T", "0.4", "--prior", "gaussian", "--metrics", "elbo", "--n", "4",
                 "--n-t", "2", "--headroom", "standard,gaussian", "--headroom-n", "6", "--tol", "1e-3",
                 "--no-progress", "--out", str(out)]) == 0
    assert "| gaussian |" in capsys.readouterr().out
    head = json.loads(out.read_text())["headroom"]
    assert head["n"] == 6 and head["dim"] == 64 and head["model"]["nfe"] > 0
    assert set(head["priors"]) == {"standard", "gaussian"}
    # The moment-matched Gaussian is closer to p_T than N(0, I): its cross-entropy is lower, paired.
    gap = head["priors"]["standard"]["headroom"]["mean"] - head["priors"]["gaussian"]["headroom"]["mean"]
    assert gap == pytest.approx(head["priors"]["gaussian"]["kl_lower_bound"]["mean"], abs=1e-6) and gap > 0
    assert main(["evaluate", str(run), "--T", "0.4", "--metrics", "elbo", "--n", "2", "--n-t", "2",
                 "--headroom", "flow", "--no-progress"]) == 2
    assert "fit one first" in capsys.readouterr().err
