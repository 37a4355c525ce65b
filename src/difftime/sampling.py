"""Reverse-time samplers on [eps, T], k-diffusion / DPM-Solver style: one file, maths in docstrings.

Every sampler in ``SAMPLERS`` has one calling convention (docs/design.md §5), after k-diffusion's:

    sampler(model, sde, x, ts, *, generator=None, denoise=True, **options) -> SampleResult(x, nfe)

``x`` is the start x_T (drawn from whatever prior the caller chose) and ``ts`` the strictly
decreasing float64 time grid T = t_0 > t_1 > ... > t_N = eps that the sampler integrates on (a 1-D
tensor or sequence, :func:`check_grid`; build one with :func:`timesteps`). ``generator`` drives the
noise of ``em``, ``pc`` and ``dpm++2m-sde``; the deterministic samplers ignore it. The noise is drawn
on the generator's device and moved to x's (:mod:`difftime.rng`), so a CPU generator's seed gives
the same samples on a GPU up to float error. With
``denoise=True`` the run ends with Tweedie's step at eps, x0 = (x_eps - sigma(eps) eps_hat) / m(eps);
otherwise it returns x_eps. The result is a :class:`SampleResult` (it unpacks as ``x, nfe``), and
``nfe`` is the exact number of network calls, the Tweedie call included. ``dopri5`` chooses its own
steps: of ``ts`` it uses only ts[0] = T and ts[-1] = eps.

:func:`sample` draws x_T from a prior and builds the grid with :func:`timesteps`, on the sampler's
default spacing (:func:`default_spacing`, from ``SAMPLER_SPACINGS``) unless a spacing is given, and
ends at :func:`default_sample_eps` unless an eps is given.

Notation (docs/design.md §2). The kernel is p(x_t | x_0) = N(m_t x_0, sigma_t^2 I); the log-SNR is
lambda_t = log(m_t / sigma_t), strictly decreasing in t; sigma_tilde = sigma/m = exp(-lambda) and
x_tilde = x/m. The network predicts eps_hat(x, t); its data prediction is
x0_hat(x, t) = (x - sigma_t eps_hat) / m_t.

Classic samplers (default spacing ``"time"``, uniform in t):
  - ``em``: Euler-Maruyama on the reverse SDE dx = [f - g^2 s] dt + g dW_bar, s = -eps_hat/sigma;
  - ``pc``: reverse-diffusion predictor plus Langevin corrector (Song et al. 2021);
  - ``euler``, ``heun``: the probability-flow ODE dx/dt = f - g^2 s / 2 with Euler or Heun;
  - ``dopri5``: adaptive Dormand-Prince (torchdiffeq) on the same ODE; only ts[0] and ts[-1] count.

Exponential integrators (default spacing ``"logsnr"``). In lambda the PF-ODE is semi-linear, and its
exact solution from s to t (t < s, step h = lambda_t - lambda_s > 0) is (Lu et al. 2022, DPM-Solver++)

    x_t = (sigma_t / sigma_s) x_s + sigma_t int_{lambda_s}^{lambda_t} e^{lambda} x0_hat(x_lambda) dlambda.

Expanding x0_hat = D0 + u x0' + u^2/2 x0'' in u = lambda - lambda_s and integrating exactly, with
phi_1 = 1 - e^{-h}, phi_2 = phi_1/h - 1 (~ -h/2) and phi_3 = (h - phi_1)/h^2 - 1/2 (~ -h/6):

    x_t = (sigma_t / sigma_s) x_s + m_t phi_1 D0 - m_t phi_2 D1 - m_t phi_3 D2,

where D0 = x0_hat(x_s, s), D1 = h x0' + O(h^3) and D2 = h^2 x0'' + O(h^3) come from the stored
x0_hats of the previous steps (multistep: one network call per step):
  - ``ddim``: order 1, D1 = D2 = 0; x_t = (sigma_t/sigma_s) x_s - m_t (e^{-h} - 1) x0_hat_s, which is
    DDIM (eta = 0) written in lambda;
  - ``dpm++2m``: order 2, midpoint form: with the previous step h_0 = lambda_s - lambda_prev and
    r0 = h_0 / h, D1 = (D0 - x0_hat_prev) / r0, and the D1 term is (1/2) m_t phi_1 D1, i.e.
    x_t = (sigma_t/sigma_s) x_s + m_t phi_1 [(1 + 1/(2 r0)) D0 - 1/(2 r0) x0_hat_prev];
  - ``dpm++3m``: order 3: with r0 = h_0/h, r1 = h_1/h, D1_0 = (D0 - x0_prev)/r0,
    D1_1 = (x0_prev - x0_prev2)/r1, D1 = D1_0 + r0/(r0 + r1) (D1_0 - D1_1) and
    D2 = 2 (D1_0 - D1_1)/(r0 + r1). The reference code (DPM-Solver's ``multistep_dpm_solver_third_update``,
    diffusers' and k-diffusion's 3M) uses D2 = (D1_0 - D1_1)/(r0 + r1) = h^2 x0''/2 with the same
    phi_3 term: that step is not exact for x0_hat quadratic in lambda, and its global order is 2
    (measured: docs/design.md §5). So difftime's 3M is not diffusers' ``solver_order=3``.
  Warm-up: step i (0-based) has only i earlier x0_hats, so its order is at most i + 1.
  Corrected start (``corrected_start``, default for 3M and iPNDM): a lower-order first step caps a
  multistep method's global order at 2, because its O(h^2) error is never undone. The network call
  at (x_1, t_1) that step 1 needs anyway also gives the second-order (trapezoidal in lambda) step
  x_1 = (sigma_1/sigma_0) x_0 + m_1 [phi_1 x0_0 - phi_2 (x0_1 - x0_0)], exact for x0_hat linear in
  lambda; step 1 then starts from that x_1 with the same x0_1. No extra network call, and the
  order is 3 again (measured: docs/design.md §5).
  Lower-order final steps (``lower_order_final=True``, as DPM-Solver++ and diffusers): when the run
  has fewer than 15 solver steps, counting the Tweedie step as one (it is the order-1 step to
  sigma = 0), step i has order at most (steps + denoise) - i. So the last steps drop to order 2 and
  1, and a 3M with fewer steps than its order just runs at lower order. With ``denoise=True`` this
  is diffusers' ``final_sigmas_type="zero"`` and with ``denoise=False`` its ``"sigma_min"``.
  - ``dpm++2m-sde``: the SDE variant (Lu et al. 2022, diffusers ``algorithm_type="sde-dpmsolver++"``,
    midpoint form). The exact solution of the reverse SDE in lambda has the linear part
    (sigma_t/sigma_s) e^{-h}, the data part m_t (1 - e^{-2h}) and Gaussian noise of variance
    sigma_t^2 (1 - e^{-2h}):
        x_t = (sigma_t/sigma_s) e^{-h} x_s + m_t (1 - e^{-2h}) (D0 + D1/2) + sigma_t sqrt(1 - e^{-2h}) z,
    with D1 as in 2M (D1 = 0 at order 1), the same warm-up and final-order rules, z ~ N(0, I) from
    ``generator``.
  - ``ipndm``: improved PNDM (Zhang & Chen 2023): Adams-Bashforth of order min(4, i + 1) on the
    stored eps_hats in x_tilde = x/m against sigma_tilde, with the weights of the actual nodes by
    default. Its formulas are in :mod:`difftime.ipndm`. The first step takes the corrected start above.
  - ``unipc``: UniPC (Zhao et al. 2023), B(h) = e^h - 1 ("bh2"): a multistep predictor (order 2: the
    2M step) and a corrector that reuses the network call at the predicted point to raise the order
    by one, at no extra call. Its formulas are in :mod:`difftime.unipc`.

Step coefficients are computed in float64 from the SDE's closed forms (m, sigma, lambda) and
applied as Python floats, i.e. in the tensor's own dtype.

References: score SDE (em, pc, the PF-ODE), https://arxiv.org/abs/2011.13456; DDPM,
https://arxiv.org/abs/2006.11239; DPM-Solver++ (ddim in lambda, 2M, 3M, 2M-SDE),
https://arxiv.org/abs/2211.01095; EDM (the karras grid), https://arxiv.org/abs/2206.00364;
iPNDM, https://arxiv.org/abs/2204.13902; UniPC, https://arxiv.org/abs/2302.04867.

Example: ``SAMPLERS`` maps each name to its sampler. A zero network (eps_hat = 0) makes the PF-ODE
dx/dt = alpha x, which ``ddim`` solves exactly, so x0 = x_T / m(T):

>>> import torch
>>> from difftime.sampling import SAMPLERS, SPACINGS, timesteps
>>> from difftime.sde import VPSDE
>>> list(SAMPLERS)
['em', 'pc', 'euler', 'heun', 'dopri5', 'ddim', 'dpm++2m', 'dpm++3m', 'dpm++2m-sde', 'ipndm', 'unipc']
>>> SPACINGS
('time', 'logsnr', 'quadratic', 'karras')
>>> sde, zero = VPSDE(), lambda x, t: torch.zeros_like(x)
>>> ts = timesteps(sde, 0.4, 1e-3, steps=4)
>>> x_T = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
>>> x0, nfe = SAMPLERS["ddim"](zero, sde, x_T, ts)   # 4 steps + Tweedie's step
>>> nfe, bool(torch.allclose(x0, x_T / sde.m(torch.tensor(0.4))))
(5, True)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from difftime import distributed
from difftime.distributed import module_device, resolve_device
from difftime.errors import DifftimeError
from difftime.grids import (  # noqa: F401  (re-exported: the grids belong to sampling's API)
    SPACINGS,
    Grid,
    check_grid,
    check_spacing,
    steps_for_horizon,
    time_grid,
    timesteps,
)
from difftime.ipndm import IPNDM_COEFFICIENTS, adams_bashforth_coefficients  # noqa: F401  (re-exported)
from difftime.rng import randn_like_on
from difftime.sde import SDE, broadcast_to
from difftime.unipc import unipc_steps

if TYPE_CHECKING:
    from difftime.priors.base import Prior

# The defaults of `difftime sample` and friends, chosen by measurement (benchmarks/sampling_defaults.py);
# read them from here.
DEFAULT_SAMPLER = "dpm++2m"
DEFAULT_SPACING = "logsnr"
# The sampling end time, separate from the training / likelihood eps (sde.eps): the network is least
# accurate near t = 0, and DPM-Solver ends at 1e-3 below about 15 steps.
DEFAULT_SAMPLE_EPS = 1e-3
# DPM-Solver++ / diffusers use lower-order final steps only for runs shorter than this.
LOWER_ORDER_FINAL_BELOW = 15


class SampleResult(NamedTuple):
    """What every sampler and :func:`sample` return; it unpacks as ``x, nfe = ...``."""

    x: Tensor  # the samples: x0 after Tweedie's step, or x_eps with denoise=False
    nfe: int  # network calls per sample, the Tweedie call included


def default_sample_eps(sde: SDE) -> float:
    """The sampling end time when none is given: max(DEFAULT_SAMPLE_EPS, sde.eps), never below the
    training / likelihood eps. :func:`sample`, ``difftime sample`` / ``evaluate`` and the study share it."""
    return max(DEFAULT_SAMPLE_EPS, float(sde.eps))


def tweedie(model: nn.Module, sde: SDE, x: Tensor, eps: float) -> Tensor:
    """Tweedie's step at t = eps: x0 = (x - sigma(eps) eps_hat) / m(eps). One network call."""
    t = torch.full((len(x),), eps, dtype=x.dtype, device=x.device)
    eps_hat = model(x, t).to(x.dtype)
    return (x - broadcast_to(sde.sigma(t), x) * eps_hat) / broadcast_to(sde.m(t), x)


def _finish(model: nn.Module, sde: SDE, x: Tensor, eps: float, nfe: int, denoise: bool) -> SampleResult:
    if denoise:
        return SampleResult(tweedie(model, sde, x, eps), nfe + 1)
    return SampleResult(x, nfe)


# --- classic samplers (uniform-in-t grid by default) --------------------------------------------


@torch.no_grad()
def euler_maruyama(
    model: nn.Module, sde: SDE, x: Tensor, ts: Grid, *, generator: torch.Generator | None = None,
    denoise: bool = True,
) -> SampleResult:
    """Euler-Maruyama on the reverse SDE dx = [f - g^2 s] dt + g dW, s = -eps_hat / sigma."""
    grid = check_grid(sde, ts)
    steps, eps = len(grid) - 1, float(grid[-1])
    ts = grid.to(x.dtype).to(x.device)
    for i in range(steps):
        t = ts[i].expand(len(x))
        dt = ts[i] - ts[i + 1]
        eps_hat = model(x, t).to(x.dtype)
        g2 = broadcast_to(sde.g2(t), x)
        score_term = g2 * eps_hat / broadcast_to(sde.sigma(t), x)  # = -g^2 s
        x = x - (sde.drift(x, t) + score_term) * dt
        x = x + (g2 * dt).sqrt() * randn_like_on(x, generator)
    return _finish(model, sde, x, eps, steps, denoise)


def probability_flow_drift(model: nn.Module, sde: SDE, x: Tensor, t: Tensor) -> Tensor:
    """F(x, t) = f - g^2 s / 2 = alpha x + g^2 eps_hat / (2 sigma)."""
    eps_hat = model(x, t).to(x.dtype)
    return sde.drift(x, t) + broadcast_to(0.5 * sde.g2(t) / sde.sigma(t), x) * eps_hat


@torch.no_grad()
def ode_euler(
    model: nn.Module, sde: SDE, x: Tensor, ts: Grid, *, generator: torch.Generator | None = None,
    denoise: bool = True,
) -> SampleResult:
    """Fixed-step Euler on the probability-flow ODE (deterministic; ``generator`` is unused)."""
    grid = check_grid(sde, ts)
    steps, eps = len(grid) - 1, float(grid[-1])
    ts = grid.to(x.dtype).to(x.device)
    for i in range(steps):
        x = x + (ts[i + 1] - ts[i]) * probability_flow_drift(model, sde, x, ts[i].expand(len(x)))
    return _finish(model, sde, x, eps, steps, denoise)


@torch.no_grad()
def ode_heun(
    model: nn.Module, sde: SDE, x: Tensor, ts: Grid, *, generator: torch.Generator | None = None,
    denoise: bool = True,
) -> SampleResult:
    """Heun's second-order method on the probability-flow ODE: 2 NFE per step."""
    grid = check_grid(sde, ts)
    steps, eps = len(grid) - 1, float(grid[-1])
    ts = grid.to(x.dtype).to(x.device)
    for i in range(steps):
        h = ts[i + 1] - ts[i]
        d1 = probability_flow_drift(model, sde, x, ts[i].expand(len(x)))
        x_pred = x + h * d1
        d2 = probability_flow_drift(model, sde, x_pred, ts[i + 1].expand(len(x)))
        x = x + 0.5 * h * (d1 + d2)
    return _finish(model, sde, x, eps, 2 * steps, denoise)


@torch.no_grad()
def ode_dopri5(
    model: nn.Module, sde: SDE, x: Tensor, ts: Grid, *, generator: torch.Generator | None = None,
    denoise: bool = True, rtol: float = 1e-5, atol: float = 1e-5,
) -> SampleResult:
    """Adaptive Dormand-Prince (torchdiffeq) on the probability-flow ODE.

    The solver chooses its own steps: of ``ts`` only the ends T = ts[0] and eps = ts[-1] count (any
    valid grid between them gives the same result). ``generator`` is unused.
    """
    from torchdiffeq import odeint

    grid = check_grid(sde, ts)
    T, eps = float(grid[0]), float(grid[-1])
    x_T = x
    nfe = 0

    def rhs(t: Tensor, x: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return probability_flow_drift(model, sde, x, t.to(x.dtype).expand(len(x)))

    times = torch.tensor([T, eps], dtype=x_T.dtype, device=x_T.device)
    # step_t makes the solver land on eps instead of stepping past it to t < 0, where v(t) < 0.
    x = odeint(rhs, x_T, times, rtol=rtol, atol=atol, method="dopri5",
               options={"step_t": times[1:]})[-1]
    return _finish(model, sde, x, eps, nfe, denoise)


@torch.no_grad()
def predictor_corrector(
    model: nn.Module, sde: SDE, x: Tensor, ts: Grid, *, generator: torch.Generator | None = None,
    denoise: bool = True, snr: float = 0.16, corrector_steps: int = 1,
) -> SampleResult:
    """Reverse-diffusion predictor with a Langevin corrector (Song et al. 2021, Alg. 2-3).

    The predictor discretises the forward SDE with its exact kernel over each step,
    x_t = a x_s + sqrt(q) z, and reverses it: x_s = (2 - a) x_t + q s(x_t, t) + sqrt(q) z. This is
    ancestral DDPM sampling for VP and SMLD sampling for VE, on any grid. The corrector runs
    ``corrector_steps`` Langevin steps at signal-to-noise ratio ``snr`` before each predictor step.
    """
    grid = check_grid(sde, ts)
    steps, eps = len(grid) - 1, float(grid[-1])
    ts = grid.to(x.dtype).to(x.device)

    def score(x: Tensor, t: Tensor) -> Tensor:
        return -model(x, t).to(x.dtype) / broadcast_to(sde.sigma(t), x)

    def randn() -> Tensor:
        return randn_like_on(x, generator)

    for i in range(steps):
        t = ts[i].expand(len(x))
        a, q = sde.transition(ts[i + 1].expand(len(x)), t)
        for _ in range(corrector_steps):
            grad = score(x, t)
            noise = randn()
            grad_norm = grad.flatten(1).norm(dim=1).mean()
            noise_norm = noise.flatten(1).norm(dim=1).mean()
            step = broadcast_to(2 * a**2, x) * (snr * noise_norm / grad_norm) ** 2
            x = x + step * grad + (2 * step).sqrt() * noise
        a, q = broadcast_to(a, x), broadcast_to(q, x)
        x = (2 - a) * x + q * score(x, t) + q.sqrt() * randn()
    return _finish(model, sde, x, eps, steps * (corrector_steps + 1), denoise)


# --- exponential integrators and iPNDM (log-SNR grid by default) --------------------------------


def _phis(h: float) -> tuple[float, float, float]:
    """phi_1 = 1 - e^{-h}, phi_2 = phi_1/h - 1, phi_3 = (h - phi_1)/h^2 - 1/2, in float64.

    For small h the closed forms cancel; their Taylor series are used instead.
    """
    phi1 = -math.expm1(-h)
    if h < 1e-3:
        phi2 = -h / 2 + h**2 / 6 - h**3 / 24
        phi3 = -h / 6 + h**2 / 24 - h**3 / 120
    else:
        phi2 = phi1 / h - 1
        phi3 = (h - phi1) / h**2 - 0.5
    return phi1, phi2, phi3


def _step_order(i: int, order: int, steps: int, denoise: bool, lower_order_final: bool) -> int:
    """Warm-up (at most i + 1) and, for short runs, lower-order final steps (at most total - i)."""
    k = min(order, i + 1)
    total = steps + int(denoise)  # the Tweedie step is the order-1 step to sigma = 0
    if lower_order_final and total < LOWER_ORDER_FINAL_BELOW:
        k = min(k, total - i)
    return k


def _corrected_first_step(
    x_0: Tensor, x0_0: Tensor, x0_1: Tensor, lam: list[float], m: list[float], sigma: list[float]
) -> Tensor:
    """The second-order exponential step t_0 -> t_1 from x0_hat at both ends (trapezoidal in lambda):
    x_1 = (sigma_1/sigma_0) x_0 + m_1 [phi_1 x0_0 - phi_2 (x0_1 - x0_0)], exact when x0_hat is linear
    in lambda. x0_1 is the network's output at the predicted x_1, which the next step needs anyway."""
    phi1, phi2, _ = _phis(lam[1] - lam[0])
    return x_0 * (sigma[1] / sigma[0]) + x0_0 * (m[1] * phi1) - (x0_1 - x0_0) * (m[1] * phi2)


def _dpm_solver_pp(
    model: nn.Module, sde: SDE, x_T: Tensor, grid: Tensor, order: int, denoise: bool,
    lower_order_final: bool, stochastic: bool = False, generator: torch.Generator | None = None,
    corrected_start: bool = False,
) -> SampleResult:
    """Multistep DPM-Solver++ (data prediction) of ``order`` 1-3 on ``grid``; the SDE variant if
    ``stochastic`` (order <= 2). See the module docstring for the update formulas."""
    steps = len(grid) - 1
    lam = sde.log_snr(grid).tolist()
    m = sde.m(grid).tolist()
    sigma = sde.sigma(grid).tolist()
    x = x_T
    x0s: list[Tensor] = []  # the last x0_hats, newest last
    for i in range(steps):
        t = torch.full((len(x),), float(grid[i]), dtype=x.dtype, device=x.device)
        eps_hat = model(x, t).to(x.dtype)
        x0 = (x - sigma[i] * eps_hat) / m[i]
        if corrected_start and i == 1:
            x = _corrected_first_step(x_T, x0s[-1], x0, lam, m, sigma)
        x0s = [*x0s[-2:], x0]
        k = _step_order(i, order, steps, denoise, lower_order_final)
        h = lam[i + 1] - lam[i]
        D0 = x0s[-1]
        if k == 1:
            D1 = D2 = None
        else:
            r0 = (lam[i] - lam[i - 1]) / h
            D1_0 = (x0s[-1] - x0s[-2]) * (1 / r0)
            if k == 2:
                D1, D2 = D1_0, None
            else:
                r1 = (lam[i - 1] - lam[i - 2]) / h
                D1_1 = (x0s[-2] - x0s[-3]) * (1 / r1)
                D1 = D1_0 + (D1_0 - D1_1) * (r0 / (r0 + r1))
                D2 = (D1_0 - D1_1) * (2 / (r0 + r1))
        if stochastic:
            e2h = -math.expm1(-2 * h)  # 1 - e^{-2h}
            x = x * (sigma[i + 1] / sigma[i] * math.exp(-h)) + D0 * (m[i + 1] * e2h)
            if D1 is not None:
                x = x + D1 * (0.5 * m[i + 1] * e2h)
            x = x + randn_like_on(x, generator) * (sigma[i + 1] * math.sqrt(e2h))
        else:
            phi1, phi2, phi3 = _phis(h)
            x = x * (sigma[i + 1] / sigma[i]) + D0 * (m[i + 1] * phi1)
            if D2 is not None:  # order 3
                x = x - D1 * (m[i + 1] * phi2) - D2 * (m[i + 1] * phi3)
            elif D1 is not None:  # order 2, midpoint form
                x = x + D1 * (0.5 * m[i + 1] * phi1)
    return _finish(model, sde, x, float(grid[-1]), steps, denoise)


@torch.no_grad()
def ddim(
    model: nn.Module, sde: SDE, x: Tensor, ts: Grid, *, generator: torch.Generator | None = None,
    denoise: bool = True,
) -> SampleResult:
    """DDIM (eta = 0), the first-order exponential integrator in lambda (DPM-Solver++ 1):
    x_t = (sigma_t/sigma_s) x_s + m_t (1 - e^{-h}) x0_hat(x_s, s), h = lambda_t - lambda_s.
    One network call per step; ``generator`` is unused."""
    return _dpm_solver_pp(model, sde, x, check_grid(sde, ts), 1, denoise, lower_order_final=False)


@torch.no_grad()
def dpmpp_2m(
    model: nn.Module, sde: SDE, x: Tensor, ts: Grid, *, generator: torch.Generator | None = None,
    denoise: bool = True, lower_order_final: bool = True,
) -> SampleResult:
    """DPM-Solver++(2M), multistep data prediction, midpoint form:
    x_t = (sigma_t/sigma_s) x_s + m_t (1 - e^{-h}) [(1 + 1/(2 r)) x0_hat_s - 1/(2 r) x0_hat_prev],
    r = h_prev / h. The first step is order 1, and so is the last when the run is short
    (``lower_order_final``, see the module docstring). One network call per step."""
    return _dpm_solver_pp(model, sde, x, check_grid(sde, ts), 2, denoise, lower_order_final)


@torch.no_grad()
def dpmpp_3m(
    model: nn.Module, sde: SDE, x: Tensor, ts: Grid, *, generator: torch.Generator | None = None,
    denoise: bool = True, lower_order_final: bool = True, corrected_start: bool = True,
) -> SampleResult:
    """DPM-Solver++(3M), multistep data prediction of order 3 (Lu et al. 2022):
    x_t = (sigma_t/sigma_s) x_s + m_t phi_1 D0 - m_t phi_2 D1 - m_t phi_3 D2 with
    phi_1 = 1 - e^{-h}, phi_2 = phi_1/h - 1, phi_3 = (h - phi_1)/h^2 - 1/2 and D0, D1, D2 from the
    last three x0_hats (module docstring; D2 ~ h^2 x0_hat'', twice the D2 of the reference code).
    Warm-up orders 1, 2; short runs end with orders 2, 1; fewer steps than 3 simply run at lower
    order. ``corrected_start`` (module docstring) keeps the order 3 that the first-order first step
    would otherwise cap at 2. One network call per step."""
    return _dpm_solver_pp(model, sde, x, check_grid(sde, ts), 3, denoise, lower_order_final,
                          corrected_start=corrected_start)


@torch.no_grad()
def dpmpp_2m_sde(
    model: nn.Module, sde: SDE, x: Tensor, ts: Grid, *, generator: torch.Generator | None = None,
    denoise: bool = True, lower_order_final: bool = True,
) -> SampleResult:
    """DPM-Solver++(2M) SDE (diffusers ``sde-dpmsolver++``, midpoint form):
    x_t = (sigma_t/sigma_s) e^{-h} x_s + m_t (1 - e^{-2h}) (D0 + D1/2) + sigma_t sqrt(1 - e^{-2h}) z,
    D0 = x0_hat_s, D1 = (x0_hat_s - x0_hat_prev) h / h_prev (0 at order 1), z ~ N(0, I) drawn from
    ``generator``. Same warm-up and final-order rules as 2M. One network call per step."""
    return _dpm_solver_pp(model, sde, x, check_grid(sde, ts), 2, denoise, lower_order_final, stochastic=True,
                          generator=generator)


@torch.no_grad()
def ipndm(
    model: nn.Module, sde: SDE, x: Tensor, ts: Grid, *, generator: torch.Generator | None = None,
    denoise: bool = True, variable_step: bool = True, corrected_start: bool = True,
) -> SampleResult:
    """iPNDM: Adams-Bashforth of order min(4, i + 1) on dx_tilde/dsigma_tilde = eps_hat, with
    x_tilde = x/m and sigma_tilde = sigma/m (module docstring):
    x_{i+1} = (m_{i+1}/m_i) x_i + m_{i+1} (sigma_tilde_{i+1} - sigma_tilde_i) sum_j b_j e_{i-j}.

    With ``variable_step`` (the default) the b_j integrate the interpolant through the stored
    eps_hats at their actual sigma_tilde (:func:`adams_bashforth_coefficients`). They equal the
    classic fixed coefficients on a grid uniform in sigma_tilde (``karras`` with rho = 1), and keep
    the multistep order on any other grid. ``variable_step=False`` applies the fixed coefficients
    on every grid, as k-diffusion's ``sample_ipndm``; on a non-uniform grid that is only second
    order. ``corrected_start`` replaces the first (Euler) step by the second-order exponential step
    of :func:`dpmpp_3m`, at no extra network call. One network call per step; ``generator`` is
    unused.

    The order is not the whole story at few steps: at a handful of log-SNR steps the fixed weights
    measured more accurate than the variable ones, which win at many steps (docs/design.md §5).
    Compare both where the step budget is small."""
    grid = check_grid(sde, ts)
    steps = len(grid) - 1
    lam = sde.log_snr(grid).tolist()
    m = sde.m(grid).tolist()
    sigma = sde.sigma(grid).tolist()
    st = (sde.sigma(grid) / sde.m(grid)).tolist()
    x_T = x
    eps_hats: list[Tensor] = []  # newest first
    for i in range(steps):
        t = torch.full((len(x),), float(grid[i]), dtype=x.dtype, device=x.device)
        eps_hat = model(x, t).to(x.dtype)
        if corrected_start and i == 1:
            x0_0 = (x_T - sigma[0] * eps_hats[0]) / m[0]
            x = _corrected_first_step(x_T, x0_0, (x - sigma[1] * eps_hat) / m[1], lam, m, sigma)
        eps_hats = [eps_hat, *eps_hats[:3]]
        k = min(4, i + 1)
        dst = st[i + 1] - st[i]
        if variable_step:
            coefs = adams_bashforth_coefficients([(st[i - j] - st[i]) / dst for j in range(k)])
        else:
            coefs = IPNDM_COEFFICIENTS[k - 1]
        x = x * (m[i + 1] / m[i])
        for b, e in zip(coefs, eps_hats, strict=False):
            x = x + e * (m[i + 1] * dst * b)
    return _finish(model, sde, x, float(grid[-1]), steps, denoise)


@torch.no_grad()
def unipc(
    model: nn.Module, sde: SDE, x: Tensor, ts: Grid, *, generator: torch.Generator | None = None,
    denoise: bool = True, order: int = 2, lower_order_final: bool = True, corrector: bool = True,
) -> SampleResult:
    """UniPC-``order`` with B(h) = e^h - 1 (bh2), data prediction (Zhao et al. 2023): the UniP
    predictor (at order 2 the step of :func:`dpmpp_2m`) and the UniC corrector, which reuses the
    network call at the predicted point to raise the order by one. Formulas: :mod:`difftime.unipc`.
    ``lower_order_final`` as diffusers' (step i of a run of ``total`` has order <= total - i, at any
    length). One network call per step; ``generator`` is unused."""
    if order not in (1, 2, 3):
        raise DifftimeError(f"unipc order must be 1, 2 or 3, got {order!r}")
    grid = check_grid(sde, ts)
    x = unipc_steps(model, sde, x, grid, order=order, denoise=denoise, lower_order_final=lower_order_final,
                    corrector=corrector)
    return _finish(model, sde, x, float(grid[-1]), len(grid) - 1, denoise)


SAMPLERS = {
    "em": euler_maruyama,
    "pc": predictor_corrector,
    "euler": ode_euler,
    "heun": ode_heun,
    "dopri5": ode_dopri5,
    "ddim": ddim,
    "dpm++2m": dpmpp_2m,
    "dpm++3m": dpmpp_3m,
    "dpm++2m-sde": dpmpp_2m_sde,
    "ipndm": ipndm,
    "unipc": unipc,
}


# The spacing of the grid that `sample` builds for each sampler when it is given none: uniform in t
# for the classic samplers, uniform in log-SNR for the exponential integrators and iPNDM (dopri5
# reads only the ends of its grid).
SAMPLER_SPACINGS = {
    "em": "time",
    "pc": "time",
    "euler": "time",
    "heun": "time",
    "dopri5": "time",
    "ddim": "logsnr",
    "dpm++2m": "logsnr",
    "dpm++3m": "logsnr",
    "dpm++2m-sde": "logsnr",
    "ipndm": "logsnr",
    "unipc": "logsnr",
}


def check_sampler(name: str) -> Callable[..., SampleResult]:
    """The registered sampler ``name``, or one clear error that lists the choices."""
    if name not in SAMPLERS:
        raise DifftimeError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def default_spacing(sampler: str) -> str:
    """The spacing of the grid :func:`sample` builds for the registered ``sampler`` when given none."""
    check_sampler(sampler)
    return SAMPLER_SPACINGS[sampler]


def zero_eps(x: Tensor, t: Tensor) -> Tensor:
    """An eps-network that predicts zero, as a function of x (so a VJP through it is defined): it
    replays a sampler's or a likelihood's random draws without the network."""
    return x * 0


def sample(
    model: nn.Module,
    sde: SDE,
    prior: Prior,
    T: float,
    *,
    n: int,
    eps: float | None = None,
    sampler: str = DEFAULT_SAMPLER,
    steps: int = 10,
    spacing: str | None = None,
    generator: torch.Generator | None = None,
    batch: int | None = None,
    ts: Grid | None = None,
    device: torch.device | str | None = None,
    shard: bool = False,
    **options: Any,
) -> SampleResult:
    """n samples in model space: x_T ~ ``prior``, then ``sampler`` from T down to eps.

    The grid is ``timesteps(sde, T, eps, steps, spacing)``: ``spacing`` defaults to
    ``default_spacing(sampler)`` and ``eps`` to ``default_sample_eps(sde)``. ``prior`` is anything
    with ``sample(n, generator=None)`` (the :class:`difftime.priors.Prior` protocol). One
    ``generator`` drives the prior draw and every sampler batch, so a seed fixes the samples whatever
    ``batch`` is. Returns ``SampleResult(x, nfe)``, the NFE per sample; ``options`` go to the
    sampler (``denoise``, ``snr``, ``lower_order_final``, ...). An explicit grid ``ts`` (from T down
    to eps, e.g. a :class:`difftime.gridopt.TimeGrid`'s) replaces ``steps`` and ``spacing``.

    ``model(x, t) -> eps_hat`` is any eps-network with absolute time t of shape (B,); ``T`` is the
    horizon (0 < eps < T <= sde.T_max); ``n`` the number of samples and ``batch`` the most the
    sampler integrates at once (None: all n). x_T is drawn where the prior lives and integrated on
    ``device`` (default: the model's, from its first parameter or buffer, or x_T's for a plain
    function), where ``x`` is returned, of shape (n, *prior's shape), in model space.
    With ``shard`` under torchrun each rank integrates the batches k = rank mod world size and every
    rank gets them all back: the same samples at any world size (docs/design.md §8).
    Bad input raises DifftimeError. docs/design.md §5 has the conventions; the method is the
    paper's, https://arxiv.org/abs/2206.05173 (a short T with a prior fitted to p_T).

    >>> import torch
    >>> import difftime as dt
    >>> sde = dt.VPSDE()
    >>> prior = dt.StandardPrior((2,), T=0.4)
    >>> zero = lambda x, t: torch.zeros_like(x)
    >>> x0, nfe = dt.sample(zero, sde, prior, 0.4, n=3, steps=5, generator=torch.Generator().manual_seed(0))
    >>> tuple(x0.shape), nfe
    ((3, 2), 6)
    >>> same = dt.sample(zero, sde, prior, 0.4, n=3, steps=5, batch=2, generator=torch.Generator().manual_seed(0))
    >>> bool(torch.equal(same.x, x0))   # one generator: the batch size does not change the samples
    True
    """
    step_fn = check_sampler(sampler)
    if ts is not None:  # an explicit grid (e.g. difftime.gridopt's) replaces steps and spacing
        ts = check_grid(sde, ts)
        if not math.isclose(float(ts[0]), T, rel_tol=1e-9) or (eps is not None and not math.isclose(
                float(ts[-1]), eps, rel_tol=1e-9)):
            raise DifftimeError(f"the grid runs from {float(ts[0]):g} to {float(ts[-1]):g}, not from T={T:g}"
                                + ("" if eps is None else f" to eps={eps:g}"))
    else:
        T, eps = sde.check_horizon(T, default_sample_eps(sde) if eps is None else eps)
        ts = timesteps(sde, T, eps, steps, default_spacing(sampler) if spacing is None else spacing)
    with torch.no_grad():
        x_T = prior.sample(n, generator=generator)
    x_T = x_T.to(module_device(model, x_T.device) if device is None else resolve_device(device))
    size = batch or max(n, 1)
    firsts = range(0, n, size)

    def solve(k: int, net: Callable = model) -> SampleResult:
        return step_fn(net, sde, x_T[firsts[k]:firsts[k] + size], ts, generator=generator, **options)

    replay: Callable[[int], Any] | None = None
    if shard and distributed.world_size() > 1:
        if generator is None:
            raise DifftimeError("sampling shared across ranks needs a seeded generator, so every rank draws alike")
        # The others' batches are replayed with a zero network: a sampler's draws depend on shapes
        # only, so the generator stays where one process has it. Deterministic samplers skip this.
        probe = torch.Generator().set_state(generator.get_state())
        step_fn(zero_eps, sde, x_T[:1], ts, generator=probe, **options)
        if not torch.equal(probe.get_state(), generator.get_state()):
            replay = functools.partial(solve, net=zero_eps)
    if not shard:
        results = [solve(k) for k in range(len(firsts))]
    else:
        def solve_to_cpu(k: int) -> SampleResult:  # results travel between ranks through the CPU
            x0, nfe = solve(k)
            return SampleResult(x0.cpu(), nfe)

        results = distributed.deal(len(firsts), solve_to_cpu, replay)
    return SampleResult(torch.cat([r.x for r in results]).to(x_T.device), results[-1].nfe)
