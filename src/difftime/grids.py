"""Time grids of the samplers: T = t_0 > t_1 > ... > t_N = eps on a free horizon, in time, log-SNR,
quadratic or Karras spacing, and the checks of an explicit grid (docs/design.md §5)."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from difftime.errors import DifftimeError
from difftime.sde import SDE

SPACINGS = ("time", "logsnr", "quadratic", "karras")


def time_grid(T: float, eps: float, steps: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """N + 1 times from T down to eps; the step is (T - eps) / N, never 1 / N."""
    if steps < 1:
        raise DifftimeError(f"steps must be >= 1, got {steps}")
    return torch.linspace(T, eps, steps + 1, dtype=torch.float64).to(dtype)


def timesteps(
    sde: SDE, T: float, eps: float, steps: int, spacing: str = "logsnr", rho: float = 7.0
) -> Tensor:
    """The float64 grid T = t_0 > t_1 > ... > t_N = eps of N = ``steps`` steps.

    With lambda(t) = log(m/sigma) and sigma_tilde = exp(-lambda), for i = 0..N:
      - ``time``: t_i = T - i (T - eps)/N;
      - ``logsnr``: lambda_i = lambda(T) + i/N (lambda(eps) - lambda(T));
      - ``quadratic``: t_i = eps + (T - eps) (1 - i/N)^2, denser near eps;
      - ``karras``: sigma_tilde_i = (st_max^(1/rho) + i/N (st_min^(1/rho) - st_max^(1/rho)))^rho with
        st_max = sigma_tilde(T), st_min = sigma_tilde(eps) (Karras et al. 2022, in sigma/m).
    The log-SNR grids map back with the SDE's closed-form ``t_from_log_snr``; the ends are set to
    exactly T and eps.

    ``sde`` checks the horizon 0 < eps < T <= T_max; ``steps`` is an integer >= 1, ``spacing`` one of
    ``SPACINGS`` and ``rho`` > 0 (``karras`` only). Returns a float64 tensor of shape (steps + 1,);
    raises DifftimeError on bad input or when float64 cannot hold that many distinct times.
    References: DPM-Solver++ (logsnr), https://arxiv.org/abs/2211.01095; EDM (karras),
    https://arxiv.org/abs/2206.00364.

    >>> from difftime.sampling import timesteps
    >>> from difftime.sde import VPSDE
    >>> ts = timesteps(VPSDE(), 0.4, 1e-3, steps=4, spacing="time")
    >>> [round(t, 5) for t in ts.tolist()]
    [0.4, 0.30025, 0.2005, 0.10075, 0.001]
    >>> ts = timesteps(VPSDE(), 0.4, 1e-3, steps=4)   # uniform in log-SNR
    >>> ts.dtype, float(ts[0]), float(ts[-1]), bool((ts[1:] < ts[:-1]).all())
    (torch.float64, 0.4, 0.001, True)
    """
    check_spacing(spacing)
    try:
        n = operator.index(steps)
    except TypeError:
        raise DifftimeError(f"steps must be an integer >= 1, got {steps!r}") from None
    if isinstance(steps, bool) or n < 1:
        raise DifftimeError(f"steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho > 0):
        raise DifftimeError(f"rho must be a positive number, got {rho!r}")
    T, eps = sde.check_horizon(T, eps)
    if spacing == "time":
        grid = time_grid(T, eps, n, torch.float64)
    elif spacing == "quadratic":
        u = 1 - torch.arange(n + 1, dtype=torch.float64) / n
        grid = eps + (T - eps) * u**2
    else:
        lam_T, lam_eps = sde.log_snr(torch.tensor([T, eps], dtype=torch.float64)).tolist()
        if spacing == "logsnr":
            lam = torch.linspace(lam_T, lam_eps, n + 1, dtype=torch.float64)
        else:  # karras: sigma_tilde^(1/rho) = exp(-lambda/rho), uniform
            a, b = math.exp(-lam_T / rho), math.exp(-lam_eps / rho)
            lam = -rho * torch.log(a + torch.arange(n + 1, dtype=torch.float64) / n * (b - a))
        grid = sde.t_from_log_snr(lam)
    grid[0], grid[-1] = T, eps
    if not bool((grid[1:] < grid[:-1]).all()):
        raise DifftimeError(
            f"{n} {spacing} steps on [{eps:g}, {T:g}] do not give strictly decreasing float64 times; use fewer steps"
        )
    return grid


Grid = Tensor | Sequence[float]  # a sampler's time grid ts


def check_grid(sde: SDE, ts: Grid) -> Tensor:
    """An explicit grid as a float64 CPU tensor: 1-D, at least 2 finite times, strictly decreasing,
    within (0, T_max]."""
    # A Python list must not pass through float32 (torch's default dtype) on its way to float64.
    try:
        grid = ts.detach().to("cpu", torch.float64) if isinstance(ts, Tensor) else torch.tensor(ts, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise DifftimeError(f"ts must be a 1-D sequence of times: {exc}") from None
    if grid.dim() != 1 or len(grid) < 2 or not bool(torch.isfinite(grid).all()):
        raise DifftimeError(f"ts must be a 1-D grid of at least 2 finite times, got shape {tuple(grid.shape)}")
    if not bool((grid[1:] < grid[:-1]).all()):
        raise DifftimeError("ts must be strictly decreasing, from T down to eps")
    sde.check_horizon(float(grid[0]), float(grid[-1]))
    return grid


def steps_for_horizon(T: float, steps_per_unit_time: float) -> int:
    """The paper's cost model: a step count proportional to T, so the NFE scales with T."""
    if not steps_per_unit_time > 0:
        raise DifftimeError(f"steps per unit time must be > 0, got {steps_per_unit_time}")
    return max(1, round(steps_per_unit_time * T))


def check_spacing(name: str) -> str:
    """``name`` if it is one of ``SPACINGS``, or one clear error that lists the choices."""
    if name not in SPACINGS:
        raise DifftimeError(f"unknown spacing {name!r}; choose from {', '.join(SPACINGS)}")
    return name
