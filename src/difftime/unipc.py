"""UniPC (Zhao et al. 2023), the unified predictor-corrector, data prediction, B(h) = e^h - 1 ("bh2").

Notation as in :mod:`difftime.sampling`: lambda = log(m/sigma), x0_hat(x, t) = (x - sigma eps_hat)/m,
step s -> t with h = lambda_t - lambda_s > 0. With the last stored x0_hats m_0 (at s), m_1, ... at
lambda_{s-1}, ... and r_k = (lambda_{s-k} - lambda_s)/h (negative), the differences are
D_k = (m_k - m_0)/r_k.

UniP of order p (predictor), with phi_1 = 1 - e^{-h} and B(h) = e^{-h} - 1 = -phi_1:

    x_t = (sigma_t/sigma_s) x_s + m_t phi_1 m_0 - m_t B(h) sum_{k<p} rho_k D_k,

where rho solves R rho = b on the first p - 1 rows: R_{ik} = r_k^{i-1} (with r_p = 1) and
b_i = i! psi_i(-h)/B(h), psi_1(u) = (e^u - 1)/u - 1, psi_{i+1}(u) = psi_i(u)/u - 1/(i+1)!. At p = 2
the reference code fixes rho = 1/2, which makes UniP-2 exactly DPM-Solver++(2M).

UniC (corrector) of order p: once the network has been called at the predicted x_t (the call the
next step needs anyway), the step s -> t is taken again with that output m_t as one more node,
D_t = m_t - m_0 at r = 1:

    x_t^c = (sigma_t/sigma_s) x_s + m_t phi_1 m_0 - m_t B(h) (sum_{k<p} rho^c_k D_k + rho^c_p D_t),

with rho^c solving the full p x p system (rho^c = 1/2 at p = 1). The order rises by one at no extra
network call; the network output used at t stays the one at the uncorrected x_t. The last step
(with ``denoise``, Tweedie's step to sigma = 0) is not corrected, so the NFE equals the steps.

Orders: warm-up min(order, i + 1) at step i; with ``lower_order_final`` (diffusers' default) step i
of a run of ``total`` steps has order at most total - i, whatever the run's length. The Tweedie step
counts as the last step, so ``denoise=True`` is diffusers' ``final_sigmas_type="zero"``.

Coefficients are computed in float64 and applied as Python floats. Reference: UniPC,
https://arxiv.org/abs/2302.04867; diffusers' ``UniPCMultistepScheduler`` (``predict_x0=True``,
``solver_type="bh2"``) computes the same steps, which ``tests/test_solvers.py`` checks in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from difftime.sde import SDE


def unipc_weights(h: float, rks: list[float], order: int, corrector: bool) -> list[float]:
    """rho of UniP (``corrector=False``: the p - 1 weights of D_1..D_{p-1}) or UniC (p weights, the
    last for D_t) for order p = ``order`` with the step h > 0 and the earlier r_k in ``rks``."""
    hh = -h
    b_h = math.expm1(hh)
    psi = b_h / hh - 1
    factorial = 1
    b = []
    for i in range(1, order + 1):
        b.append(psi * factorial / b_h)
        factorial *= i + 1
        psi = psi / hh - 1 / factorial
    nodes = [*rks, 1.0]
    R = [[r ** (i - 1) for r in nodes] for i in range(1, order + 1)]
    if corrector:
        if order == 1:
            return [0.5]
        return torch.linalg.solve(torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()
    if order == 1:
        return []
    if order == 2:
        return [0.5]
    A = torch.tensor([row[:-1] for row in R[:-1]], dtype=torch.float64)
    return torch.linalg.solve(A, torch.tensor(b[:-1], dtype=torch.float64)).tolist()


def unipc_steps(
    model: nn.Module, sde: SDE, x_T: Tensor, grid: Tensor, *, order: int, denoise: bool,
    lower_order_final: bool, corrector: bool,
) -> Tensor:
    """UniPC-``order`` (bh2) on the checked float64 ``grid``: x at grid[-1] = eps, before any
    Tweedie step (the caller adds it). One network call per grid step."""
    steps = len(grid) - 1
    lam = sde.log_snr(grid).tolist()
    m = sde.m(grid).tolist()
    sigma = sde.sigma(grid).tolist()
    total = steps + int(denoise)
    x = x_T
    x0s: list[Tensor] = []  # the last x0_hats, newest last
    prev_x, prev_order = x, 0
    for i in range(steps):
        t = torch.full((len(x),), float(grid[i]), dtype=x.dtype, device=x.device)
        x0 = (x - sigma[i] * model(x, t).to(x.dtype)) / m[i]
        if corrector and i > 0:
            x = _update(prev_x, x0s, lam, m, sigma, i - 1, prev_order, new=x0)
        x0s = [*x0s[-(order - 1):], x0] if order > 1 else [x0]
        k = min(order, i + 1)
        if lower_order_final:
            k = min(k, total - i)
        prev_x, prev_order = x, k
        x = _update(x, x0s, lam, m, sigma, i, k, new=None)
    return x


def _update(
    x: Tensor, x0s: list[Tensor], lam: list[float], m: list[float], sigma: list[float], i: int, order: int,
    new: Tensor | None,
) -> Tensor:
    """The step grid[i] -> grid[i + 1] from x at grid[i]: UniP if ``new`` is None, else UniC with
    ``new`` = x0_hat at grid[i + 1]; x0s[-1] is x0_hat at grid[i], earlier entries at grid[i-1], ..."""
    h = lam[i + 1] - lam[i]
    m0 = x0s[-1]
    rks = [(lam[i - k] - lam[i]) / h for k in range(1, order)]
    diffs = [(x0s[-1 - k] - m0) * (1 / r) for k, r in zip(range(1, order), rks, strict=True)]
    rhos = unipc_weights(h, rks, order, corrector=new is not None)
    b_h = math.expm1(-h)  # B(h) = e^{-h} - 1 = -phi_1
    out = x * (sigma[i + 1] / sigma[i]) - m0 * (m[i + 1] * b_h)
    for rho, d in zip(rhos, diffs, strict=False):
        out = out - d * (m[i + 1] * b_h * rho)
    if new is not None:
        out = out - (new - m0) * (m[i + 1] * b_h * rhos[-1])
    return out
