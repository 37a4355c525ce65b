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


def steps_for_horizon(T: float, steps_per_unit_time: float) -> int:
    """The paper's cost model: a step count proportional to T, so the NFE scales with T."""
    if not steps_per_unit_time > 0:
        raise DifftimeError(f"steps per unit time must be > 0, got {steps_per_unit_time}")
    return max(1, round(steps_per_unit_time * T))


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


def probability_flow_drift(model: nn.Module, sde: SDE, x: Tensor, t: Tensor) -> Tensor:
    """F(x, t) = f - g^2 s / 2 = alpha x + g^2 eps_hat / (2 sigma)."""
    eps_hat = model(x, t).to(x.dtype)
    return sde.drift(x, t) + broadcast_to(0.5 * sde.g2(t) / sde.sigma(t), x) * eps_hat


@torch.no_grad()
def ode_euler(
    model: nn.Module, sde: SDE, x_T: Tensor, T: float, eps: float, steps: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Fixed-step Euler on the probability-flow ODE (deterministic; ``generator`` is unused)."""
    T, eps = sde.check_horizon(T, eps)
    ts = time_grid(T, eps, steps, x_T.dtype).to(x_T.device)
    x = x_T
    for i in range(steps):
        x = x + (ts[i + 1] - ts[i]) * probability_flow_drift(model, sde, x, ts[i].expand(len(x)))
    return denoise(model, sde, x, eps), steps + 1


@torch.no_grad()
def ode_heun(
    model: nn.Module, sde: SDE, x_T: Tensor, T: float, eps: float, steps: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int]:
    """Heun's second-order method on the probability-flow ODE: 2 NFE per step."""
    T, eps = sde.check_horizon(T, eps)
    ts = time_grid(T, eps, steps, x_T.dtype).to(x_T.device)
    x = x_T
    for i in range(steps):
        h = ts[i + 1] - ts[i]
        d1 = probability_flow_drift(model, sde, x, ts[i].expand(len(x)))
        x_pred = x + h * d1
        d2 = probability_flow_drift(model, sde, x_pred, ts[i + 1].expand(len(x)))
        x = x + 0.5 * h * (d1 + d2)
    return denoise(model, sde, x, eps), 2 * steps + 1


@torch.no_grad()
def ode_dopri5(
    model: nn.Module, sde: SDE, x_T: Tensor, T: float, eps: float, steps: int | None = None,
    generator: torch.Generator | None = None, rtol: float = 1e-5, atol: float = 1e-5,
) -> tuple[Tensor, int]:
    """Adaptive Dormand-Prince (torchdiffeq) on the probability-flow ODE; ``steps`` is unused."""
    from torchdiffeq import odeint

    T, eps = sde.check_horizon(T, eps)
    nfe = 0

    def rhs(t: Tensor, x: Tensor) -> Tensor:
        nonlocal nfe
        nfe += 1
        return probability_flow_drift(model, sde, x, t.to(x.dtype).expand(len(x)))

    times = torch.tensor([T, eps], dtype=x_T.dtype, device=x_T.device)
    # step_t makes the solver land on eps instead of stepping past it to t < 0, where v(t) < 0.
    x = odeint(rhs, x_T, times, rtol=rtol, atol=atol, method="dopri5",
               options={"step_t": times[1:]})[-1]
    return denoise(model, sde, x, eps), nfe + 1


@torch.no_grad()
def predictor_corrector(
    model: nn.Module, sde: SDE, x_T: Tensor, T: float, eps: float, steps: int,
    generator: torch.Generator | None = None, snr: float = 0.16, corrector_steps: int = 1,
) -> tuple[Tensor, int]:
    """Reverse-diffusion predictor with a Langevin corrector (Song et al. 2021, Alg. 2-3).

    The predictor discretises the forward SDE with its exact kernel over each step,
    x_t = a x_s + sqrt(q) z, and reverses it: x_s = (2 - a) x_t + q s(x_t, t) + sqrt(q) z. This is
    ancestral DDPM sampling for VP and SMLD sampling for VE, on any grid. The corrector runs
    ``corrector_steps`` Langevin steps at signal-to-noise ratio ``snr`` before each predictor step.
    """
    T, eps = sde.check_horizon(T, eps)
    ts = time_grid(T, eps, steps, x_T.dtype).to(x_T.device)
    x = x_T

    def score(x: Tensor, t: Tensor) -> Tensor:
        return -model(x, t).to(x.dtype) / broadcast_to(sde.sigma(t), x)

    def randn() -> Tensor:
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)

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
    return denoise(model, sde, x, eps), steps * (corrector_steps + 1) + 1


SAMPLERS = {
    "em": euler_maruyama,
    "pc": predictor_corrector,
    "euler": ode_euler,
    "heun": ode_heun,
    "dopri5": ode_dopri5,
}
