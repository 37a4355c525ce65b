"""The ODE engine of the PF-ODE likelihoods: embedded Runge-Kutta pairs (Bogacki-Shampine 3(2) and
Dormand-Prince 5(4)) with per-example or per-batch error control, and the options of a solve.

It knows nothing of SDEs or networks: ``solve_rk`` integrates any field dz/ds given as a function of
(s, z, rows). ``difftime.likelihood.ode_flow`` builds the PF-ODE field and its log-det on top.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

DIVERGENCES = ("exact", "hutchinson")
EXACT_DIVERGENCE_MAX_DIM = 16  # "auto" takes the exact trace up to this many dimensions
ERROR_CONTROLS = ("example", "batch")
MAX_STEPS = 100_000

# Embedded explicit Runge-Kutta pairs with the first-same-as-last property: nodes c, stage rows
# (the last row is the higher-order solution, evaluated as the last stage and reused as the next
# step's first), the higher-order weights minus the embedded ones, and the order that sets the
# step-size exponent. Bogacki-Shampine 3(2) costs 3 network calls a step, Dormand-Prince 5(4) 6.
_TABLEAUS: dict[str, tuple[tuple, tuple, tuple, int]] = {
    "bosh3": (
        (0.0, 1 / 2, 3 / 4, 1.0),
        ((), (1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
        (-5 / 72, 1 / 12, 1 / 9, -1 / 8),
        3,
    ),
    "dopri5": (
        (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        (
            (),
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
        ),
        (71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40),
        5,
    ),
}
ODE_METHODS = tuple(_TABLEAUS)


@dataclass(frozen=True)
class ODEOptions:
    """How a PF-ODE is solved, with the defaults of ``likelihood.ode_flow`` (see there for each):
    tolerances, the divergence estimator and its probes, the integration variable, the Runge-Kutta
    pair and the error control. ``kwargs()`` passes them on to ``ode_flow``.

    Other callers keep their own tolerance defaults: ``headroom`` 1e-4, the ``study.tol`` setting
    1e-4, ``evaluation.likelihood_across_T`` and ``difftime evaluate --tol`` 1e-5.
    """

    rtol: float = 1e-5
    atol: float = 1e-5
    divergence: str = "auto"
    noise: str = "rademacher"
    variable: str = "t"
    method: str = "bosh3"
    error_control: str = "example"
    n_probes: int = 1

    def kwargs(self) -> dict[str, Any]:
        return asdict(self)


def resolve_divergence(divergence: str, d: int) -> str:
    """The estimator ``divergence`` names in ``d`` dimensions: "auto" is "exact" up to
    ``EXACT_DIVERGENCE_MAX_DIM`` and "hutchinson" above; any other name is returned as it is."""
    if divergence == "auto":
        return "exact" if d <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"
    return divergence


def _tolerance_scale(old: Tensor, new: Tensor, rtol: float, atol: float) -> Tensor:
    """atol + rtol |y| for x, per element; for the log-det, a sum of d per-dimension terms,
    d atol + rtol |log-det|, so that both tolerances mean the same thing per dimension (bits/dim)."""
    scale = atol + rtol * torch.maximum(old.abs(), new.abs())
    scale[:, -1] += (old.shape[1] - 2) * atol
    return scale


def _error_norm(y: Tensor) -> Tensor:
    """Per row: max(RMS over x, |log-det|) of y measured in tolerance scales, in float64."""
    q = y.square()
    return torch.maximum(q[:, :-1].mean(1), q[:, -1]).sqrt().to(torch.float64)


def solve_rk(field: Callable, z0: Tensor, s0: float, stops: Tensor, rtol: float, atol: float,
             per_example: bool, method: str) -> tuple[Tensor, int]:
    """An embedded Runge-Kutta pair (``method``) from s0 through the increasing ``stops`` (float64)
    for each row of z0 (n, d + 1): x flattened, then the log-det.

    ``field(s, z, rows)`` returns dz/ds for the rows ``rows`` of the batch at their own s (float64).
    Each row has its own step size, accepts or rejects on its own error (``per_example``), lands
    exactly on every stop and leaves the batch after the last, so a network call only ever
    evaluates rows still running. With ``per_example`` False the batch shares one step, set by the
    worst row. Returns z at every stop (len(stops), n, d + 1) and the number of field calls.
    """
    nodes, stage_rows, error_row, order = _TABLEAUS[method]
    n_stages = len(nodes)
    n, width = z0.shape
    dtype = z0.dtype
    out = z0.new_empty((len(stops), n, width))
    rows = torch.arange(n, device=z0.device)
    s = torch.full((n,), float(s0), dtype=torch.float64, device=z0.device)
    nxt = torch.zeros(n, dtype=torch.long, device=z0.device)
    z = z0
    c = torch.tensor(nodes[1:], dtype=torch.float64, device=z0.device)[:, None]
    a_rows = [torch.tensor(row, dtype=dtype, device=z0.device) for row in stage_rows]
    e_row = torch.tensor(error_row, dtype=dtype, device=z0.device)

    # Initial step (Hairer, Norsett and Wanner, II.4), per row.
    k1 = field(s, z, rows)
    scale = _tolerance_scale(z, z, rtol, atol)
    d0, d1 = _error_norm(z / scale), _error_norm(k1 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    h0 = torch.minimum(h0, stops[0] - s)
    if not per_example:
        h0 = h0.min().expand(n)
    f1 = field(s + h0, z + h0[:, None].to(dtype) * k1, rows)
    d2 = _error_norm((f1 - k1) / scale) / h0
    dmax = torch.maximum(d1, d2)
    h1 = torch.where(dmax <= 1e-15, torch.clamp(h0 * 1e-3, min=1e-6), (0.01 / dmax) ** (1 / order))
    h = torch.minimum(100 * h0, h1)
    if not per_example:
        h = h.min().expand(n)
    nfe, steps = 2, 0
    span = float(stops[-1]) - float(s0)

    ks = z0.new_empty((n_stages, n, width))
    while len(rows):
        steps += 1
        if steps > MAX_STEPS:
            raise RuntimeError(f"PF-ODE solve did not finish in {MAX_STEPS} steps")
        stop = stops[nxt]
        lands = h >= stop - s
        h_step = torch.where(lands, stop - s, h)
        stage_s = s + c * h_step  # (stages - 1, n): every stage's s at once
        hc = h_step[:, None].to(dtype)
        ks = ks[:, :len(rows)]
        ks[0] = k1
        for i in range(1, n_stages):
            zi = z + hc * (a_rows[i] @ ks[:i].reshape(i, -1)).reshape(z.shape)
            ks[i] = field(stage_s[i - 1], zi, rows)
        nfe += n_stages - 1
        err = hc * (e_row @ ks.reshape(n_stages, -1)).reshape(z.shape)
        ratio = torch.nan_to_num(_error_norm(err / _tolerance_scale(z, zi, rtol, atol)), nan=math.inf)
        if not per_example:
            ratio = ratio.max().expand(len(rows))
        accept = ratio <= 1
        factor = (0.9 * ratio.pow(-1 / order)).clamp(0.2, 10.0)
        factor = torch.where(accept, factor.clamp(min=1.0), factor)
        h_new = h_step * factor
        reached = accept & lands
        h = torch.where(reached, torch.maximum(h_new, h), h_new)
        acc = accept[:, None]
        z = torch.where(acc, zi, z)
        k1 = torch.where(acc, ks[-1], ks[0])
        s = torch.where(accept, torch.where(lands, stop, s + h_step), s)
        if bool(reached.any()):
            out[nxt[reached], rows[reached]] = z[reached]
            nxt = nxt + reached.long()
            keep = nxt < len(stops)
            if not bool(keep.all()):
                rows, s, z, k1, h, nxt = rows[keep], s[keep], z[keep], k1[keep], h[keep], nxt[keep]
        if len(rows) and bool((h < 1e-13 * span).any()):
            raise RuntimeError("PF-ODE step size underflow: the drift or the divergence is not finite")
    return out, nfe
