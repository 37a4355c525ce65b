"""The SDE's baseline prior N(0, std^2 I) (std = 1 for VP and sub-VP, sqrt(v(T)) for VE)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from difftime.errors import DifftimeError
from difftime.priors.base import LOG_2PI, PriorModule
from difftime.sde import SDE


class StandardPrior(PriorModule):
    """N(0, std^2 I): what a diffusion model trained to T = T_max normally samples from.

    ``StandardPrior(shape, T, std=1.0)``; :meth:`for_sde` takes std from the SDE's baseline at T
    (1 for VP and sub-VP, sqrt(v(T)) for VE; score SDE, https://arxiv.org/abs/2011.13456). It has no
    parameters to fit.

    >>> import torch
    >>> from difftime.priors import StandardPrior
    >>> from difftime.sde import VESDE
    >>> prior = StandardPrior((2,), T=1.0)
    >>> round(float(prior.log_prob(torch.zeros(1, 2))), 4)   # -ln(2 pi)
    -1.8379
    >>> tuple(prior.sample(3, generator=torch.Generator().manual_seed(0)).shape)
    (3, 2)
    >>> StandardPrior.for_sde(VESDE(), 1.0, (2,)).std == VESDE().prior_std(1.0)
    True
    """

    family = "standard"

    def __init__(self, shape: tuple[int, ...], T: float, std: float = 1.0) -> None:
        super().__init__(shape, T)
        std = float(std)
        if not (math.isfinite(std) and std > 0):
            raise DifftimeError(f"StandardPrior: std={std!r} is invalid; expected a positive number")
        self.std = std

    @classmethod
    def for_sde(cls, sde: SDE, T: float, shape: tuple[int, ...]) -> StandardPrior:
        T, _ = sde.check_horizon(T)
        return cls(shape, T, sde.prior_std(T))

    def log_prob(self, x: Tensor) -> Tensor:
        x = self._flat(x)
        if not x.is_floating_point():
            x = x.float()
        sq = x.pow(2).sum(1)
        return -0.5 * sq / self.std**2 - self.d * (math.log(self.std) + 0.5 * LOG_2PI)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return (self.std * self._noise(n, generator)).reshape(int(n), *self.shape)

    def config(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "T": self.T, "std": self.std}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, std={self.std:g}"
