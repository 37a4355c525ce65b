"""Denoising score matching on a free horizon [eps, T]: the time draw and the per-example loss.

The loss of one example is w(t) ||eps_hat(x_t, t) - z||^2 (averaged over dimensions) with t
drawn from a distribution p(t) on [eps, T]. Writing lambda(t) = log(m/s) for the SDE's
log-SNR (half the usual log of m^2/s^2), the choices are:

- ``t_distribution``: "uniform" on [eps, T], or "log-snr-normal": lambda ~ N(mean, std)
  truncated to [lambda(T), lambda(eps)] by inverse CDF, so the draw stays on the horizon. EDM's
  ln sigma ~ N(-1.2, 1.2) is lambda ~ N(1.2, 1.2), since sigma = s/m = exp(-lambda).
- ``weighting``: "standard" (w = 1, Ho et al.'s eps loss); "likelihood" (w = g^2/v, the
  ELBO's weight, with t uniform or importance-sampled from g^2/(v Z)); "min-snr" (w =
  min(SNR, gamma)/SNR with SNR = exp(2 lambda), Hang et al. 2023, written for eps); "edm"
  (w = 1 + exp(-2 lambda)/sigma_data^2, which is unit weight on the EDM-preconditioned
  network's own target, Karras et al. 2022).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from difftime.config import T_DISTRIBUTIONS, WEIGHTINGS
from difftime.rng import rand_on
from difftime.sde import SDE


def truncated_normal_log_snr(sde: SDE, u: Tensor, T: float, eps: float, mean: float, std: float) -> Tensor:
    """Map u ~ U[0, 1) to t on [eps, T] whose log-SNR is N(mean, std) truncated to the horizon."""
    u = u.to(torch.float64)
    ends = sde.log_snr(torch.tensor([T, eps], dtype=torch.float64))
    cdf = torch.special.ndtr((ends - mean) / std)
    p = (cdf[0] + u * (cdf[1] - cdf[0])).clamp(1e-300, 1 - 1e-16)
    lam = (mean + std * torch.special.ndtri(p)).clamp(ends[0], ends[1])
    return sde.t_from_log_snr(lam).clamp(eps, T)


def sample_time(
    sde: SDE,
    n: int,
    T: float,
    eps: float,
    weighting: str,
    importance_sampling: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    *,
    t_distribution: str = "uniform",
    log_snr_mean: float = 1.2,
    log_snr_std: float = 1.2,
    min_snr_gamma: float = 5.0,
    sigma_data: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Draw t on [eps, T] and the per-example weight w(t) of the DSM loss (see the module docstring).

    With ``weighting="likelihood"`` and uniform t the weight is (g^2/v)(T - eps), an unbiased
    estimate of the ELBO's integral; importance sampling draws t with density g^2/(v Z) instead,
    leaving the constant weight Z. Likelihood weighting needs ``t_distribution="uniform"``. t and
    w are computed where ``generator`` draws (the CPU, difftime.rng's rule) and returned on ``device``.

    >>> import torch
    >>> from difftime.sde import VPSDE
    >>> from difftime.training.loss import sample_time
    >>> sde = VPSDE()
    >>> t, w = sample_time(sde, 4, 0.4, 1e-5, "standard", False, torch.Generator().manual_seed(0))
    >>> tuple(t.shape), bool(((t >= 1e-5) & (t <= 0.4)).all()), w.tolist()
    ((4,), True, [1.0, 1.0, 1.0, 1.0])
    >>> t, w = sample_time(sde, 4, 0.4, 1e-5, "likelihood", True, torch.Generator().manual_seed(0))
    >>> bool(torch.allclose(w, torch.full((4,), sde.importance_Z(0.4, 1e-5))))   # the constant weight Z
    True
    """
    t, weight = _time_and_weight(sde, rand_on(n, generator, dtype=torch.float64), T, eps, weighting,
                                 importance_sampling, t_distribution, log_snr_mean, log_snr_std, min_snr_gamma,
                                 sigma_data)
    return t.float().to(device), weight.float().to(device)


def _time_and_weight(sde: SDE, u: Tensor, T: float, eps: float, weighting: str, importance_sampling: bool,
                     t_distribution: str, log_snr_mean: float, log_snr_std: float, min_snr_gamma: float,
                     sigma_data: float) -> tuple[Tensor, Tensor]:
    """(t, w) of ``sample_time`` from its uniforms u, in float64 on u's device."""
    if weighting == "likelihood":
        if t_distribution != "uniform":
            raise ValueError("likelihood weighting draws t uniformly or by importance sampling")
        if importance_sampling:
            t = sde.importance_sample_t(u, T, eps)
            return t, torch.full_like(t, sde.importance_Z(T, eps))
        t = eps + (T - eps) * u
        return t, sde.g2(t) / sde.v(t) * (T - eps)
    if t_distribution == "uniform":
        t = eps + (T - eps) * u
    elif t_distribution == "log-snr-normal":
        t = truncated_normal_log_snr(sde, u, T, eps, log_snr_mean, log_snr_std)
    else:
        raise ValueError(f"unknown t_distribution {t_distribution!r}; expected one of {T_DISTRIBUTIONS}")
    if weighting == "standard":
        weight = torch.ones_like(t)
    elif weighting == "min-snr":
        snr = torch.exp(2 * sde.log_snr(t))
        weight = snr.clamp(max=min_snr_gamma) / snr
    elif weighting == "edm":
        weight = 1 + torch.exp(-2 * sde.log_snr(t)) / sigma_data**2
    else:
        raise ValueError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}")
    return t, weight


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """The learning-rate multiplier of ``step`` (0-based): linear warm-up over ``warmup`` steps, then
    constant, or a cosine from 1 to 0 at ``steps`` (Loshchilov and Hutter 2017)."""
    ramp = min(1.0, (step + 1) / max(1, warmup))
    if schedule == "constant":
        return ramp
    if schedule == "cosine":
        progress = min(1.0, max(0, step + 1 - warmup) / max(1, steps - warmup + 1))
        return ramp * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; expected constant or cosine")


def dsm_loss(
    model: nn.Module,
    sde: SDE,
    x0: Tensor,
    t: Tensor,
    weight: Tensor,
    generator: torch.Generator | None = None,
    z: Tensor | None = None,
) -> Tensor:
    """Per-example weighted eps-matching loss, averaged over dimensions; shape (B,).

    The noise ``z`` is drawn from ``generator`` unless given.
    """
    xt, z = sde.marginal_sample(x0, t, generator, z)
    eps_hat = model(xt, t).float()
    return weight * (eps_hat - z).pow(2).flatten(1).mean(1)
