"""Test oracles: closed forms for Gaussian data N(mu, diag(lam)), the exact eps-network and marginals
(docs/design.md §3).

They are the ground truth that the samplers, the ELBO and the likelihood are checked against; the
tests use them, the package itself does not.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difftime.sde import SDE, broadcast_to


def gaussian_log_density(x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """log N(x; mean, diag(var)), summed over all but the first dimension."""
    x = x.flatten(1)
    return -0.5 * ((x - mean) ** 2 / var + torch.log(2 * torch.pi * var)).sum(1)


def marginal_moments(sde: SDE, mu: Tensor, lam: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """p_t = N(m(t) mu, diag(m(t)^2 lam + v(t))); returns (mean, variance), each (B, d)."""
    m = sde.m(t)[:, None]
    return m * mu[None], m**2 * lam[None] + sde.v(t)[:, None]


class ExactGaussianEps(nn.Module):
    """eps*(x, t) = sigma(t) (x - m(t) mu) / (m(t)^2 lam + v(t)), the optimal eps-prediction."""

    mu: Tensor
    lam: Tensor

    def __init__(self, sde: SDE, mu: Tensor, lam: Tensor, scale: float = 1.0) -> None:
        super().__init__()
        self.sde = sde
        self.scale = scale  # (1 + delta) in the score-gap identity of docs/design.md §3
        self.register_buffer("mu", mu.clone())
        self.register_buffer("lam", lam.clone())

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        t = t.to(self.mu.dtype)
        mean, var = marginal_moments(self.sde, self.mu, self.lam, t)
        eps = broadcast_to(self.sde.sigma(t), mean) * (x.flatten(1).to(mean.dtype) - mean) / var
        return (self.scale * eps).to(x.dtype).reshape(x.shape)


class GaussianMarginal:
    """The exact p_T = N(m(T) mu, diag(m(T)^2 lam + v(T))) as a prior (log_prob / sample)."""

    def __init__(self, sde: SDE, mu: Tensor, lam: Tensor, T: float) -> None:
        t = torch.tensor([T], dtype=torch.float64)
        mean, var = marginal_moments(sde, mu.double(), lam.double(), t)
        self.mean, self.var = mean[0], var[0]

    def log_prob(self, x: Tensor) -> Tensor:
        return gaussian_log_density(x.to(self.mean.dtype), self.mean, self.var)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, len(self.mean), generator=generator, dtype=self.mean.dtype)
        return self.mean + self.var.sqrt() * z
