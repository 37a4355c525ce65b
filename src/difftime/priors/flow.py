"""A zuko normalizing flow on whitened coordinates, based at the moment-matched Gaussian.

The flow acts on u = L^{-1} (x - mean), where (mean, L) is the GaussianPrior fitted to p_T,
so that log nu(x) = log q(u) - log |det L| with q the flow's density. The last layer of every
hyper-network starts at zero, which makes each transform the identity: at initialisation
the flow *is* the Gaussian base, and training can only move away from it by improving the fit.
"""

from __future__ import annotations

from typing import Any

import torch
import zuko
from torch import Tensor, nn

from difftime.errors import DifftimeError
from difftime.priors.base import Prior, std_normal_log_prob
from difftime.priors.gaussian import DEFAULT_MAX_FULL_DIM, GaussianPrior
from difftime.sde import SDE

FLOW_KINDS = ("maf", "nsf", "realnvp")


def _zero_last_layers(flow: zuko.flows.Flow) -> None:
    """Make every transform of a zuko flow the identity by zeroing its hyper-network output."""
    for transform in flow.transform.transforms:
        hyper = getattr(transform, "hyper", None)
        if hyper is not None:
            last = [m for m in hyper.modules() if isinstance(m, nn.Linear)][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        for p in getattr(transform, "phi", ()):  # element-wise transforms (d = 1)
            nn.init.zeros_(p)


class FlowPrior(Prior):
    """A MAF, neural spline flow or RealNVP on flattened, whitened data."""

    family = "flow"

    def __init__(
        self,
        shape: tuple[int, ...],
        T: float,
        flow: str = "maf",
        transforms: int = 3,
        hidden: tuple[int, ...] | list[int] = (128, 128),
        bins: int = 8,
        diagonal: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(shape, T)
        if flow not in FLOW_KINDS:
            raise DifftimeError(f"FlowPrior: flow={flow!r} is unknown; expected one of {', '.join(FLOW_KINDS)}")
        hidden = tuple(int(h) for h in hidden)
        if int(transforms) < 1 or not hidden or min(hidden) < 1 or int(bins) < 2:
            raise DifftimeError(
                f"FlowPrior: transforms={transforms}, hidden={list(hidden)}, bins={bins} are invalid; "
                "expected transforms >= 1, non-empty positive hidden sizes, bins >= 2"
            )
        self.kind = flow
        self.transforms = int(transforms)
        self.hidden = hidden
        self.bins = int(bins)
        self.seed = int(seed)
        self.base = GaussianPrior(shape, T, diagonal=diagonal)
        # A private RNG stream: the same config always builds the same network.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            kwargs: dict[str, Any] = {"transforms": self.transforms, "hidden_features": hidden}
            if flow == "maf":
                self.flow = zuko.flows.MAF(self.d, **kwargs)
            elif flow == "nsf":
                self.flow = zuko.flows.NSF(self.d, bins=self.bins, **kwargs)
            else:
                self.flow = zuko.flows.RealNVP(self.d, **kwargs)
        _zero_last_layers(self.flow)

    @classmethod
    def from_data(
        cls,
        sde: SDE,
        T: float,
        x0: Tensor,
        *,
        diagonal: bool | None = None,
        max_full_dim: int = DEFAULT_MAX_FULL_DIM,
        **options: Any,
    ) -> FlowPrior:
        """A flow whose base is ``GaussianPrior.from_data(sde, T, x0)``; options go to the constructor."""
        base = GaussianPrior.from_data(sde, T, x0, diagonal=diagonal, max_full_dim=max_full_dim)
        prior = cls(base.shape, base.T, diagonal=base.diagonal, **options)
        prior.base.load_state_dict(base.state_dict())
        return prior

    def log_prob(self, x: Tensor) -> Tensor:
        u = self.base.whiten(self._flat(x, self.base.mean.dtype))
        z, ladj = self.flow.transform().call_and_ladj(u)
        return std_normal_log_prob(z) + ladj - self.base.log_det_scale()

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = self._noise(n, generator, like=self.base.mean)
        u = self.flow.transform().inv(z)
        return self.base.unwhiten(u).reshape(int(n), *self.shape)

    def config(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "T": self.T,
            "flow": self.kind,
            "transforms": self.transforms,
            "hidden": list(self.hidden),
            "bins": self.bins,
            "diagonal": self.base.diagonal,
            "seed": self.seed,
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, flow={self.kind}, transforms={self.transforms}, hidden={list(self.hidden)}"
