"""A zuko normalizing flow on whitened coordinates, based at the moment-matched Gaussian.

The flow acts on u = R L^{-1} (x - mean), where (mean, L) is the GaussianPrior fitted to p_T
and R is an orthogonal rotation to PCA order (``rotation="pca"``, the default; "none" keeps the
Cholesky coordinates), so that log nu(x) = log q(u) - log |det L| with q the flow's density.
PCA order puts the few high-variance directions, where p_T departs from its Gaussian, first in
the autoregressive order (it fits better: measured in docs/design.md §7).

The last layer of every hyper-network starts at zero, which makes each transform the identity:
at initialisation the flow *is* the Gaussian base, and training moves away from it only where
that improves the fit.
"""

from __future__ import annotations

from typing import Any

import torch
import zuko
from torch import Tensor, nn

from difftime.errors import DifftimeError
from difftime.priors.base import PriorModule, std_normal_log_prob
from difftime.priors.gaussian import DEFAULT_MAX_FULL_DIM, GaussianPrior
from difftime.sde import SDE

FLOW_KINDS = ("maf", "nsf", "realnvp")
ROTATIONS = ("pca", "none")


def _zero_last_layers(flow: zuko.flows.Flow) -> None:
    """Make every transform of a zuko flow the identity by zeroing its hyper-network output."""
    for transform in flow.transform.transforms:
        hyper = getattr(transform, "hyper", None)
        if hyper is not None:
            # zuko's MLP/MaskedMLP are Sequentials ending in a (masked) linear layer.
            last = [m for m in hyper.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)][-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        for p in getattr(transform, "phi", ()):  # element-wise transforms (d = 1)
            nn.init.zeros_(p)


def whitening_rotation(scale_tril: Tensor, kind: str = "pca") -> Tensor:
    """The orthogonal R that turns Cholesky-whitened u = L^{-1} (x - mean) into PCA or ZCA coordinates.

    With Sigma = L L^T = V Lambda V^T (eigenvalues descending): "pca" gives R = Lambda^{-1/2} V^T L
    (coordinate 0 is the top principal component), "zca" gives R = V Lambda^{-1/2} V^T L, so that
    R u = Sigma^{-1/2} (x - mean) stays aligned with the pixels. |det R| = 1: densities are unchanged.
    """
    L = scale_tril.to(torch.float64)
    lam, V = torch.linalg.eigh(L @ L.T)
    lam, V = lam.flip(0), V.flip(1)
    R = (V / lam.clamp_min(1e-300).sqrt()).T @ L
    if kind == "zca":
        R = V @ R
    # Remove the rounding of eigh (R is orthogonal up to ~1e-12): the polar factor of R.
    U, _, Vh = torch.linalg.svd(R)
    return (U @ Vh).float()


class FlowPrior(PriorModule):
    """A MAF, neural spline flow or RealNVP (zuko) on flattened, whitened data.

    ``transforms`` flow layers with ``hidden`` sizes for each hyper-network; ``bins`` is used by
    "nsf" only. Build it with :meth:`from_data`; the constructor alone gives placeholders.

    ``flow`` is one of ``FLOW_KINDS`` ("maf", the default, "nsf" or "realnvp"), ``rotation`` "pca"
    or "none", ``diagonal`` the base's covariance and ``seed`` fixes the initial weights. Bad options
    raise DifftimeError. References: MAF, https://arxiv.org/abs/1705.07057; the auxiliary prior,
    https://arxiv.org/abs/2206.05173.

    >>> import torch
    >>> from difftime.priors import FlowPrior
    >>> from difftime.sde import VPSDE
    >>> x0 = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    >>> prior = FlowPrior.from_data(VPSDE(), 0.4, x0, transforms=1, hidden=(8,))
    >>> x = prior.sample(4, generator=torch.Generator().manual_seed(1))
    >>> bool(torch.allclose(prior.log_prob(x), prior.base.log_prob(x)))   # it starts as its Gaussian
    True
    """

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
        rotation: str = "pca",
        seed: int = 0,
    ) -> None:
        super().__init__(shape, T)
        if rotation not in ROTATIONS:
            raise DifftimeError(
                f"FlowPrior: rotation={rotation!r} is unknown; expected one of {', '.join(ROTATIONS)}"
            )
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
        # PCA rotation of the whitened coordinates (full base only): coordinate 0 is the top
        # principal component of p_T, where its non-Gaussian structure concentrates.
        self.rotation = "none" if diagonal else rotation
        if self.rotation == "pca":
            self.register_buffer("rotate", torch.eye(self.d))
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
        if prior.rotation == "pca":
            prior.rotate.copy_(whitening_rotation(base.scale_tril, "pca"))
        return prior

    def to_flow_coords(self, x: Tensor) -> Tensor:
        """Flat x (B, d) -> the flow's input u = R L^{-1} (x - mean)."""
        u = self.base.whiten(x)
        return u @ self.rotate.T if self.rotation == "pca" else u

    def from_flow_coords(self, u: Tensor) -> Tensor:
        if self.rotation == "pca":
            u = u @ self.rotate
        return self.base.unwhiten(u)

    def log_prob(self, x: Tensor) -> Tensor:
        u = self.to_flow_coords(self._flat(x, self.base.mean.dtype))
        z, ladj = self.flow.transform().call_and_ladj(u)
        return (std_normal_log_prob(z) + ladj.double() - self.base.log_det_scale()).to(z.dtype)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = self._noise(n, generator, like=self.base.mean)
        u = self.flow.transform().inv(z)
        return self.from_flow_coords(u).reshape(int(n), *self.shape)

    def config(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "T": self.T,
            "flow": self.kind,
            "transforms": self.transforms,
            "hidden": list(self.hidden),
            "bins": self.bins,
            "diagonal": self.base.diagonal,
            "rotation": self.rotation,
            "seed": self.seed,
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, flow={self.kind}, transforms={self.transforms}, hidden={list(self.hidden)}"
