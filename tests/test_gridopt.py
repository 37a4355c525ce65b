"""Optimized time grids (difftime.gridopt): the Gaussian closed form they rest on, the dynamic
programme against brute force, the grid file, `difftime grid` and `difftime sample --ts`."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from difftime.cli import main
from difftime.errors import DifftimeError
from difftime.gridopt import (
    TimeGrid,
    _least_cost_path,
    gaussian_exact_map,
    gaussian_grid,
    gaussian_grid_error,
    gits_grid,
    steps_for_nfe,
)
from difftime.grids import timesteps
from difftime.sampling import SAMPLERS, sample
from difftime.sde import VESDE, VPSDE, SubVPSDE
from difftime.testing import ExactGaussianEps, GaussianMarginal

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64
LAM = torch.logspace(-4, 0, 24, dtype=F64)  # a spectrum of data variances from 1e-4 to 1


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE()], ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("denoise", [True, False])
def test_exact_gaussian_map_is_the_limit_of_a_fine_solve(sde, denoise):
    """c*: the PF-ODE map x_T -> x_eps (then Tweedie) of N(0, diag(LAM)); a 400-step dpm++3m with the
    exact eps-network lands on it."""
    T, eps = 0.6, 1e-3
    model = ExactGaussianEps(sde, torch.zeros_like(LAM), LAM)
    x, _ = SAMPLERS["dpm++3m"](model, sde, torch.ones(1, len(LAM), dtype=F64), timesteps(sde, T, eps, 400),
                               denoise=denoise)
    c_star = gaussian_exact_map(sde, LAM, T, eps, denoise)
    assert torch.allclose(x[0], c_star, rtol=1e-6)
    # ... and J of that grid is ~0, while a 3-step grid's is not
    assert gaussian_grid_error(sde, timesteps(sde, T, eps, 400), "dpm++3m", LAM, denoise) < 1e-10
    assert gaussian_grid_error(sde, timesteps(sde, T, eps, 3), "dpm++3m", LAM, denoise) > 1e-4


@pytest.mark.parametrize(("sampler", "nfe", "T"), [("dpm++2m", 5, 0.6), ("unipc", 6, 1.0), ("ipndm", 6, 0.4),
                                                   ("ddim", 5, 1.0), ("heun", 5, 0.6)])
def test_gaussian_grid_beats_the_log_snr_grid_at_the_same_nfe(sampler, nfe, T):
    sde = VPSDE()
    grid = gaussian_grid(sde, T, 1e-3, nfe, sampler, variances=LAM)
    assert grid.ts[0] == T and grid.ts[-1] == 1e-3 and grid.method == "gaussian"
    assert all(b < a for a, b in zip(grid.ts, grid.ts[1:], strict=False))
    steps = steps_for_nfe(sampler, nfe)
    uniform = timesteps(sde, T, 1e-3, steps, "logsnr")
    j_uniform = gaussian_grid_error(sde, uniform, sampler, LAM)
    assert grid.info["error_logsnr"] == pytest.approx(j_uniform, rel=1e-9)
    assert gaussian_grid_error(sde, grid.ts, sampler, LAM) == pytest.approx(grid.info["error"], rel=1e-9)
    assert grid.info["error"] < 0.5 * j_uniform  # measured: 3x-700x lower at these budgets
    # the grid is spent exactly: the sampler reports the budgeted NFE on it
    _, nfe_used = SAMPLERS[sampler](lambda x, t: torch.zeros_like(x), sde, torch.zeros(1, 2), grid.ts)
    assert nfe_used == nfe


def test_nfe_budgets_that_a_sampler_cannot_spend_are_refused():
    assert steps_for_nfe("heun", 7) == 3 and steps_for_nfe("unipc", 5) == 4 and steps_for_nfe("ddim", 4, False) == 4
    with pytest.raises(DifftimeError, match="cannot use exactly 6"):
        steps_for_nfe("heun", 6)
    with pytest.raises(DifftimeError, match="no fixed calls per step"):
        steps_for_nfe("dopri5", 10)
    with pytest.raises(DifftimeError, match="unknown sampler"):
        steps_for_nfe("nope", 10)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_least_cost_path_is_the_brute_force_minimum(steps):
    """Order-2 costs depend on the previous node: the programme on node pairs finds the true
    minimum over every path 0 < i_1 < ... < M."""
    M = 7
    g = torch.Generator().manual_seed(steps)
    cost = torch.rand(M + 1, M + 1, M + 1, generator=g, dtype=F64)
    p, a, b = torch.meshgrid(torch.arange(M + 1), torch.arange(M + 1), torch.arange(M + 1), indexing="ij")
    cost[~(((p < a) | (p == a)) & (a < b))] = math.inf
    path, total = _least_cost_path(cost, steps)
    best = min(
        (float(cost[0, 0, q[1]] + sum(cost[q[i - 1], q[i], q[i + 1]] for i in range(1, steps))), q)
        for q in ([0, *mid, M] for mid in itertools.combinations(range(1, M), steps - 1))
    )
    assert path == best[1] and total == pytest.approx(best[0], rel=1e-12)


def test_gits_grid_from_a_gaussian_teacher():
    """The teacher starts from the exact p_T; the path's cost is at most the uniform log-SNR path's
    (the programme minimises it), and the grid is a valid start-to-eps grid with the budgeted NFE."""
    sde, T = VPSDE(), 0.6
    model = ExactGaussianEps(sde, torch.zeros_like(LAM), LAM)
    prior = GaussianMarginal(sde, torch.zeros_like(LAM), LAM, T)
    grid = gits_grid(model, sde, prior, T, 1e-3, 6, "dpm++2m", n=32, fine_steps=24, substeps=2,
                     generator=torch.Generator().manual_seed(0))
    assert grid.ts[0] == T and grid.ts[-1] == 1e-3 and len(grid.ts) == 6
    assert grid.info["cost"] <= grid.info["cost_logsnr"] + 1e-12
    assert grid.info["teacher_nfe"] == 32 * (24 * 2 + 1)
    # every grid time is a node of the teacher's log-SNR grid
    nodes = timesteps(sde, T, 1e-3, 48, "logsnr")[::2]
    assert all(torch.isclose(nodes, torch.tensor(t, dtype=F64), rtol=1e-12).any() for t in grid.ts)
    # the teacher's nodes: its dpm++2m (one call per node) ends on the exact solve's end to 1e-3
    c_star = gaussian_exact_map(sde, LAM, T, 1e-3, denoise=True)
    fine, _ = SAMPLERS["dpm++2m"](model, sde, torch.ones(1, len(LAM), dtype=F64), timesteps(sde, T, 1e-3, 48),
                                  lower_order_final=False)
    assert torch.allclose(fine[0], c_star, rtol=1e-2)


def test_grid_file_round_trip_and_refusals(tmp_path):
    sde = VPSDE()
    grid = gaussian_grid(sde, 0.6, 1e-3, 5, "unipc", variances=LAM)
    path = grid.save(tmp_path / "g.json")
    back = TimeGrid.load(path, sde)
    assert back == grid
    data = json.loads(path.read_text())
    assert {"T", "eps", "nfe", "sampler", "ts", "method", "info"} <= set(data)
    with pytest.raises(DifftimeError, match="exists"):
        grid.save(path)
    assert TimeGrid.load(path) == grid  # unchanged by the refused save
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**data, "ts": [0.1, 0.5]}))
    with pytest.raises(DifftimeError, match="strictly decreasing"):
        TimeGrid.load(bad, sde)
    bad.write_text(json.dumps({"T": 1}))
    with pytest.raises(DifftimeError, match="not a difftime grid file"):
        TimeGrid.load(bad)


def test_sample_on_an_explicit_grid_is_the_sampler_on_that_grid():
    sde = VPSDE()
    model = ExactGaussianEps(sde, torch.zeros(3, dtype=F64), torch.tensor([0.1, 0.5, 1.0], dtype=F64))
    prior = GaussianMarginal(sde, torch.zeros(3, dtype=F64), torch.tensor([0.1, 0.5, 1.0], dtype=F64), 0.6)
    grid = gaussian_grid(sde, 0.6, 1e-3, 5, "dpm++2m")
    x, nfe = sample(model, sde, prior, 0.6, n=4, ts=grid.ts, generator=torch.Generator().manual_seed(0))
    x_T = prior.sample(4, generator=torch.Generator().manual_seed(0))
    ref, _ = SAMPLERS["dpm++2m"](model, sde, x_T, grid.ts)
    assert nfe == 5 and torch.equal(x, ref)
    with pytest.raises(DifftimeError, match="not from T=1"):
        sample(model, sde, prior, 1.0, n=4, ts=grid.ts)


def test_grid_and_sample_ts_commands(tiny_run, tmp_path, capsys):
    out = tmp_path / "g.json"
    assert main(["grid", str(tiny_run), "--T", "0.6", "--sampler", "unipc", "--nfe", "5", "--method", "gaussian",
                 "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["nfe"] == 5 and report["T"] == 0.6 and len(report["ts"]) == 5
    gits = tmp_path / "gits.json"
    assert main(["grid", str(tiny_run), "--T", "0.6", "--sampler", "dpm++2m", "--nfe", "4", "--n", "8",
                 "--fine-steps", "12", "--out", str(gits)]) == 0
    assert TimeGrid.load(gits).method == "gits"
    capsys.readouterr()
    samples = tmp_path / "s.npz"
    assert main(["sample", str(tiny_run), "--ts", str(out), "--n", "4", "--out", str(samples)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["nfe"] == 5 and report["sampler"] == "unipc" and report["T"] == 0.6
    assert np.load(samples)["samples"].shape[0] == 4
    # bad input: one line, exit 2, nothing overwritten
    before = out.read_bytes()
    for argv, message in [
        (["grid", str(tiny_run), "--nfe", "6", "--sampler", "heun", "--out", str(tmp_path / "h.json")],
         "cannot use exactly 6"),
        (["grid", str(tiny_run), "--nfe", "5", "--out", str(out)], "exists"),
        (["grid", str(tiny_run), "--nfe", "5", "--out", str(tmp_path / "g.txt")], "must end in .json"),
        (["sample", str(tiny_run), "--ts", str(out), "--steps", "4", "--out", str(tmp_path / "x.npz")], "drop --steps"),
        (["sample", str(tiny_run), "--ts", str(out), "--sampler", "ddim", "--out", str(tmp_path / "x.npz")],
         "disagrees"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert out.read_bytes() == before
