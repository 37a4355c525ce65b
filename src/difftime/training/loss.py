"""Denoising score matching on a free horizon [eps, T]: the time draw and the per-example loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difftime.sde import SDE


def sample_time(
    sde: SDE,
    n: int,
    T: float,
    eps: float,
    weighting: str,
    importance_sampling: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Draw t on [eps, T] and the per-example weight that makes the DSM loss unbiased.

    With ``weighting="standard"`` (lambda = v) the loss is ||eps_hat - z||^2 under uniform t.
    With ``weighting="likelihood"`` (lambda = g^2) the integrand is (g^2/v) ||eps_hat - z||^2;
    importance sampling draws t with density g^2/(v Z), leaving the constant weight Z.
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    if weighting == "likelihood" and importance_sampling:
        t = sde.importance_sample_t(u, T, eps)
        weight = torch.full_like(t, sde.importance_Z(T, eps))
    else:
        t = eps + (T - eps) * u
        weight = sde.g2(t) / sde.v(t) * (T - eps) if weighting == "likelihood" else torch.ones_like(t)
    return t.float(), weight.float()


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
