"""Likelihoods: the ELBO split into its terms, and exact log-densities through the PF-ODE.

All log-likelihoods are in nats per example, for x in model space. ``bits_per_dim`` turns them
into bits/dim of the original discrete data using the dequantization facts the scaler recorded.
Every estimator here runs in float32 with autocast switched off, also inside a caller's bf16
autocast (training's mixed precision never reaches a likelihood).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from difftime.sde import SDE

F = TypeVar("F", bound=Callable)


def full_precision(fn: F) -> F:
    """Run ``fn`` with CPU and CUDA autocast disabled, so a caller's bf16 region cannot lower its precision."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
                stack.enter_context(torch.autocast(device, enabled=False))
            return fn(*args, **kwargs)

    return run  # type: ignore[return-value]


def bits_per_dim(log_likelihood_nats: Tensor | float, d: int, levels: int | None, a: float) -> Tensor | float:
    """bpd = -log p_x(x) / (d ln 2) - log2(a) + log2(L) for dequantized data x = a (k + u)/L + b.

    For continuous data (``levels`` None) this is -log p / (d ln 2): bits per dimension of x itself.
    """
    bpd = -log_likelihood_nats / (d * math.log(2))
    if levels is not None:
        bpd = bpd - math.log2(a) + math.log2(levels)
    return bpd


@dataclass
class ElboTerms:
    """Per-example estimates (shape (B,)), in nats; ``*_se`` are Monte Carlo standard errors.

    total = prior - score + constant, where
      prior    = E_z log nu(x_T)                                        (P)
      score    = 1/2 int_eps^T (g^2/v) E||eps_hat(x_t, t) - z||^2 dt    (I)
      constant = d/2 ln(v(T) / v(eps))                                  (R)
    """

    prior: Tensor
    score: Tensor
    constant: Tensor
    total: Tensor
    prior_se: Tensor
    score_se: Tensor
    total_se: Tensor


@full_precision
def elbo(
    model: nn.Module,
    sde: SDE,
    x: Tensor,
    T: float,
    prior,
    eps: float | None = None,
    n_t: int = 64,
    n_prior: int = 8,
    chunk: int = 4096,
    generator: torch.Generator | None = None,
) -> ElboTerms:
    """Estimate the ELBO of each example of ``x`` and its three terms.

    The score term is estimated in the stable form: with t drawn with density g^2/(v Z) and
    one z per t, (Z/2) (||eps_hat - z||^2 - d) has the same mean as I - dZ/2 but no part that
    diverges as eps -> 0; the deterministic dZ/2 is added back exactly. ``n_t`` (t, z) pairs per
    example estimate it, ``n_prior`` draws of x_T estimate P; ``chunk`` bounds the network batch.
    """
    T, eps = sde.check_horizon(T, eps)
    B = len(x)
    d = x[0].numel()
    dtype = x.dtype
    Z = sde.importance_Z(T, eps)

    # Prior term: E_z log nu(m(T) x + sigma(T) z).
    reps = x.repeat_interleave(n_prior, dim=0)
    tT = torch.full((len(reps),), T, dtype=dtype, device=x.device)
    logs = []
    for start in range(0, len(reps), chunk):
        xT, _ = sde.marginal_sample(reps[start:start + chunk], tT[start:start + chunk], generator)
        logs.append(prior.log_prob(xT).to(torch.float64))
    prior_draws = torch.cat(logs).reshape(B, n_prior)

    # Score term, importance-sampled in t.
    reps = x.repeat_interleave(n_t, dim=0)
    u = torch.rand(len(reps), generator=generator, dtype=torch.float64, device=x.device)
    t = sde.importance_sample_t(u, T, eps).to(dtype)
    excess = []
    with torch.no_grad():
        for start in range(0, len(reps), chunk):
            x0, tt = reps[start:start + chunk], t[start:start + chunk]
            xt, z = sde.marginal_sample(x0, tt, generator)
            eps_hat = model(xt, tt).to(z.dtype)
            excess.append(((eps_hat - z).pow(2).flatten(1).sum(1) - d).to(torch.float64))
    score_draws = 0.5 * Z * torch.cat(excess).reshape(B, n_t)

    prior_term = prior_draws.mean(1)
    stable_score = score_draws.mean(1)
    score = stable_score + 0.5 * d * Z
    v = sde.v(torch.tensor([eps, T], dtype=torch.float64))
    constant = torch.full_like(prior_term, 0.5 * d * math.log(v[1] / v[0]))
    total = prior_term - score + constant

    def se(draws: Tensor) -> Tensor:
        return draws.std(1, correction=1) / math.sqrt(draws.shape[1]) if draws.shape[1] > 1 \
            else torch.full((B,), math.nan, dtype=torch.float64)

    prior_se, score_se = se(prior_draws), se(score_draws)
    return ElboTerms(prior=prior_term, score=score, constant=constant, total=total,
                     prior_se=prior_se, score_se=score_se,
                     total_se=(prior_se**2 + score_se**2).sqrt())


def _divergence_exact(f: Tensor, x: Tensor) -> Tensor:
    flat_f = f.flatten(1)
    div = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    for i in range(flat_f.shape[1]):
        grad = torch.autograd.grad(flat_f[:, i].sum(), x, retain_graph=True)[0]
        div = div + grad.flatten(1)[:, i]
    return div


@full_precision
def ode_flow(
    model: nn.Module,
    sde: SDE,
    x: Tensor,
    T: float,
    eps: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: str = "auto",
    noise: str = "rademacher",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, int]:
    """Solve the PF-ODE from x = x_eps up to T: returns (x_T, int_eps^T div F(x_t, t) dt, NFE).

    The solve does not involve the prior, so one solve serves every prior at T: log p_eps(x) =
    log nu(x_T) + the integral. ``divergence`` is "exact" (d autograd passes per evaluation),
    "hutchinson" (one pass with a probe vector that stays fixed for the whole solve, so the
    integral is one unbiased estimate), or "auto" (exact up to d = 16).
    """
    from torchdiffeq import odeint

    from difftime.sampling import probability_flow_drift

    T, eps = sde.check_horizon(T, eps)
    d = x[0].numel()
    if divergence == "auto":
        divergence = "exact" if d <= 16 else "hutchinson"
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact', 'hutchinson' or 'auto', got {divergence!r}")
    if divergence == "hutchinson":
        if noise == "rademacher":
            probe = torch.randint(0, 2, x.shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1
        elif noise == "gaussian":
            probe = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        else:
            raise ValueError(f"noise must be 'rademacher' or 'gaussian', got {noise!r}")
    nfe = 0

    def rhs(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        nonlocal nfe
        nfe += 1
        xt = state[0].detach().requires_grad_(True)
        with torch.enable_grad():
            f = probability_flow_drift(model, sde, xt, t.to(x.dtype).expand(len(xt)))
            if divergence == "exact":
                div = _divergence_exact(f, xt)
            else:
                vjp = torch.autograd.grad(f, xt, probe)[0]
                div = (vjp * probe).flatten(1).sum(1)
        return f.detach(), div.detach()

    times = torch.tensor([eps, T], dtype=x.dtype, device=x.device)
    zero = torch.zeros(len(x), dtype=x.dtype, device=x.device)
    # step_t stops the solver from stepping past T (outside the trained horizon) and interpolating.
    xs, divs = odeint(rhs, (x, zero), times, rtol=rtol, atol=atol, method="dopri5",
                      options={"step_t": times[1:]})
    return xs[-1], divs[-1], nfe


@full_precision
def ode_log_likelihood(
    model: nn.Module,
    sde: SDE,
    x: Tensor,
    T: float,
    prior,
    eps: float | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: str = "auto",
    noise: str = "rademacher",
    generator: torch.Generator | None = None,
) -> tuple[Tensor, int, Tensor]:
    """log p_eps(x) = log nu(x_T) + int_eps^T div F(x_t, t) dt; returns (log p (B,), NFE, x_T).

    See ``ode_flow`` for the solve and the divergence estimators.
    """
    x_T, integral, nfe = ode_flow(model, sde, x, T, eps, rtol=rtol, atol=atol, divergence=divergence, noise=noise,
                                  generator=generator)
    return prior.log_prob(x_T).to(integral.dtype) + integral, nfe, x_T
