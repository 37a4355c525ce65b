"""Time grids optimized for a sampler, an NFE budget and a start time T (docs/design.md §5).

A fixed spacing (time, log-SNR, quadratic, Karras) ignores what the sampler and the data need. Two
optimizers choose the N + 1 times T = t_0 > ... > t_N = eps instead, for a start at any T from any
prior, and both return a :class:`TimeGrid` that every sampler takes as its ``ts``:

- ``gaussian`` (model-free, seconds): the grid that minimises the sampler's exact error on Gaussian
  data N(0, diag(s_k^2)). For such data the PF-ODE is linear in every eigen-direction: from x_T its
  exact end, after Tweedie's step at eps, is c*_k x_T with
      c*_k = sqrt(m_e^2 s_k^2 + sigma_e^2) / sqrt(m_T^2 s_k^2 + sigma_T^2) * m_e s_k^2 / (m_e^2 s_k^2 + sigma_e^2)
  (without denoising: the first factor only), and a sampler run with the exact eps-network gives some
  c_k, also linear in x_T. The objective is the relative mean squared error over x_T ~ p_T,
      J = sum_k (c_k - c*_k)^2 w_k / sum_k c*_k^2 w_k,   w_k = m_T^2 s_k^2 + sigma_T^2,
  computed exactly by running the real sampler once on one x_T = 1 per direction. The variances
  s_k^2 are the data's covariance eigenvalues where known (``difftime grid`` passes them), else
  log-uniform standard deviations from sigma_tilde(eps) = sigma/m at eps (the finest scale the
  grid resolves) to 1: then the grid depends on the SDE's coefficients alone. The free parameters
  are the N log-SNR increments (softmax of N - 1 logits, so the grid stays ordered and ends at
  exactly T and eps); scipy's Powell search starts from the uniform log-SNR grid, so J never ends
  above that grid's J. In the spirit of Xue et al. 2024 (optimized time steps from alpha and sigma
  alone), with the exact Gaussian error in place of their bound.
- ``gits`` (model-based, minutes): GITS (Chen et al. 2024). A teacher trajectory from n x_T drawn
  from the chosen prior at T, on M + 1 fine nodes uniform in log-SNR (dpm++2m with ``substeps``
  steps between nodes), gives the cost of one coarse first-order step from node a to node b:
      c(a, b) = mean_n || x_tilde_hat_b - x_tilde_b ||_2,
      x_hat_b = (sigma_b/sigma_a) x_a + m_b (1 - e^{-h}) x0_hat(x_a, t_a),  x_tilde = x/m,
  the local error of DDIM in x/m (the coordinates of EDM, where GITS measures it). Dynamic
  programming finds the N-step path 0 -> M of least total cost. The teacher costs
  n * M * substeps network calls; the cost matrix and the path cost none.

The grid is saved as a small JSON file (:meth:`TimeGrid.save`): ``T``, ``eps``, ``nfe``,
``sampler``, ``ts`` and how it was found (``method``, ``info``), and used with
``difftime sample --ts FILE`` or ``dt.sample(..., ts=grid.ts)``. :func:`to_diffusers` snaps a grid
to a discrete DDPM schedule and gives the integer ``timesteps`` that diffusers' schedulers accept.

References: GITS, https://arxiv.org/abs/2405.11326; optimized time steps (Xue et al.),
https://arxiv.org/abs/2402.17376; Align Your Steps, https://arxiv.org/abs/2404.14507.

>>> import torch
>>> from difftime.gridopt import gaussian_grid
>>> from difftime.sde import VPSDE
>>> grid = gaussian_grid(VPSDE(), 0.6, 1e-3, nfe=5, sampler="dpm++2m")
>>> len(grid.ts), grid.nfe, grid.T, grid.eps
(5, 5, 0.6, 0.001)
>>> grid.info["error"] <= grid.info["error_logsnr"]
True
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difftime.distributed import module_device
from difftime.errors import DifftimeError
from difftime.grids import check_grid, timesteps
from difftime.io import atomic_write_bytes, read_json_file
from difftime.sampling import SAMPLERS, check_sampler, dpmpp_2m
from difftime.sde import SDE
from difftime.testing import ExactGaussianEps

GRID_METHODS = ("gaussian", "gits")
# Samplers with a fixed number of network calls per step, for which a grid fixes the NFE.
CALLS_PER_STEP = {"euler": 1, "heun": 2, "ddim": 1, "dpm++2m": 1, "dpm++3m": 1, "ipndm": 1, "unipc": 1}
GRID_FORMAT = "difftime-grid/1"



@dataclass(frozen=True)
class TimeGrid:
    """An explicit grid ``ts`` (T = ts[0] > ... > ts[-1] = eps) for ``sampler`` at ``nfe`` network
    calls (Tweedie's step included when ``denoise``), and how it was found."""

    ts: tuple[float, ...]
    sampler: str
    nfe: int
    method: str
    denoise: bool = True
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def T(self) -> float:
        return self.ts[0]

    @property
    def eps(self) -> float:
        return self.ts[-1]

    def to_json(self) -> dict[str, Any]:
        return {"format": GRID_FORMAT, "T": self.T, "eps": self.eps, "nfe": self.nfe, "sampler": self.sampler,
                "denoise": self.denoise, "method": self.method, "ts": list(self.ts), "info": self.info}

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write the grid as JSON; an existing file is kept unless ``overwrite``."""
        path = Path(path)
        if path.suffix != ".json":
            raise DifftimeError(f"a grid file must end in .json, got {path}")
        if path.exists() and not overwrite:
            raise DifftimeError(f"{path} exists; choose another name or pass overwrite")
        atomic_write_bytes(path, (json.dumps(self.to_json(), indent=1) + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | Path, sde: SDE | None = None) -> TimeGrid:
        """A grid file written by :meth:`save`, checked (and against ``sde``'s horizon if given)."""
        data = read_json_file(path, "grid file")
        if data.get("format") != GRID_FORMAT:
            raise DifftimeError(f"{path} is not a difftime grid file (format {data.get('format')!r}, "
                                f"expected {GRID_FORMAT!r})")
        try:
            ts = tuple(float(t) for t in data["ts"])
            grid = cls(ts, str(data["sampler"]), int(data["nfe"]), str(data["method"]), bool(data["denoise"]),
                       dict(data.get("info", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise DifftimeError(f"{path}: malformed grid file ({exc!r})") from None
        check_sampler(grid.sampler)
        if sde is not None:
            check_grid(sde, ts)
        elif len(ts) < 2 or any(b >= a for a, b in zip(ts, ts[1:], strict=False)):
            raise DifftimeError(f"{path}: ts must be strictly decreasing, from T down to eps")
        return grid


def steps_for_nfe(sampler: str, nfe: int, denoise: bool = True) -> int:
    """The grid steps N that make ``sampler`` use exactly ``nfe`` network calls."""
    check_sampler(sampler)
    if sampler not in CALLS_PER_STEP:
        raise DifftimeError(f"{sampler} has no fixed calls per step; optimize a grid for one of "
                            f"{', '.join(CALLS_PER_STEP)}")
    calls = CALLS_PER_STEP[sampler]
    steps, rest = divmod(nfe - int(denoise), calls)
    if steps < 1 or rest:
        raise DifftimeError(f"{sampler} cannot use exactly {nfe} network calls "
                            f"({calls} per step{' plus the Tweedie step' if denoise else ''})")
    return steps


def _grid_from_logits(sde: SDE, T: float, eps: float, logits: Tensor) -> Tensor:
    """T, eps and the N log-SNR increments softmax([0, logits]) of lambda(eps) - lambda(T)."""
    lam_T, lam_eps = sde.log_snr(torch.tensor([T, eps], dtype=torch.float64)).tolist()
    w = torch.softmax(torch.cat([torch.zeros(1, dtype=torch.float64), logits]), 0)
    lam = lam_T + (lam_eps - lam_T) * torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(w, 0)])
    grid = sde.t_from_log_snr(lam)
    grid[0], grid[-1] = T, eps
    return grid


def gaussian_exact_map(sde: SDE, variances: Tensor, T: float, eps: float, denoise: bool = True) -> Tensor:
    """c*_k: the exact PF-ODE map x_T -> x_eps (then Tweedie's x0 if ``denoise``) of Gaussian data
    N(0, diag(variances)), per direction (module docstring)."""
    s2 = variances.double()
    m_T, v_T, m_e, v_e = (float(f(torch.tensor(t, dtype=torch.float64))) for t in (T, eps) for f in (sde.m, sde.v))
    c = torch.sqrt((m_e**2 * s2 + v_e) / (m_T**2 * s2 + v_T))
    return c * m_e * s2 / (m_e**2 * s2 + v_e) if denoise else c


def gaussian_grid_error(sde: SDE, ts: Tensor, sampler: str, variances: Tensor, denoise: bool = True,
                        **options: Any) -> float:
    """J of the module docstring: the relative mean squared error of ``sampler`` on ``ts`` for
    Gaussian data N(0, diag(variances)), exact (float64, one run on x_T = 1 per direction)."""
    grid = check_grid(sde, ts)
    s2 = variances.double()
    T, eps = float(grid[0]), float(grid[-1])
    model = ExactGaussianEps(sde, torch.zeros_like(s2), s2)
    c = SAMPLERS[sampler](model, sde, torch.ones(1, len(s2), dtype=torch.float64), grid, denoise=denoise,
                          **options).x[0]
    c_star = gaussian_exact_map(sde, s2, T, eps, denoise)
    m_T, v_T = float(sde.m(torch.tensor(T, dtype=torch.float64))), float(sde.v(torch.tensor(T, dtype=torch.float64)))
    w = m_T**2 * s2 + v_T
    return float(((c - c_star) ** 2 * w).sum() / (c_star**2 * w).sum())


def default_variances(sde: SDE, eps: float, k: int = 32) -> Tensor:
    """Log-uniform variances s^2 with s from sigma_tilde(eps) to 1: the SDE's coefficients alone."""
    lo = math.exp(-float(sde.log_snr(torch.tensor(eps, dtype=torch.float64))))
    return torch.logspace(math.log10(lo), 0.0, k, dtype=torch.float64) ** 2


def gaussian_grid(
    sde: SDE, T: float, eps: float, nfe: int, sampler: str, *, variances: Tensor | Sequence[float] | None = None,
    denoise: bool = True, max_evaluations: int = 4000,
) -> TimeGrid:
    """The model-free grid (module docstring): minimises J, the sampler's exact relative error on
    Gaussian data with ``variances`` (default :func:`default_variances`), over the N - 1 free log-SNR
    increments, from the uniform log-SNR grid. ``info`` holds J of both grids and the wall time."""
    from scipy.optimize import minimize

    steps = steps_for_nfe(sampler, nfe, denoise)
    T, eps = sde.check_horizon(T, eps)
    s2 = default_variances(sde, eps) if variances is None else torch.as_tensor(variances, dtype=torch.float64)
    if s2.dim() != 1 or len(s2) == 0 or not bool((s2 > 0).all()) or not bool(torch.isfinite(s2).all()):
        raise DifftimeError("variances must be a non-empty 1-D list of positive finite numbers")
    start = time.perf_counter()

    def objective(theta) -> float:
        grid = _grid_from_logits(sde, T, eps, torch.as_tensor(theta, dtype=torch.float64))
        if not bool((grid[1:] < grid[:-1]).all()):
            return math.inf
        return math.log(gaussian_grid_error(sde, grid, sampler, s2, denoise) + 1e-300)

    theta0 = torch.zeros(steps - 1, dtype=torch.float64)
    j0 = objective(theta0.numpy())
    theta = theta0.numpy()
    if steps > 1:
        res = minimize(objective, theta0.numpy(), method="Powell",
                       options={"maxfev": max_evaluations, "xtol": 1e-3, "ftol": 1e-6})
        if res.fun < j0:
            theta = res.x
    grid = _grid_from_logits(sde, T, eps, torch.as_tensor(theta, dtype=torch.float64))
    uniform = _grid_from_logits(sde, T, eps, theta0)
    info = {"error": gaussian_grid_error(sde, grid, sampler, s2, denoise),
            "error_logsnr": gaussian_grid_error(sde, uniform, sampler, s2, denoise), "variances": len(s2),
            "variances_source": "default" if variances is None else "given", "wall_s": time.perf_counter() - start}
    return TimeGrid(tuple(grid.tolist()), sampler, nfe, "gaussian", denoise, info)


class _NodeRecorder(nn.Module):
    """The network, recording (x, eps_hat) at every ``every``-th call: dpm++2m calls it once per grid
    node, in order (the Tweedie call at eps last), so call j is node j of its grid."""

    def __init__(self, model: nn.Module, every: int) -> None:
        super().__init__()
        self.model, self.every, self.calls = model, every, 0
        self.xs: list[Tensor] = []
        self.eps_hats: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        out = self.model(x, t)
        if self.calls % self.every == 0:
            self.xs.append(x.detach().double().flatten(1))
            self.eps_hats.append(out.detach().double().flatten(1))
        self.calls += 1
        return out


@dataclass(frozen=True)
class GitsTeacher:
    """The teacher of GITS at one (T, prior): its log-SNR ``nodes`` and the step ``cost`` between
    them. One teacher serves every sampler and budget (:meth:`grid`); building it is the only part
    that calls the network."""

    nodes: Tensor
    cost: Tensor
    info: dict[str, Any]

    def grid(self, sampler: str, nfe: int, denoise: bool = True) -> TimeGrid:
        """The least-cost grid of ``sampler`` at ``nfe`` network calls, by dynamic programming."""
        start = time.perf_counter()
        steps = steps_for_nfe(sampler, nfe, denoise)
        M = len(self.nodes) - 1
        if M < steps:
            raise DifftimeError(f"the teacher has {M} fine steps, fewer than the grid's {steps}; use more fine_steps")
        path, total = _least_cost_path(self.cost, steps)
        ts = self.nodes[path].clone()
        ts[0], ts[-1] = self.nodes[0], self.nodes[-1]
        info = {**self.info, "cost": total, "cost_logsnr": _path_cost(self.cost, _uniform_path(M, steps)),
                "wall_s": self.info["teacher_wall_s"] + time.perf_counter() - start}
        return TimeGrid(tuple(ts.tolist()), sampler, nfe, "gits", denoise, info)


@torch.no_grad()
def gits_teacher(
    model: nn.Module, sde: SDE, prior: Any, T: float, eps: float, *, n: int = 128, fine_steps: int = 48,
    substeps: int = 3, generator: torch.Generator | None = None, batch: int = 128, cost_order: int = 1,
) -> GitsTeacher:
    """GITS's teacher (module docstring): ``n`` trajectories from ``prior.sample`` at T on
    ``fine_steps`` + 1 log-SNR nodes (``substeps`` dpm++2m steps between nodes) and the cost of every
    coarse step between nodes.

    ``cost_order=2`` measures each step's error with the 2M step from the previous node instead of
    DDIM's (the dynamic programme then runs on pairs of nodes, still without network calls). On
    Gaussian data it gave worse grids for dpm++2m and unipc than GITS's first-order cost at NFE 4-6,
    so GITS's cost is the default."""
    if cost_order not in (1, 2):
        raise DifftimeError(f"cost_order must be 1 or 2, got {cost_order!r}")
    T, eps = sde.check_horizon(T, eps)
    if n < 1 or substeps < 1 or fine_steps < 1:
        raise DifftimeError("n, fine_steps and substeps must be >= 1")
    start = time.perf_counter()
    dense = timesteps(sde, T, eps, fine_steps * substeps, "logsnr")
    nodes = dense[::substeps]
    x_T = prior.sample(n, generator=generator)
    x_T = x_T.to(module_device(model, x_T.device))  # on the model's device
    xs, eps_hats = [], []
    for first in range(0, n, batch):
        recorder = _NodeRecorder(model, substeps)
        # lower_order_final off: the teacher is a fine solve, not a short run.
        dpmpp_2m(recorder, sde, x_T[first:first + batch], dense, lower_order_final=False)
        xs.append(torch.stack(recorder.xs, 1))
        eps_hats.append(torch.stack(recorder.eps_hats, 1))
    x, e = torch.cat(xs).cpu(), torch.cat(eps_hats).cpu()  # (n, M + 1, d), float64, with the nodes on the CPU
    lam, m, sigma = sde.log_snr(nodes), sde.m(nodes), sde.sigma(nodes)
    x0 = ((x - sigma[None, :, None] * e) / m[None, :, None]).float()
    cost = _step_costs(x.float(), x0, lam, m, sigma, cost_order)
    info = {"n": n, "fine_steps": fine_steps, "substeps": substeps, "teacher_nfe": n * (fine_steps * substeps + 1),
            "cost_order": cost_order, "teacher_wall_s": time.perf_counter() - start}
    return GitsTeacher(nodes, cost, info)


def gits_grid(
    model: nn.Module, sde: SDE, prior: Any, T: float, eps: float, nfe: int, sampler: str, *,
    denoise: bool = True, **teacher: Any,
) -> TimeGrid:
    """The model-based grid (GITS, module docstring): :func:`gits_teacher` (``teacher`` holds its
    options), then the least-cost grid for ``sampler`` at ``nfe``. ``info`` records the path's cost
    and the uniform log-SNR path's, the teacher's network calls and the wall time."""
    steps_for_nfe(sampler, nfe, denoise)  # a budget the sampler cannot spend fails before the teacher runs
    return gits_teacher(model, sde, prior, T, eps, **teacher).grid(sampler, nfe, denoise)


def _step_costs(x: Tensor, x0: Tensor, lam: Tensor, m: Tensor, sigma: Tensor, order: int) -> Tensor:
    """C[p, a, b]: the mean x/m error of one step a -> b from the teacher's x_a (order 1: DDIM; order
    2: the 2M step with the previous node p). Row p = a holds the order-1 cost, used for the first
    step; inf where the step is not a forward one."""
    M = x.shape[1] - 1
    cost = torch.full((M + 1, M + 1, M + 1), math.inf, dtype=torch.float64)
    for a in range(M):
        b = torch.arange(a + 1, M + 1)
        h = lam[b] - lam[a]
        phi1 = (m[b] * -torch.expm1(-h)).float()[None, :, None]
        base = (sigma[b] / sigma[a]).float()[None, :, None] * x[:, a:a + 1] + phi1 * x0[:, a:a + 1]
        scale = m[b].float()[None, :, None]
        cost[a, a, b] = ((base - x[:, b]) / scale).norm(dim=2).mean(0).double()
        if order < 2:  # the step does not depend on the previous node
            cost[:a, a, b] = cost[a, a, b]
            continue
        for p in range(a):
            r = ((lam[a] - lam[p]) / h).float()[None, :, None]
            d1 = (x0[:, a:a + 1] - x0[:, p:p + 1]) / r
            cost[p, a, b] = ((base + 0.5 * phi1 * d1 - x[:, b]) / scale).norm(dim=2).mean(0).double()
    return cost


def _least_cost_path(cost: Tensor, steps: int) -> tuple[list[int], float]:
    """The path 0 = i_0 < ... < i_steps = M of least total cost: the first step costs
    cost[0, 0, i_1], step k >= 1 costs cost[i_k-1, i_k, i_k+1] (dynamic programming on the pair of
    the last two nodes; with order-1 costs every row p of cost[:, a, b] is the same)."""
    M = cost.shape[0] - 1
    best = torch.full((M + 1, M + 1), math.inf, dtype=torch.float64)  # best[a, b]: path ending a -> b
    best[0] = cost[0, 0]
    back = []
    for _ in range(1, steps):
        totals = best[:, :, None] + cost  # (p, a, b)
        best, arg = totals.min(0)
        back.append(arg)
    a = int(best[:, M].argmin())
    total = float(best[a, M])
    path = [M, a]
    for arg in reversed(back):
        path.append(int(arg[path[-1], path[-2]]))
    path = path[::-1]
    if steps == 1:
        path = [0, M]
    return path, total


def _uniform_path(M: int, steps: int) -> list[int]:
    return [round(i * M / steps) for i in range(steps + 1)]


def _path_cost(cost: Tensor, path: list[int]) -> float:
    steps = zip([path[0], *path[:-2]], path[:-1], path[1:], strict=True)
    return float(sum(cost[p, a, b] for p, a, b in steps))


def to_diffusers(ts: Sequence[float] | Tensor, step_times: Tensor) -> dict[str, list]:
    """A grid snapped to a discrete DDPM schedule: the integer ``timesteps`` (descending) that
    diffusers' ``set_timesteps(timesteps=...)`` takes, and ``ts``, the continuous times of those
    steps, which difftime samples on to reproduce diffusers exactly. ``step_times[k]`` is the t whose
    m(t)^2 is alphas_cumprod[k] (``DDPMSchedule.step_times()``); each time goes to the nearest step."""
    grid = torch.as_tensor(ts, dtype=torch.float64)
    steps = torch.as_tensor(step_times, dtype=torch.float64)
    k = (grid[:, None] - steps[None, :]).abs().argmin(1)
    if not bool((k[1:] < k[:-1]).all()):
        raise DifftimeError("the grid has two times that snap to the same discrete step; use fewer steps or a "
                            "finer schedule")
    return {"timesteps": k.tolist(), "ts": steps[k].tolist()}
