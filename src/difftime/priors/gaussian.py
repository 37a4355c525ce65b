"""The moment-matched Gaussian: the KL-best Gaussian approximation of p_T, in closed form.

With x_T = m(T) x0 + sigma(T) z, the forward marginal has mean m E[x0] and covariance
m^2 Cov(x0) + v I. Among all Gaussians q, KL(p_T || q) is minimised by matching these two
moments, so this prior is the best any Gaussian can do and the natural base of the flows.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difftime.errors import DifftimeError
from difftime.priors.base import PriorModule, std_normal_log_prob
from difftime.sde import SDE

DEFAULT_MAX_FULL_DIM = 4096


def data_moments(x0: Tensor, diagonal: bool) -> tuple[Tensor, Tensor]:
    """Mean (d,) and covariance (d, d) (or variance (d,)) of x0 (N, ...) in float64."""
    if not isinstance(x0, Tensor) or x0.dim() < 2 or x0.shape[0] < 2:
        got = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
        raise DifftimeError(f"prior moments: got data of shape {got}; expected (N >= 2, *shape)")
    x = x0.reshape(x0.shape[0], -1).to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise DifftimeError("prior moments: the data holds NaN or Inf values; expected finite values")
    mean = x.mean(0)
    xc = x - mean
    n = x.shape[0]
    if diagonal:
        return mean, xc.pow(2).sum(0) / (n - 1)
    return mean, xc.T @ xc / (n - 1)


def marginal_moments_at(sde: SDE, T: float, mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """Moments of p_T from those of x0 (float64): (m mean, m^2 cov + v I)."""
    t = torch.tensor([float(T)], dtype=torch.float64)
    m = float(sde.m(t)[0])
    v = float(sde.v(t)[0])
    if cov.dim() == 1:
        return m * mean, m * m * cov + v
    return m * mean, m * m * cov + v * torch.eye(cov.shape[0], dtype=cov.dtype)


def safe_cholesky(cov: Tensor) -> Tensor:
    """Cholesky factor in float64, adding the smallest jitter that makes it succeed."""
    cov = 0.5 * (cov + cov.T)
    L, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return L
    scale = float(cov.diagonal().abs().mean()) or 1.0
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    for k in range(-12, 0):
        L, info = torch.linalg.cholesky_ex(cov + (10.0**k) * scale * eye)
        if int(info) == 0:
            return L
    raise DifftimeError("GaussianPrior: the covariance is not positive definite even with jitter")


class GaussianPrior(PriorModule):
    """N(mean, L L^T) with a full Cholesky factor, or N(mean, diag(std^2)) when ``diagonal``.

    Build it with :meth:`from_data` (moment matching to p_T) or :meth:`from_moments`; the
    constructor alone gives N(0, I) placeholders for ``load_prior`` to overwrite.

    ``from_data(sde, T, x0)`` takes (dequantized, model-space) data x0 of shape (N, *shape) and
    returns N(m E[x0], m^2 Cov(x0) + v I) at T, the KL-best Gaussian approximation of p_T: the
    auxiliary prior of the paper, https://arxiv.org/abs/2206.05173, in its simplest form.

    >>> import torch
    >>> from difftime.priors import GaussianPrior
    >>> from difftime.sde import VPSDE
    >>> z = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0))
    >>> x0 = 1.0 + 0.5 * (z - z.mean(0)) / z.std(0)        # mean exactly 1, variance exactly 0.25
    >>> prior = GaussianPrior.from_data(VPSDE(), 0.4, x0)   # m(0.4) = 0.442, v(0.4) = 0.804
    >>> prior
    GaussianPrior(T=0.4, shape=(2,), diagonal=False)
    >>> [round(v, 2) for v in prior.mean.tolist()], [round(v, 2) for v in prior.covariance().diagonal().tolist()]
    ([0.44, 0.44], [0.85, 0.85])
    >>> exact = GaussianPrior.from_moments((2,), 0.4, mean=torch.zeros(2), cov=torch.eye(2))
    >>> round(float(exact.log_prob(torch.zeros(1, 2))), 4)   # -ln(2 pi)
    -1.8379
    """

    family = "gaussian"
    mean: Tensor

    def __init__(self, shape: tuple[int, ...], T: float, diagonal: bool = False) -> None:
        super().__init__(shape, T)
        self.diagonal = bool(diagonal)
        self.register_buffer("mean", torch.zeros(self.d))
        if self.diagonal:
            self.register_buffer("std", torch.ones(self.d))
        else:
            self.register_buffer("scale_tril", torch.eye(self.d))

    # --- construction ------------------------------------------------------------------
    @classmethod
    def from_moments(
        cls, shape: tuple[int, ...], T: float, mean: Tensor, cov: Tensor, diagonal: bool | None = None
    ) -> GaussianPrior:
        """``cov`` is (d, d) or a variance vector (d,); a full cov with ``diagonal`` keeps its diagonal."""
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        if diagonal is None:
            diagonal = cov.dim() == 1
        prior = cls(shape, T, diagonal=diagonal)
        d = prior.d
        if mean.shape != (d,) or cov.shape not in ((d,), (d, d)):
            raise DifftimeError(
                f"GaussianPrior: mean {tuple(mean.shape)} / cov {tuple(cov.shape)} do not fit shape "
                f"{prior.shape}; expected ({d},) and ({d}, {d}) or ({d},)"
            )
        if not (bool(torch.isfinite(mean).all()) and bool(torch.isfinite(cov).all())):
            raise DifftimeError("GaussianPrior: the moments hold NaN or Inf values")
        prior.mean.copy_(mean.float())
        if diagonal:
            var = cov if cov.dim() == 1 else cov.diagonal()
            if not bool((var > 0).all()):
                raise DifftimeError("GaussianPrior: the variances must be positive")
            prior.std.copy_(var.sqrt().float())
        else:
            if cov.dim() == 1:
                cov = torch.diag(cov)
            prior.scale_tril.copy_(safe_cholesky(cov).float())
        return prior

    @classmethod
    def from_data(
        cls,
        sde: SDE,
        T: float,
        x0: Tensor,
        *,
        diagonal: bool | None = None,
        max_full_dim: int = DEFAULT_MAX_FULL_DIM,
    ) -> GaussianPrior:
        """Moment-match p_T given (dequantized, model-space) data x0 of shape (N, *shape).

        The covariance is full when d <= ``max_full_dim`` (unless ``diagonal`` says otherwise).
        """
        T, _ = sde.check_horizon(T)
        shape = tuple(x0.shape[1:])
        d = math.prod(shape)
        if diagonal is None:
            diagonal = d > int(max_full_dim)
        mean, cov = data_moments(x0, diagonal=bool(diagonal))
        mean_T, cov_T = marginal_moments_at(sde, T, mean, cov)
        return cls.from_moments(shape, T, mean_T, cov_T, diagonal=bool(diagonal))

    # --- the affine map x = mean + L u -------------------------------------------------
    def log_det_scale(self) -> Tensor:
        """log |det L| (a float64 scalar)."""
        if self.diagonal:
            return self.std.double().log().sum()
        return self.scale_tril.diagonal().double().log().sum()

    def whiten(self, x: Tensor) -> Tensor:
        """u = L^{-1} (x - mean) for flat x (B, d)."""
        xc = x - self.mean
        if self.diagonal:
            return xc / self.std
        return torch.linalg.solve_triangular(self.scale_tril, xc.T, upper=False).T

    def unwhiten(self, u: Tensor) -> Tensor:
        """x = mean + L u for flat u (B, d)."""
        if self.diagonal:
            return self.mean + u * self.std
        return self.mean + u @ self.scale_tril.T

    def covariance(self) -> Tensor:
        if self.diagonal:
            return torch.diag(self.std.pow(2))
        return self.scale_tril @ self.scale_tril.T

    # --- the prior interface -----------------------------------------------------------
    def log_prob(self, x: Tensor) -> Tensor:
        u = self.whiten(self._flat(x, self.mean.dtype))
        return (std_normal_log_prob(u) - self.log_det_scale().double()).to(u.dtype)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = self._noise(n, generator, like=self.mean)
        return self.unwhiten(z).reshape(int(n), *self.shape)

    def config(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "T": self.T, "diagonal": self.diagonal}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, diagonal={self.diagonal}"
