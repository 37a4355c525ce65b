"""Reverse-time samplers on [eps, T], k-diffusion style: small tensor-in, tensor-out functions.

Every sampler takes the start x_T (drawn from whatever prior the caller chose), the horizon
(T, eps) and a step count, integrates on the uniform grid T = t_0 > ... > t_N = eps with
dt = (T - eps) / N, ends with the Tweedie denoising step, and returns the samples together
with the exact number of network evaluations (NFE).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difftime.errors import DifftimeError
from difftime.sde import SDE, broadcast_to


def time_grid(T: float, eps: float, steps: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """N + 1 times from T down to eps; the step is (T - eps) / N, never 1 / N."""
    if steps < 1:
        raise DifftimeError(f"steps must be >= 1, got {steps}")
    return torch.linspace(T, eps, steps + 1, dtype=torch.float64).to(dtype)


def denoise(model: nn.Module, sde: SDE, x: Tensor, eps: float) -> Tensor:
    """Tweedie's step at t = eps: x0 = (x - sigma(eps) eps_hat) / m(eps)."""
    t = torch.full((len(x),), eps, dtype=x.dtype, device=x.device)
    eps_hat = model(x, t).to(x.dtype)
    return (x - broadcast_to(sde.sigma(t), x) * eps_hat) / broadcast_to(sde.m(t), x)


@torch.no_grad()
def euler_maruyama(
    model: nn.Module,
    sde: SDE,
    x_T: Tensor,
    T: float,
    eps: float,
    steps: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Euler-Maruyama on the reverse SDE dx = [f - g^2 s] dt + g dW, s = -eps_hat / sigma."""
    T, eps = sde.check_horizon(T, eps)
    ts = time_grid(T, eps, steps, x_T.dtype).to(x_T.device)
    x = x_T
    for i in range(steps):
        t = ts[i].expand(len(x))
        dt = ts[i] - ts[i + 1]
        eps_hat = model(x, t).to(x.dtype)
        g2 = broadcast_to(sde.g2(t), x)
        score_term = g2 * eps_hat / broadcast_to(sde.sigma(t), x)  # = -g^2 s
        x = x - (sde.drift(x, t) + score_term) * dt
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x = x + (g2 * dt).sqrt() * noise
    return denoise(model, sde, x, eps), steps + 1
