"""Time grids and few-step samplers against closed forms and against diffusers.

The Gaussian checks use data N(mu, diag(lam)) and its exact eps-network
eps*(x, t) = sigma (x - m mu) / k(t), k = m^2 lam + v (docs/design.md §3). The probability-flow map
is then closed form per coordinate, x_t - m_t mu = sqrt(k(t)/k(T)) (x_T - m_T mu), so every
deterministic sampler's error at eps is known exactly.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import CountingModel
from difftime.errors import DifftimeError
from difftime.sampling import (
    IPNDM_COEFFICIENTS,
    SAMPLERS,
    SPACINGS,
    adams_bashforth_coefficients,
    default_spacing,
    sample,
    time_grid,
    timesteps,
)
from difftime.sde import VESDE, VPSDE, SubVPSDE
from difftime.testing import ExactGaussianEps, GaussianMarginal

F64 = torch.float64
MU = torch.tensor([0.6, -0.4, 1.0, 0.0], dtype=F64)
LAM = torch.tensor([0.05, 0.3, 1.5, 4.0], dtype=F64)  # no lam = 1: eps* varies along every path
NEW = ("ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "ipndm")
DETERMINISTIC = ("ddim", "dpm++2m", "dpm++3m", "ipndm")


def _sdes():
    return [VPSDE(), SubVPSDE(), VESDE(sigma_min=0.01, sigma_max=20.0)]


def _sampler(name, model, sde, x_T, T, eps, steps, spacing=None, **kw):
    """SAMPLERS[name] on timesteps(sde, T, eps, steps) at ``spacing`` or the sampler's default spacing."""
    return SAMPLERS[name](model, sde, x_T, timesteps(sde, T, eps, steps, spacing or default_spacing(name)), **kw)


def _flow_map(sde, x_T, T, t):
    """The exact PF-ODE solution at t from x_T at T, for the Gaussian data."""
    def k_and_m(s):
        s = torch.tensor([s], dtype=F64)
        return sde.m(s) ** 2 * LAM + sde.v(s), sde.m(s)

    (k_T, m_T), (k_t, m_t) = k_and_m(T), k_and_m(t)
    return m_t * MU + (k_t / k_T).sqrt() * (x_T - m_T * MU)


# --- grids ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sde", _sdes(), ids=["vp", "subvp", "ve"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("T, eps", [(1.0, 1e-3), (0.4, 1e-5)])
def test_timesteps_run_from_T_to_eps_with_their_defining_spacing(sde, spacing, T, eps):
    n = 12
    ts = timesteps(sde, T, eps, n, spacing)
    assert ts.dtype == F64 and ts.shape == (n + 1,)
    assert float(ts[0]) == T and float(ts[-1]) == eps
    assert bool((ts[1:] < ts[:-1]).all())
    i = torch.arange(n + 1, dtype=F64)
    lam = sde.log_snr(ts)
    if spacing == "time":
        assert torch.equal(ts, time_grid(T, eps, n, F64))
        torch.testing.assert_close(ts.diff(), torch.full((n,), -(T - eps) / n, dtype=F64), rtol=1e-12, atol=1e-15)
    elif spacing == "logsnr":
        torch.testing.assert_close(lam.diff(), torch.full((n,), float(lam[-1] - lam[0]) / n, dtype=F64),
                                   rtol=1e-9, atol=1e-12)
    elif spacing == "quadratic":
        torch.testing.assert_close(ts, eps + (T - eps) * (1 - i / n) ** 2, rtol=1e-14, atol=0.0)
    else:  # karras: sigma_tilde^(1/rho) is uniform, sigma_tilde = sigma/m = exp(-lambda)
        for rho in (7.0, 3.0):
            root = torch.exp(-sde.log_snr(timesteps(sde, T, eps, n, spacing, rho=rho)) / rho)
            torch.testing.assert_close(root.diff(), torch.full((n,), float(root[-1] - root[0]) / n, dtype=F64),
                                       rtol=1e-9, atol=1e-12)
    if spacing in ("logsnr", "karras", "quadratic"):  # all denser near eps than near T in t
        assert float(ts[-2] - ts[-1]) < float(ts[0] - ts[1])


def test_bad_grids_are_one_line_errors_that_list_the_choices():
    sde = VPSDE()
    with pytest.raises(DifftimeError) as info:
        timesteps(sde, 1.0, 1e-3, 10, "cosine")
    msg = str(info.value)
    assert "\n" not in msg and all(name in msg for name in SPACINGS)
    for steps in (0, -3, 2.5, True):
        with pytest.raises(DifftimeError, match="steps"):
            timesteps(sde, 1.0, 1e-3, steps)
    with pytest.raises(DifftimeError, match="horizon"):
        timesteps(sde, 1.5, 1e-3, 10)
    with pytest.raises(DifftimeError, match="rho"):
        timesteps(sde, 1.0, 1e-3, 10, "karras", rho=0.0)
    x = torch.zeros(2, 4, dtype=F64)
    model = ExactGaussianEps(sde, MU, LAM)
    for bad in ([0.5, 0.5, 0.1], [0.1, 0.5], [1.5, 0.5, 0.1], [0.5, 0.1, 0.0], [0.5]):
        with pytest.raises(DifftimeError):
            SAMPLERS["dpm++2m"](model, sde, x, bad)
    prior = GaussianMarginal(sde, MU, LAM, 1.0)
    with pytest.raises(DifftimeError, match="spacing"):
        sample(model, sde, prior, 1.0, n=2, sampler="heun", steps=4, spacing="cosine")


def test_the_grid_defines_T_eps_and_steps_as_a_tensor_or_a_list():
    sde = VPSDE()
    model = ExactGaussianEps(sde, MU, LAM)
    x_T = GaussianMarginal(sde, MU, LAM, 0.8).sample(16, torch.Generator().manual_seed(0))
    for name in ("em", "euler", "heun", "pc", "ddim", "dpm++3m", "ipndm"):
        grid = timesteps(sde, 0.8, 1e-3, 9, "karras")
        kw = {"generator": torch.Generator().manual_seed(3)}
        a, nfe_a = SAMPLERS[name](model, sde, x_T, grid, **kw)
        kw = {"generator": torch.Generator().manual_seed(3)}
        b, nfe_b = SAMPLERS[name](model, sde, x_T, grid.tolist(), **kw)
        assert torch.equal(a, b) and nfe_a == nfe_b == 9 + 9 * (name in ("heun", "pc")) + 1, name


def test_dopri5_reads_only_the_ends_of_its_grid():
    sde = VPSDE()
    model = ExactGaussianEps(sde, MU, LAM)
    x_T = GaussianMarginal(sde, MU, LAM, 0.8).sample(16, torch.Generator().manual_seed(0))
    a = SAMPLERS["dopri5"](model, sde, x_T, [0.8, 1e-3])
    b = SAMPLERS["dopri5"](model, sde, x_T, timesteps(sde, 0.8, 1e-3, 9, "karras"))
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe


def test_classic_samplers_default_to_the_uniform_time_grid():
    sde = VPSDE()
    model = ExactGaussianEps(sde, MU, LAM)
    prior = GaussianMarginal(sde, MU, LAM, 0.5)
    for name in ("em", "pc", "euler", "heun"):
        assert default_spacing(name) == "time"
        a, _ = sample(model, sde, prior, 0.5, n=8, eps=1e-3, sampler=name, steps=6,
                      generator=torch.Generator().manual_seed(1))
        g = torch.Generator().manual_seed(1)
        x_T = prior.sample(8, generator=g)
        b, _ = SAMPLERS[name](model, sde, x_T, time_grid(0.5, 1e-3, 6, F64), generator=g)
        assert torch.equal(a, b), name


# --- convergence order on Gaussian data --------------------------------------------------------

STEPS = (16, 32, 64, 128)
# The issue asks for at least 0.8, 1.6, 2.2, 2.2. The third- and fourth-order methods are held to 2.7:
# with the first-order first step they would only reach 2.0-2.2 (a lower-order start caps a
# multistep method at order 2); corrected_start is what lifts them to 3 and more.
MIN_SLOPE = {"ddim": 0.9, "dpm++2m": 1.8, "dpm++3m": 2.7, "ipndm": 2.7}


@pytest.mark.parametrize(
    "sde, T",
    [(VPSDE(), 0.5), (VPSDE(), 1.0), (VESDE(sigma_min=0.01, sigma_max=20.0), 1.0)],
    ids=["vp-T0.5", "vp-T1", "ve-T1"],
)
def test_deterministic_samplers_converge_with_their_order(sde, T):
    """Slope of log error against log steps on the log-SNR grid, steps 16..128 (float64).

    Measured (max abs error over 64 x 4 coordinates): ddim 0.97-0.98, dpm++2m 1.90-1.93, dpm++3m
    3.07 (VP T = 0.5) to 4.1, ipndm 3.15-3.29; without corrected_start 3M and iPNDM fall to 2.1-2.3
    wherever the first step's error matters (VP T = 0.5, and VE for 3M). At 128 steps the errors
    are 4.6e-6 or more, far above float64 round-off.
    """
    eps = 1e-3
    model = ExactGaussianEps(sde, MU, LAM)
    x_T = GaussianMarginal(sde, MU, LAM, T).sample(64, torch.Generator().manual_seed(0))
    exact = _flow_map(sde, x_T, T, eps)
    log_n = torch.tensor([math.log(n) for n in STEPS], dtype=F64)
    for name in DETERMINISTIC:
        errors = []
        for n in STEPS:
            x, nfe = _sampler(name, model, sde, x_T, T, eps, n, denoise=False)
            assert nfe == n
            errors.append(float((x - exact).abs().max()))
        assert errors[-1] > 1e-9, (name, errors)  # far from the float64 floor, and not exact by accident
        log_e = torch.tensor([math.log(e) for e in errors], dtype=F64)
        slope = -float(((log_n - log_n.mean()) * (log_e - log_e.mean())).sum() / ((log_n - log_n.mean()) ** 2).sum())
        assert slope >= MIN_SLOPE[name], (name, slope, errors)


def test_ipndm_is_adams_bashforth_with_the_classic_coefficients_on_a_uniform_grid():
    for k in range(1, 5):
        torch.testing.assert_close(torch.tensor(adams_bashforth_coefficients([-j for j in range(k)])),
                                   torch.tensor(IPNDM_COEFFICIENTS[k - 1]), rtol=1e-14, atol=1e-15)
    # karras with rho = 1 is uniform in sigma_tilde: there the variable-step weights are the fixed ones
    sde = VPSDE()
    model = ExactGaussianEps(sde, MU, LAM)
    x_T = GaussianMarginal(sde, MU, LAM, 0.7).sample(32, torch.Generator().manual_seed(0))
    grid = timesteps(sde, 0.7, 1e-3, 9, "karras", rho=1.0)
    a, _ = SAMPLERS["ipndm"](model, sde, x_T, grid)
    b, _ = SAMPLERS["ipndm"](model, sde, x_T, grid, variable_step=False)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # on the log-SNR grid they differ
    c, _ = _sampler("ipndm", model, sde, x_T, 0.7, 1e-3, 9)
    d, _ = _sampler("ipndm", model, sde, x_T, 0.7, 1e-3, 9, variable_step=False)
    assert float((c - d).abs().max()) > 1e-3


def test_dpmpp_3m_falls_back_to_lower_order_on_short_runs():
    sde = VPSDE()
    model = ExactGaussianEps(sde, MU, LAM)
    x_T = GaussianMarginal(sde, MU, LAM, 1.0).sample(32, torch.Generator().manual_seed(0))
    for denoise in (True, False):
        one, nfe = _sampler("dpm++3m", model, sde, x_T, 1.0, 1e-3, 1, denoise=denoise)
        assert nfe == 1 + denoise and torch.isfinite(one).all()
        assert torch.equal(one, _sampler("ddim", model, sde, x_T, 1.0, 1e-3, 1, denoise=denoise).x)
        two, nfe = _sampler("dpm++3m", model, sde, x_T, 1.0, 1e-3, 2, denoise=denoise, corrected_start=False)
        assert nfe == 2 + denoise and torch.isfinite(two).all()
        assert torch.equal(two, _sampler("dpm++2m", model, sde, x_T, 1.0, 1e-3, 2, denoise=denoise).x)
        three, _ = _sampler("dpm++3m", model, sde, x_T, 1.0, 1e-3, 2, denoise=denoise)
        assert torch.isfinite(three).all()


# --- network calls ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_nfe_is_the_number_of_network_calls(name):
    sde = VPSDE()
    x_T = GaussianMarginal(sde, MU, LAM, 0.6).sample(5, torch.Generator().manual_seed(0))
    for steps in (1, 2, 7):
        for denoise in (True, False):
            model = CountingModel(ExactGaussianEps(sde, MU, LAM))
            x0, nfe = _sampler(name, model, sde, x_T, 0.6, 1e-3, steps, generator=torch.Generator().manual_seed(0),
                               denoise=denoise)
            assert nfe == model.calls, (name, steps, denoise, nfe, model.calls)
            assert x0.shape == x_T.shape and torch.isfinite(x0).all()
            if name in NEW:
                assert nfe == steps + denoise


# --- the SDE variant ---------------------------------------------------------------------------


def test_dpmpp_2m_sde_is_reproducible_and_samples_the_data_distribution():
    sde = VPSDE()
    mu, lam = MU[:2], LAM[:2]
    model = ExactGaussianEps(sde, mu, lam)
    T, n = 1.0, 20_000

    def draw(seed, steps=50):
        g = torch.Generator().manual_seed(seed)
        x_T = GaussianMarginal(sde, mu, lam, T).sample(n, generator=g)
        return _sampler("dpm++2m-sde", model, sde, x_T, T, 1e-3, steps, generator=g).x

    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    se_mean = (lam / n).sqrt()
    assert ((a.mean(0) - mu).abs() < 4 * se_mean).all(), (a.mean(0), mu)
    # sd of a sample variance ~ lam sqrt(2/n) = 1% of lam; 5% leaves room for the discretisation
    assert ((a.var(0) / lam - 1).abs() < 0.05).all(), (a.var(0), lam)
    # the same start through the deterministic dpm++2m differs sample by sample: the noise is used
    g = torch.Generator().manual_seed(1)
    x_T = GaussianMarginal(sde, mu, lam, T).sample(n, generator=g)
    ode, _ = _sampler("dpm++2m", model, sde, x_T, T, 1e-3, 50)
    assert float((ode - a).pow(2).mean().sqrt()) > 0.1 * float(lam.sqrt().min())


# --- exactness against diffusers at T = 1 ------------------------------------------------------

UNET = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}
DDPM = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


@pytest.fixture(scope="module")
def tiny_ddpm():
    """A randomly initialised UNet2DModel as a difftime eps-network (float64), its VP SDE, and x_T.

    The retrofit time map puts training step k at the t_k with m(t_k)^2 = alphas_cumprod[k] exactly,
    and the wrapper evaluates the UNet at exactly timestep k there. The top step sits at
    t_999 = 1.0034 > 1 (the discrete chain's -log alphas_cumprod outgrows B by O(beta^2)), so the
    samplers get the same VP SDE with T_max = t_999.
    """
    pytest.importorskip("diffusers")
    try:
        from difftime.nets.diffusers import DiffusersEps
    except ImportError:  # the module before the architecture refactor
        from difftime.retrofit import DiffusersEps

    torch.manual_seed(0)
    net = DiffusersEps(UNET, DDPM["num_train_timesteps"], DDPM["beta_start"], DDPM["beta_end"]).double().eval()
    times = net.schedule.step_times()
    sde = VPSDE(b0=net.sde.b0, b1=net.sde.b1, T_max=float(times[-1]), eps=float(times[0]))
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    return net, sde, times, x_T


def _run_scheduler(net, scheduler, x_T, **step_kw):
    x = x_T.clone()
    with torch.no_grad():
        for k in scheduler.timesteps:
            x = scheduler.step(net.unet(x, k).sample, k, x, **step_kw).prev_sample
    return x, len(scheduler.timesteps)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_ddim_matches_diffusers_ddim_scheduler(tiny_ddpm):
    """10 DDIM steps at eta 0 from step 999 ("trailing": 999, 899, ..., 99).

    Each scheduler step goes from k to k - 100; the last, from 99, goes to final_alpha_cumprod = 1
    (set_alpha_to_one), i.e. x0 = x0_hat(x, t_99): that is difftime's Tweedie step at eps = t_99.
    """
    import diffusers

    net, sde, times, x_T = tiny_ddpm
    scheduler = diffusers.DDIMScheduler(**DDPM, clip_sample=False, set_alpha_to_one=True,
                                        timestep_spacing="trailing", thresholding=False)
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == list(range(999, 0, -100))
    ref, calls = _run_scheduler(net, scheduler, x_T, eta=0.0)
    ours, nfe = SAMPLERS["ddim"](net, sde, x_T, times[scheduler.timesteps], denoise=True)
    assert nfe == calls == 10
    assert _rel(ours, ref) <= 2e-6  # the issue's bound is 1e-4; measured 7e-8 (diffusers' float32 alphas)
    other, _ = SAMPLERS["dpm++2m"](net, sde, x_T, times[scheduler.timesteps])
    assert _rel(other, ref) > 1e-2  # the tolerance separates samplers


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
def test_dpmpp_2m_matches_diffusers_dpm_solver_multistep(tiny_ddpm, final_sigmas_type):
    """DPMSolverMultistepScheduler(dpmsolver++, order 2, midpoint), 10 steps at 999, 899, ..., 100.

    Its last step goes from step 100 either to sigma = 0 ("zero": a first-order step to sigma = 0,
    which is the Tweedie step, so difftime runs to eps = t_100 with denoise=True) or to step 0
    ("sigma_min": difftime runs to eps = t_0 with denoise=False). In both cases diffusers drops the
    last step to first order because the run is shorter than 15 steps; difftime's lower_order_final
    counts the Tweedie step as the final step, so its defaults reproduce both.
    """
    import diffusers

    net, sde, times, x_T = tiny_ddpm
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **DDPM, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", thresholding=False,
        lower_order_final=True, euler_at_final=False, final_sigmas_type=final_sigmas_type,
        use_karras_sigmas=False, timestep_spacing="linspace",
    )
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100]
    ref, calls = _run_scheduler(net, scheduler, x_T)
    ts = times[scheduler.timesteps]
    denoise = final_sigmas_type == "zero"
    if not denoise:
        ts = torch.cat([ts, times[:1]])
    ours, nfe = SAMPLERS["dpm++2m"](net, sde, x_T, ts, denoise=denoise)
    assert nfe == calls == 10
    # The issue's bound is 1e-4; measured 1.5e-7 and 1.8e-7 (diffusers' float32 sigmas). A first-order
    # instead of a second-order step from 200 to 100 moves the result by ~1.7e-5: 2e-6 tells them apart.
    assert _rel(ours, ref) <= 2e-6
    other, _ = SAMPLERS["ddim"](net, sde, x_T, ts, denoise=denoise)
    assert _rel(other, ref) > 1e-3


@pytest.mark.parametrize(("order", "steps"), [(2, 6), (2, 10), (3, 10)])
def test_unipc_matches_diffusers_unipc_multistep(tiny_ddpm, order, steps):
    """UniPCMultistepScheduler(bh2, predict_x0, corrector on) against difftime's unipc, float64.

    diffusers' last step goes to sigma = 0 (``final_sigmas_type="zero"``, order 1 by
    lower_order_final): x0 is the x0_hat of the uncorrected last point, which is difftime's Tweedie
    step at eps = the last timestep. Every earlier step is predicted and then corrected with the
    next call's output.
    """
    import diffusers

    net, sde, times, x_T = tiny_ddpm
    scheduler = diffusers.UniPCMultistepScheduler(
        **DDPM, solver_order=order, solver_type="bh2", predict_x0=True, thresholding=False,
        lower_order_final=True, final_sigmas_type="zero", timestep_spacing="linspace",
    )
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps[0] == 999 and len(scheduler.timesteps) == steps
    ref, calls = _run_scheduler(net, scheduler, x_T)
    ours, nfe = SAMPLERS["unipc"](net, sde, x_T, times[scheduler.timesteps], order=order)
    assert nfe == calls == steps
    assert _rel(ours, ref) <= 2e-6  # measured 1.4e-8 to 2.1e-7 at orders 1-3, 5-20 steps
    if order != 2:
        return
    # The corrector matters: without it unipc-2 is dpm++2m, and the tolerance tells them apart.
    plain, _ = SAMPLERS["unipc"](net, sde, x_T, times[scheduler.timesteps], corrector=False)
    two_m, _ = SAMPLERS["dpm++2m"](net, sde, x_T, times[scheduler.timesteps], lower_order_final=False)
    assert _rel(plain, two_m) <= 1e-12
    assert _rel(plain, ref) > 1e-4


def test_an_optimized_grid_exported_to_diffusers_reproduces_there(tiny_ddpm):
    """A grid optimized for a start at T = 0.6 (not diffusers' top step), snapped to the DDPM steps
    by ``to_diffusers``: DPMSolverMultistepScheduler given those ``timesteps`` and the same x_T (as a
    fitted prior would draw it) computes difftime's dpm++2m on the snapped grid."""
    import diffusers

    from difftime.gridopt import gaussian_grid, to_diffusers

    net, sde, times, x_T = tiny_ddpm
    grid = gaussian_grid(sde, 0.6, float(times[10]), 6, "dpm++2m")
    export = to_diffusers(grid.ts, times)
    assert export["timesteps"][0] < 999 and export["timesteps"][-1] == 10 and len(export["timesteps"]) == 6
    assert max(abs(a - b) for a, b in zip(export["ts"], grid.ts, strict=True)) < 2e-3  # snapped to 1/1000 steps
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **DDPM, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", thresholding=False,
        lower_order_final=True, euler_at_final=False, final_sigmas_type="zero", use_karras_sigmas=False,
    )
    scheduler.set_timesteps(timesteps=export["timesteps"])
    start = 0.8 * x_T  # any x_T: the start a prior at T = 0.6 draws
    ref, calls = _run_scheduler(net, scheduler, start)
    ours, nfe = SAMPLERS["dpm++2m"](net, sde, start, export["ts"])
    assert nfe == calls == 6
    assert _rel(ours, ref) <= 2e-6
