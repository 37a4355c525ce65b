"""The prior interface: a density nu(x_T) on model space at one horizon T.

A prior is any object with ``log_prob(x) -> (B,)`` (nats, summed over every dimension) and
``sample(n, generator=None) -> (n, *shape)``: the :class:`Prior` protocol, which samplers and
likelihoods accept (an exact Gaussian in a test, say). The library's priors subclass :class:`PriorModule`,
an ``nn.Module`` that also records its family, horizon and shape, and can describe its own
constructor arguments (``config()``) so that ``store.load_prior`` can rebuild it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from difftime.errors import DifftimeError
from difftime.rng import randn_on

LOG_2PI = math.log(2 * math.pi)


@runtime_checkable
class Prior(Protocol):
    """What samplers and likelihoods need of a density nu(x_T).

    ``log_prob(x)`` takes x of shape (B, *shape) and returns log nu(x), (B,), in nats summed over
    every dimension; ``sample(n, generator=None)`` returns (n, *shape). It is runtime-checkable, so
    ``isinstance`` tests for both methods. The auxiliary prior at a short T is the paper's,
    https://arxiv.org/abs/2206.05173.

    >>> import torch
    >>> from difftime.priors import Prior, StandardPrior
    >>> isinstance(StandardPrior((2,), T=1.0), Prior)
    True
    >>> class UnitSquare:                      # any object with log_prob and sample will do
    ...     def log_prob(self, x):
    ...         return torch.zeros(len(x))
    ...     def sample(self, n, generator=None):
    ...         return torch.rand(n, 2, generator=generator)
    >>> isinstance(UnitSquare(), Prior)
    True
    """

    def log_prob(self, x: Tensor) -> Tensor:
        """log nu(x) in nats, summed over every dimension: shape (B,)."""
        ...

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws of shape (n, *shape)."""
        ...


def std_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over all but the first dimension, accumulated in float64.

    The priors add their log-determinants in float64 too and round once at the end, so that
    mathematically equal densities (a flow at initialisation and its base) agree to ~1 ulp.
    """
    z = z.flatten(1).to(torch.float64)
    return -0.5 * (z.pow(2).sum(1) + z.shape[1] * LOG_2PI)


def check_shape(shape: Any, where: str) -> tuple[int, ...]:
    try:
        out = tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        raise DifftimeError(f"{where}: shape {shape!r} is invalid; expected a tuple of positive ints") from None
    if not out or any(s < 1 for s in out):
        raise DifftimeError(f"{where}: shape {shape!r} is invalid; expected a tuple of positive ints")
    return out


def check_T(T: Any, where: str) -> float:
    try:
        T = float(T)
    except (TypeError, ValueError):
        raise DifftimeError(f"{where}: T={T!r} is invalid; expected a positive number") from None
    if not (math.isfinite(T) and T > 0):
        raise DifftimeError(f"{where}: T={T!r} is invalid; expected a positive number")
    return T


class PriorModule(nn.Module, ABC):
    """A density on model space at horizon ``T`` for examples of shape ``shape``.

    The base of the library's priors: an ``nn.Module`` with a ``family`` name, ``T``, ``shape`` and
    ``d``, the :class:`Prior` methods, and ``config()``, the JSON-ready constructor arguments that
    ``store.load_prior`` rebuilds it from. A bad shape or T raises DifftimeError.

    >>> from difftime.priors import GaussianPrior
    >>> prior = GaussianPrior((2,), T=0.4, diagonal=True)
    >>> prior.family, prior.d, prior.config()
    ('gaussian', 2, {'shape': [2], 'T': 0.4, 'diagonal': True})
    >>> type(prior)(**prior.config())
    GaussianPrior(T=0.4, shape=(2,), diagonal=True)
    """

    family: ClassVar[str]

    def __init__(self, shape: tuple[int, ...], T: float) -> None:
        super().__init__()
        self.shape: tuple[int, ...] = check_shape(shape, type(self).__name__)
        self.T: float = check_T(T, type(self).__name__)

    @property
    def d(self) -> int:
        """Number of dimensions of one example."""
        return math.prod(self.shape)

    @abstractmethod
    def log_prob(self, x: Tensor) -> Tensor:
        """log nu(x) in nats, summed over all dimensions: (B, *shape) -> (B,)."""

    @abstractmethod
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n draws from nu: (n, *shape), float32, without gradient."""

    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-ready constructor arguments: ``type(self)(**self.config())`` rebuilds it."""

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    # --- helpers ---------------------------------------------------------------------
    def _flat(self, x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Check the trailing shape and flatten to (B, d)."""
        if not isinstance(x, Tensor) or tuple(x.shape[1:]) != self.shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise DifftimeError(
                f"{type(self).__name__}.log_prob: got input of shape {got}; expected (B, *{self.shape})"
            )
        x = x.reshape(x.shape[0], -1)
        return x if dtype is None else x.to(dtype)

    def _noise(self, n: int, generator: torch.Generator | None, like: Tensor | None = None) -> Tensor:
        """(n, d) standard normals on ``like``'s device (the prior's), drawn on the generator's
        (difftime.rng's rule: a seed gives the same draws wherever the prior lives)."""
        n = int(n)
        if n < 0:
            raise DifftimeError(f"{type(self).__name__}.sample: n={n} is invalid; expected n >= 0")
        return randn_on((n, self.d), generator, device=None if like is None else like.device)

    def extra_repr(self) -> str:
        return f"T={self.T:g}, shape={self.shape}"
