"""EDM preconditioning (Karras et al. 2022, Table 1) for any linear SDE, as an eps-network.

With x_t = m(t) x_0 + s(t) z, EDM's noise level is sigma = s/m and its input is x_t / m. Its
denoiser D = c_skip x_t/m + c_out F(c_in x_t/m) with sigma_data = sd gives, written for eps,

    r       = sqrt(s^2 + m^2 sd^2)           (the std of x_t when x_0 ~ N(0, sd^2 I))
    u       = x_t / r                        (unit-variance network input)
    eps_hat = (s / r) u - (m sd / r) F(u, t)

so F = 0 is the exact posterior mean of z for N(0, sd^2) data, F's own regression target has
unit variance at every noise level, and the skip carries eps_hat at high noise while F carries
it at low noise. The inner network keeps absolute time t as its time input, so a network
trained on [eps, T] is still queried on any sub-horizon. The result is an ordinary
``model(x, t) -> eps_hat``, the interface every sampler, likelihood and prior uses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from difftime.sde import SDE, broadcast_to

PRECONDITIONINGS = ("none", "edm")


class EDMPreconditioned(nn.Module):
    """eps_hat(x_t, t) = (s/r) u - (m sd/r) F(u, t) with u = x_t / r, r = sqrt(s^2 + m^2 sd^2).

    >>> import torch
    >>> from difftime.nets.precond import EDMPreconditioned
    >>> from difftime.sde import VPSDE
    >>> sde = VPSDE()
    >>> net = EDMPreconditioned(lambda u, t: torch.zeros_like(u), sde, sigma_data=0.5)   # F = 0
    >>> x, t = torch.ones(2, 3), torch.tensor([0.1, 0.9])
    >>> m, s = sde.m(t)[:, None], sde.sigma(t)[:, None]
    >>> bool(torch.allclose(net(x, t), s * x / (s**2 + (0.5 * m) ** 2)))   # E[z | x_t], x_0 ~ N(0, 0.25 I)
    True
    >>> bool(torch.allclose(net.loss_weight(t), 1 + torch.exp(-2 * sde.log_snr(t)) / 0.5**2))
    True
    """

    def __init__(self, inner: nn.Module, sde: SDE, sigma_data: float) -> None:
        super().__init__()
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.inner = inner
        self.sde = sde
        self.sigma_data = float(sigma_data)

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(1/r, s/r, m sd/r) at t, in float32 (computed in float64: m is 7e-3 at the VP's t = 1)."""
        t64 = t.to(torch.float64)
        m, s = self.sde.m(t64), self.sde.sigma(t64)
        r = torch.sqrt(s**2 + (m * self.sigma_data) ** 2)
        return (1 / r).float(), (s / r).float(), (m * self.sigma_data / r).float()

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        c_in, c_skip, c_out = (broadcast_to(c, x) for c in self.coefficients(t))
        u = x * c_in
        return c_skip * u - c_out * self.inner(u, t).float()

    def loss_weight(self, t: Tensor) -> Tensor:
        """(r / (m sd))^2: the weight on ||eps_hat - z||^2 that makes it ||F - F_target||^2 (EDM's loss)."""
        _, _, c_out = self.coefficients(t)
        return c_out.pow(-2)
