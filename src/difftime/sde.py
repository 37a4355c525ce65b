"""Linear-drift SDEs on a free horizon [eps, T].

Every SDE here has drift f(x, t) = alpha(t) x and diffusion g(t), so the kernel is
p(x_t | x_0) = N(m(t) x_0, v(t) I). Nothing assumes T = 1: the horizon is an argument of
every function that needs one, checked against the SDE's own ``T_max``.

Each SDE also exposes an "importance potential" Phi(t) with dPhi/dt = g^2(t) / v(t) in
closed form, together with its inverse. That gives Z = Phi(T) - Phi(eps) and exact inverse-CDF
sampling of t with density proportional to g^2/v, which the likelihood-weighted loss and the
ELBO estimator both need.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import Tensor

from difftime.errors import DifftimeError
from difftime.rng import randn_like_on


def broadcast_to(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-example coefficient of shape (B,) so it multiplies x of shape (B, ...)."""
    return coef.reshape(coef.shape + (1,) * (x.dim() - coef.dim()))


class SDE(ABC):
    """dx = alpha(t) x dt + g(t) dW on [0, T_max]; all methods take absolute time tensors.

    ``T_max`` is the largest horizon and ``eps`` the default start of a horizon [eps, T] (training and
    likelihoods); :meth:`check_horizon` enforces 0 < eps < T <= T_max, so nothing assumes T = 1. The
    schedule methods (``m``, ``v``, ``sigma``, ``g2``, ``alpha``, ``log_snr``, ...) map a time tensor
    to a tensor of the same shape; pass float64 for the full precision of the closed forms. The
    maths, with the importance potential Phi and Z = 2 (lambda(eps) - lambda(T)), is
    docs/design.md §2.

    References: score SDE, https://arxiv.org/abs/2011.13456; the free horizon T,
    https://arxiv.org/abs/2206.05173.

    >>> import torch
    >>> from difftime.sde import VPSDE
    >>> sde = VPSDE()
    >>> sde.check_horizon(0.4)
    (0.4, 1e-05)
    >>> lam = sde.log_snr(torch.tensor([1e-5, 0.4], dtype=torch.float64))
    >>> bool(torch.allclose(sde.t_from_log_snr(lam), torch.tensor([1e-5, 0.4], dtype=torch.float64)))
    True
    >>> abs(sde.importance_Z(0.4) - 2 * float(lam[0] - lam[1])) < 1e-9
    True
    >>> sde.check_horizon(1.5)
    Traceback (most recent call last):
    ...
    difftime.errors.DifftimeError: horizon must satisfy 0 < eps < T <= T_max; got eps=1e-05, T=1.5, T_max=1.0
    """

    kind: ClassVar[str]

    def __init__(self, T_max: float = 1.0, eps: float = 1e-5) -> None:
        if not (math.isfinite(T_max) and T_max > 0):
            raise DifftimeError(f"T_max must be a positive number, got {T_max}")
        if not (0 < eps < T_max):
            raise DifftimeError(f"eps must satisfy 0 < eps < T_max = {T_max}, got eps = {eps}")
        self.T_max = float(T_max)
        self.eps = float(eps)

    # --- schedule -------------------------------------------------------------------------
    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Drift coefficient: f(x, t) = alpha(t) x."""

    @abstractmethod
    def g2(self, t: Tensor) -> Tensor:
        """Squared diffusion coefficient g(t)^2."""

    @abstractmethod
    def m(self, t: Tensor) -> Tensor:
        """Mean factor of p(x_t | x_0)."""

    @abstractmethod
    def v(self, t: Tensor) -> Tensor:
        """Variance of p(x_t | x_0) per dimension."""

    @abstractmethod
    def transition(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean factor and variance of p(x_t | x_s) for s <= t."""

    @abstractmethod
    def int_alpha(self, s: Tensor, t: Tensor) -> Tensor:
        """The integral of alpha over [s, t]."""

    @abstractmethod
    def prior_std(self, T: float) -> float:
        """Standard deviation of the baseline prior N(0, std^2 I) at horizon T."""

    @abstractmethod
    def importance_potential(self, t: Tensor) -> Tensor:
        """Phi(t), an antiderivative of g^2(t) / v(t)."""

    @abstractmethod
    def importance_potential_inverse(self, phi: Tensor) -> Tensor:
        """The t with Phi(t) = phi."""

    @abstractmethod
    def to_config(self) -> dict[str, Any]:
        """JSON-ready constructor arguments plus the ``kind`` tag."""

    @abstractmethod
    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(m(t) / sigma(t)), strictly decreasing in t."""

    @abstractmethod
    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        """The t with lambda(t) = lam, in closed form."""

    # --- derived quantities ------------------------------------------------------------
    def sigma(self, t: Tensor) -> Tensor:
        return self.v(t).sqrt()

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        return broadcast_to(self.alpha(t), x) * x

    def check_horizon(self, T: float, eps: float | None = None) -> tuple[float, float]:
        """Validate 0 < eps < T <= T_max and return (T, eps) as floats."""
        eps = self.eps if eps is None else float(eps)
        T = float(T)
        if not (0 < eps < T <= self.T_max + 1e-12):
            raise DifftimeError(
                f"horizon must satisfy 0 < eps < T <= T_max; got eps={eps}, T={T}, "
                f"T_max={self.T_max}"
            )
        return T, eps

    def marginal_sample(
        self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None, z: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Draw x_t = m(t) x0 + sigma(t) z, with z from ``generator`` unless given; returns (x_t, z)."""
        if z is None:
            z = randn_like_on(x0, generator)  # drawn on the generator's device (difftime.rng's rule)
        xt = broadcast_to(self.m(t), x0) * x0 + broadcast_to(self.sigma(t), x0) * z
        return xt, z

    def importance_Z(self, T: float, eps: float | None = None) -> float:
        """Z = int_eps^T g^2/v dt, the normaliser of the likelihood-weighting time density."""
        T, eps = self.check_horizon(T, eps)
        ends = torch.tensor([eps, T], dtype=torch.float64)
        phi = self.importance_potential(ends)
        return float(phi[1] - phi[0])

    def importance_sample_t(
        self, u: Tensor, T: float, eps: float | None = None
    ) -> Tensor:
        """Map u ~ U[0, 1) to t on [eps, T] with density g^2(t) / (v(t) Z) (inverse CDF)."""
        T, eps = self.check_horizon(T, eps)
        ends = torch.tensor([eps, T], dtype=torch.float64)
        phi_eps, phi_T = self.importance_potential(ends)
        phi = phi_eps + u.to(torch.float64) * (phi_T - phi_eps)
        t = self.importance_potential_inverse(phi).clamp(eps, T)
        return t.to(u.dtype)

    def log_prior_density_standard(self, x: Tensor, T: float) -> Tensor:
        """log N(x; 0, prior_std(T)^2 I) summed over all but the first dimension."""
        std = self.prior_std(T)
        d = x[0].numel()
        sq = x.flatten(1).pow(2).sum(1)
        return -0.5 * sq / std**2 - d * math.log(std) - 0.5 * d * math.log(2 * math.pi)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.to_config().items() if k != "kind")
        return f"{type(self).__name__}({args})"


class _BetaSDE(SDE):
    """Shared linear-beta schedule of VP and sub-VP: beta(t) = b0 + (b1 - b0) t."""

    def __init__(self, b0: float = 0.1, b1: float = 20.0, T_max: float = 1.0, eps: float = 1e-5):
        super().__init__(T_max=T_max, eps=eps)
        if not b0 > 0:
            raise DifftimeError(f"{type(self).__name__}: beta_min b0 must be > 0, got {b0}")
        if not b1 > b0:
            raise DifftimeError(
                f"{type(self).__name__}: beta_max b1 must be > beta_min b0 = {b0}, got {b1}"
            )
        self.b0 = float(b0)
        self.b1 = float(b1)

    def beta(self, t: Tensor) -> Tensor:
        return self.b0 + (self.b1 - self.b0) * t

    def B(self, t: Tensor) -> Tensor:
        """int_0^t beta."""
        return self.b0 * t + 0.5 * (self.b1 - self.b0) * t**2

    def B_inverse(self, B: Tensor) -> Tensor:
        db = self.b1 - self.b0
        # The root written as 2B / (b0 + sqrt(...)) stays accurate when B is tiny.
        return 2 * B / (self.b0 + torch.sqrt(self.b0**2 + 2 * db * B))

    def alpha(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t)

    def m(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self.B(t))

    def int_alpha(self, s: Tensor, t: Tensor) -> Tensor:
        return -0.5 * (self.B(t) - self.B(s))

    def to_config(self) -> dict[str, Any]:
        return {"kind": self.kind, "b0": self.b0, "b1": self.b1, "T_max": self.T_max, "eps": self.eps}


class VPSDE(_BetaSDE):
    """Variance preserving: g^2 = beta, v = 1 - exp(-B). Baseline prior N(0, I).

    ``VPSDE(b0=0.1, b1=20.0, T_max=1.0, eps=1e-5)``: beta(t) = b0 + (b1 - b0) t and
    B(t) = int_0^t beta, so m(t) = exp(-B/2); the continuous-time limit of DDPM
    (https://arxiv.org/abs/2006.11239) as in score SDE (https://arxiv.org/abs/2011.13456, VP).
    Raises DifftimeError unless 0 < b0 < b1 and 0 < eps < T_max.

    >>> import torch
    >>> from difftime.sde import VPSDE
    >>> t = torch.tensor([0.4], dtype=torch.float64)
    >>> sde = VPSDE()
    >>> round(float(sde.m(t)), 2), round(float(sde.sigma(t)), 2)   # x_T = 0.44 x_0 + 0.90 z at T = 0.4
    (0.44, 0.9)
    >>> sde.prior_std(0.4)
    1.0
    """

    kind = "vp"

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t)

    def v(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.B(t))

    def transition(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        dB = self.B(t) - self.B(s)
        return torch.exp(-0.5 * dB), -torch.expm1(-dB)

    def prior_std(self, T: float) -> float:
        return 1.0

    def importance_potential(self, t: Tensor) -> Tensor:
        # g^2/v = beta / (1 - e^-B) = d/dt ln(e^B - 1)
        return torch.log(torch.expm1(self.B(t)))

    def importance_potential_inverse(self, phi: Tensor) -> Tensor:
        return self.B_inverse(torch.nn.functional.softplus(phi, threshold=30.0))

    def log_snr(self, t: Tensor) -> Tensor:
        # sigma^2 / m^2 = e^B - 1
        return -0.5 * torch.log(torch.expm1(self.B(t)))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        return self.B_inverse(torch.nn.functional.softplus(-2 * lam, threshold=30.0))


class SubVPSDE(_BetaSDE):
    """sub-VP: g^2 = beta (1 - exp(-2B)), v = (1 - exp(-B))^2. Baseline prior N(0, I).

    The same arguments and mean m(t) = exp(-B/2) as :class:`VPSDE`, with a smaller variance
    (score SDE, https://arxiv.org/abs/2011.13456, sub-VP).

    >>> import torch
    >>> from difftime.sde import SubVPSDE
    >>> t = torch.tensor([0.4], dtype=torch.float64)
    >>> sde = SubVPSDE()
    >>> round(float(sde.m(t)), 2), round(float(sde.sigma(t)), 2)
    (0.44, 0.8)
    """

    kind = "subvp"

    def g2(self, t: Tensor) -> Tensor:
        return self.beta(t) * -torch.expm1(-2 * self.B(t))

    def v(self, t: Tensor) -> Tensor:
        return torch.expm1(-self.B(t)) ** 2

    def transition(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        # v(t) = mean_factor^2 v(s) + var must hold for the kernel to compose.
        mean_factor = torch.exp(-0.5 * (self.B(t) - self.B(s)))
        return mean_factor, self.v(t) - mean_factor**2 * self.v(s)

    def prior_std(self, T: float) -> float:
        return 1.0

    def importance_potential(self, t: Tensor) -> Tensor:
        # g^2/v = beta (e^B + 1)/(e^B - 1) = d/dt [2 ln(e^B - 1) - B]
        B = self.B(t)
        return 2 * torch.log(torch.expm1(B)) - B

    def importance_potential_inverse(self, phi: Tensor) -> Tensor:
        # (e^B - 1)^2 / e^B = e^phi  =>  u^2 - (2 + e^phi) u + 1 = 0 with u = e^B > 1.
        # The larger root minus one, in a form without cancellation for small e^phi:
        # u - 1 = (c + sqrt(c^2 + 4c)) / 2 with c = e^phi.
        c = torch.exp(phi)
        return self.B_inverse(torch.log1p(0.5 * (c + torch.sqrt(c * c + 4 * c))))

    def log_snr(self, t: Tensor) -> Tensor:
        # sigma / m = e^{B/2} - e^{-B/2} = 2 sinh(B/2)
        return -torch.log(2 * torch.sinh(0.5 * self.B(t)))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        return self.B_inverse(2 * torch.asinh(0.5 * torch.exp(-lam)))


class VESDE(SDE):
    """Variance exploding: sigma2(t) = smin^2 (smax/smin)^(2t), v = sigma2(t) - sigma2(0).

    The baseline prior is N(0, v(T) I), the paper's Table 1 (not score_sde's smax^2).

    ``VESDE(sigma_min=0.01, sigma_max=50.0, T_max=1.0, eps=1e-5)``; m(t) = 1 and alpha = 0.
    Raises DifftimeError unless 0 < sigma_min < sigma_max. References: score SDE,
    https://arxiv.org/abs/2011.13456 (VE); the paper, https://arxiv.org/abs/2206.05173.

    >>> import torch
    >>> from difftime.sde import VESDE
    >>> sde = VESDE()
    >>> float(sde.m(torch.tensor([0.4])))
    1.0
    >>> round(sde.prior_std(1.0), 2), round(sde.prior_std(0.4), 3)   # sqrt(v(T))
    (50.0, 0.302)
    """

    kind = "ve"

    def __init__(
        self, sigma_min: float = 0.01, sigma_max: float = 50.0, T_max: float = 1.0, eps: float = 1e-5
    ):
        super().__init__(T_max=T_max, eps=eps)
        if not sigma_min > 0:
            raise DifftimeError(f"VESDE: sigma_min must be > 0, got {sigma_min}")
        if not sigma_max > sigma_min:
            raise DifftimeError(
                f"VESDE: sigma_max must be > sigma_min = {sigma_min}, got {sigma_max}"
            )
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def sigma2(self, t: Tensor) -> Tensor:
        return self.sigma_min**2 * torch.exp(2 * self._log_ratio * t)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def g2(self, t: Tensor) -> Tensor:
        return 2 * self._log_ratio * self.sigma2(t)

    def m(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def v(self, t: Tensor) -> Tensor:
        return self.sigma_min**2 * torch.expm1(2 * self._log_ratio * t)

    def transition(self, s: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return torch.ones_like(t), self.v(t) - self.v(s)

    def int_alpha(self, s: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def prior_std(self, T: float) -> float:
        return math.sqrt(self.sigma_min**2 * math.expm1(2 * self._log_ratio * T))

    def importance_potential(self, t: Tensor) -> Tensor:
        # g^2/v = d/dt ln v
        return torch.log(self.v(t))

    def importance_potential_inverse(self, phi: Tensor) -> Tensor:
        return torch.log1p(torch.exp(phi) / self.sigma_min**2) / (2 * self._log_ratio)

    def log_snr(self, t: Tensor) -> Tensor:
        return -0.5 * torch.log(self.v(t))

    def t_from_log_snr(self, lam: Tensor) -> Tensor:
        # v = smin^2 expm1(2 r t) = exp(-2 lam)
        return torch.log1p(torch.exp(-2 * lam) / self.sigma_min**2) / (2 * self._log_ratio)

    def to_config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "T_max": self.T_max,
            "eps": self.eps,
        }


SDES: dict[str, type[SDE]] = {cls.kind: cls for cls in (VPSDE, SubVPSDE, VESDE)}


def sde_from_config(config: dict[str, Any]) -> SDE:
    """Rebuild an SDE from ``SDE.to_config()``; unknown kinds or keys are errors.

    ``config`` is a dict with ``kind`` ("vp", "subvp" or "ve") and that SDE's constructor
    arguments. Returns a new SDE; raises DifftimeError on an unknown kind or a bad argument.

    >>> from difftime.sde import VESDE, sde_from_config
    >>> sde_from_config(VESDE(sigma_max=20).to_config())
    VESDE(sigma_min=0.01, sigma_max=20.0, T_max=1.0, eps=1e-05)
    >>> sde_from_config({"kind": "vp", "b0": 0.1, "b1": 20.0})
    VPSDE(b0=0.1, b1=20.0, T_max=1.0, eps=1e-05)
    """
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in SDES:
        raise DifftimeError(f"unknown SDE kind {kind!r}; expected one of {sorted(SDES)}")
    cls = SDES[kind]
    try:
        return cls(**config)
    except TypeError as exc:
        raise DifftimeError(f"bad arguments for SDE {kind!r}: {exc}") from None
