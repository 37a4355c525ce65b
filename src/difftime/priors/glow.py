"""A compact multi-scale Glow (Kingma & Dhariwal, 2018) for images (C, H, W).

x is first ZCA-whitened with the full moment-matched Gaussian of p_T, Sigma^{-1/2} (x - mean),
which keeps each coordinate on its pixel (``base="full"``, the default of ``from_data`` up to 4096
dimensions), or standardised per dimension with the diagonal one, u = (x - mean) / std.
Then, per level: squeeze (2x2 -> channels); ``steps_per_level`` x [actnorm, invertible 1x1
conv (LU-parameterised), affine coupling]; and, except at the last level, split off half the
channels, whitening them with a conditional Gaussian N(mu(h), sigma(h)^2) predicted from the
kept half h. Everything that ends up in the latent is standard normal, so
log nu(x) = log N(eps(x); 0, I) + log |det d eps / dx|.

Every layer that could move the density starts at the identity (actnorm at 0, zero-initialised
last convs in couplings and split priors; the 1x1 convs start as rotations, which leave
N(0, I) unchanged), so at initialisation nu is exactly its base Gaussian.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difftime.errors import DifftimeError
from difftime.priors.base import PriorModule, std_normal_log_prob
from difftime.priors.flow import whitening_rotation
from difftime.priors.gaussian import DEFAULT_MAX_FULL_DIM, GaussianPrior
from difftime.sde import SDE

GLOW_BASES = ("diagonal", "full")


def squeeze(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x: Tensor) -> Tensor:
    b, c, h, w = x.shape
    x = x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c // 4, 2 * h, 2 * w)


def soft_clamp(x: Tensor, bound: float) -> Tensor:
    """bound * tanh(x / bound): the identity near 0, bounded by +-bound."""
    return bound * torch.tanh(x / bound)


class ActNorm(nn.Module):
    """y = (x + bias) * exp(logs) per channel; starts as the identity until :meth:`initialize`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent init (Kingma & Dhariwal 2018): zero mean, unit variance per channel on x."""
        mean = x.mean((0, 2, 3), keepdim=True)
        std = x.std((0, 2, 3), keepdim=True, correction=0)
        self.bias.copy_(-mean)
        self.logs.copy_(-torch.log(std.clamp_min(1e-6)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = self.logs.sum() * x.shape[2] * x.shape[3]
        return (x + self.bias) * self.logs.exp(), logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.logs) - self.bias


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution W = P L (U + diag(sign * exp(log_s))), from a random rotation."""

    def __init__(self, channels: int, generator: torch.Generator) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        s = upper.diagonal()
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", s.sign().float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(s.abs().log().float())

    def weight(self) -> Tensor:
        eye = torch.eye(self.perm.shape[0], dtype=self.perm.dtype, device=self.perm.device)
        lower = self.lower * self.lower_mask + eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.perm @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        c = x.shape[1]
        y = F.conv2d(x, self.weight().reshape(c, c, 1, 1))
        logdet = self.log_s.sum() * x.shape[2] * x.shape[3]
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        c = y.shape[1]
        w_inv = torch.linalg.inv(self.weight().double()).to(y.dtype)
        return F.conv2d(y, w_inv.reshape(c, c, 1, 1))


def _zero_conv(cin: int, cout: int) -> nn.Conv2d:
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class AffineCoupling(nn.Module):
    """x_b -> (x_b + shift(x_a)) * exp(log_scale(x_a)), log_scale soft-clamped to +-clamp."""

    def __init__(self, channels: int, hidden: int, clamp: float) -> None:
        super().__init__()
        self.ca = channels // 2
        self.cb = channels - self.ca
        self.clamp = clamp
        self.net = nn.Sequential(
            nn.Conv2d(self.ca, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            _zero_conv(hidden, 2 * self.cb),
        )

    def _params(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(xa)
        return h[:, 0::2], soft_clamp(h[:, 1::2], self.clamp)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xa, xb = x[:, : self.ca], x[:, self.ca :]
        shift, logs = self._params(xa)
        yb = (xb + shift) * logs.exp()
        return torch.cat([xa, yb], 1), logs.flatten(1).sum(1)

    def inverse(self, y: Tensor) -> Tensor:
        ya, yb = y[:, : self.ca], y[:, self.ca :]
        shift, logs = self._params(ya)
        return torch.cat([ya, yb * torch.exp(-logs) - shift], 1)


class FlowStep(nn.Module):
    def __init__(self, channels: int, hidden: int, clamp: float, generator: torch.Generator) -> None:
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.invconv = InvConv1x1(channels, generator)
        self.coupling = AffineCoupling(channels, hidden, clamp)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x, ld1 = self.actnorm(x)
        x, ld2 = self.invconv(x)
        x, ld3 = self.coupling(x)
        return x, ld1 + ld2 + ld3

    def inverse(self, y: Tensor) -> Tensor:
        return self.actnorm.inverse(self.invconv.inverse(self.coupling.inverse(y)))


class SplitPrior(nn.Module):
    """Whitens the factored-out half z with N(mu(h), exp(logsig(h))^2) from the kept half h."""

    def __init__(self, keep: int, out: int, clamp: float) -> None:
        super().__init__()
        self.keep = keep
        self.clamp = clamp
        self.conv = _zero_conv(keep, 2 * out)

    def _params(self, h: Tensor) -> tuple[Tensor, Tensor]:
        p = self.conv(h)
        return p[:, 0::2], soft_clamp(p[:, 1::2], self.clamp)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x -> (kept h, whitened eps, log-det)."""
        h, z = x[:, : self.keep], x[:, self.keep :]
        mu, logsig = self._params(h)
        return h, (z - mu) * torch.exp(-logsig), -logsig.flatten(1).sum(1)

    def inverse(self, h: Tensor, eps: Tensor) -> Tensor:
        mu, logsig = self._params(h)
        return torch.cat([h, mu + eps * logsig.exp()], 1)


class GlowPrior(PriorModule):
    """Multi-scale Glow on images, based at the diagonal moment-matched Gaussian of p_T.

    ``shape`` is (C, H, W) with H and W divisible by 2^``levels``; ``steps_per_level`` flow steps
    of ``hidden`` channels each, coupling log-scales soft-clamped to +-``clamp``; ``base`` "diagonal" or "full"
    (ZCA); ``seed`` fixes the initial weights. Every layer that could move the density starts at the
    identity, so a fresh Glow is its Gaussian base. Build it with :meth:`from_data`. Bad options
    raise DifftimeError. References: Glow, https://arxiv.org/abs/1807.03039; the auxiliary prior,
    https://arxiv.org/abs/2206.05173.

    >>> import torch
    >>> from difftime.priors import GaussianPrior, GlowPrior
    >>> from difftime.sde import VPSDE
    >>> x0 = torch.randn(50, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    >>> glow = GlowPrior.from_data(VPSDE(), 0.4, x0, levels=1, steps_per_level=1, hidden=8)
    >>> x = glow.sample(3, generator=torch.Generator().manual_seed(1))
    >>> tuple(x.shape)
    (3, 1, 4, 4)
    >>> gauss = GaussianPrior.from_data(VPSDE(), 0.4, x0)   # the full base: the same density
    >>> bool(torch.allclose(glow.log_prob(x), gauss.log_prob(x), atol=1e-4))
    True
    """

    family = "glow"

    def __init__(
        self,
        shape: tuple[int, ...],
        T: float,
        levels: int = 2,
        steps_per_level: int = 4,
        hidden: int = 64,
        clamp: float = 2.0,
        base: str = "diagonal",
        seed: int = 0,
    ) -> None:
        super().__init__(shape, T)
        if len(self.shape) != 3:
            raise DifftimeError(f"GlowPrior: shape {self.shape} is not an image; expected (C, H, W)")
        c, h, w = self.shape
        levels, steps_per_level, hidden = int(levels), int(steps_per_level), int(hidden)
        if levels < 1 or steps_per_level < 1 or hidden < 1 or not clamp > 0:
            raise DifftimeError(
                f"GlowPrior: levels={levels}, steps_per_level={steps_per_level}, hidden={hidden}, "
                f"clamp={clamp} are invalid; expected positive values"
            )
        if base not in GLOW_BASES:
            raise DifftimeError(f"GlowPrior: base={base!r} is unknown; expected one of {', '.join(GLOW_BASES)}")
        if h % 2**levels or w % 2**levels:
            raise DifftimeError(
                f"GlowPrior: {h}x{w} images cannot be squeezed {levels} times; expected H and W divisible "
                f"by 2^levels = {2**levels} (use fewer levels)"
            )
        self.levels, self.steps_per_level, self.hidden = levels, steps_per_level, hidden
        self.clamp, self.seed = float(clamp), int(seed)
        # x -> u: per-dimension standardisation ("diagonal", the default), or ZCA whitening
        # ("full": u = R L^{-1} (x - mean) = Sigma^{-1/2} (x - mean) with the orthogonal R below).
        self.base = GaussianPrior(self.shape, self.T, diagonal=base == "diagonal")
        if base == "full":
            self.register_buffer("rotate", torch.eye(self.d))

        gen = torch.Generator().manual_seed(self.seed)
        self.steps = nn.ModuleList()
        self.splits = nn.ModuleList()
        # (channels, H, W) of each latent block in the order encode() emits them.
        self.latent_shapes: list[tuple[int, int, int]] = []
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for level in range(levels):
                c, h, w = 4 * c, h // 2, w // 2
                self.steps.append(
                    nn.ModuleList(FlowStep(c, hidden, self.clamp, gen) for _ in range(steps_per_level))
                )
                if level < levels - 1:
                    keep = c - c // 2
                    self.splits.append(SplitPrior(keep, c - keep, self.clamp))
                    self.latent_shapes.append((c - keep, h, w))
                    c = keep
        self.latent_shapes.append((c, h, w))

    @classmethod
    def from_data(cls, sde: SDE, T: float, x0: Tensor, *, base: str | None = None,
                  max_full_dim: int = DEFAULT_MAX_FULL_DIM, **options: Any) -> GlowPrior:
        """A Glow standardised by ``GaussianPrior.from_data``: ``base`` "full" (ZCA, the default up to
        ``max_full_dim`` dimensions) or "diagonal". The full start is the KL-best Gaussian; the
        diagonal one is far worse on images (measured: docs/design.md §7), a gap the Glow must first
        close before it can gain on the full Gaussian."""
        if base is None:
            base = "full" if math.prod(x0.shape[1:]) <= int(max_full_dim) else "diagonal"
        gauss = GaussianPrior.from_data(sde, T, x0, diagonal=base == "diagonal")
        prior = cls(gauss.shape, gauss.T, base=base, **options)
        prior.base.load_state_dict(gauss.state_dict())
        if base == "full":
            prior.rotate.copy_(whitening_rotation(gauss.scale_tril, "zca"))
        return prior

    # --- the bijection x <-> eps ----------------------------------------------------------
    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B, C, H, W) -> (eps (B, d), log |det d eps / dx| (B,))."""
        h = self.base.whiten(x.reshape(x.shape[0], -1))
        if not self.base.diagonal:
            h = h @ self.rotate.T
        h = h.reshape(x.shape)
        logdet = (-self.base.log_det_scale()).to(x.dtype).expand(x.shape[0])
        eps = []
        for level in range(self.levels):
            h = squeeze(h)
            for step in self.steps[level]:
                h, ld = step(h)
                logdet = logdet + ld
            if level < self.levels - 1:
                h, e, ld = self.splits[level](h)
                logdet = logdet + ld
                eps.append(e.flatten(1))
        eps.append(h.flatten(1))
        return torch.cat(eps, 1), logdet

    @torch.no_grad()
    def data_init(self, x: Tensor) -> None:
        """Initialise every actnorm on the batch x (B, C, H, W) of x_T, in order, so that each one's
        output has zero mean and unit variance per channel. The input is already standardised by the
        base Gaussian and the other layers start at the identity, so this moves nu only by the
        batch's deviation from the moments (the warm start is kept to that accuracy)."""
        h = self.base.whiten(x.reshape(x.shape[0], -1).to(self.base.mean.dtype))
        if not self.base.diagonal:
            h = h @ self.rotate.T
        h = h.reshape(-1, *self.shape)
        for level in range(self.levels):
            h = squeeze(h)
            for step in self.steps[level]:
                step.actnorm.initialize(h)
                h, _ = step(h)
            if level < self.levels - 1:
                h, _, _ = self.splits[level](h)

    def decode(self, eps: Tensor) -> Tensor:
        """eps (B, d) -> x (B, C, H, W), the exact inverse of :meth:`encode`."""
        sizes = [math.prod(s) for s in self.latent_shapes]
        blocks = [e.reshape(-1, *s) for e, s in zip(eps.split(sizes, 1), self.latent_shapes, strict=True)]
        h = blocks[-1]
        for level in reversed(range(self.levels)):
            if level < self.levels - 1:
                h = self.splits[level].inverse(h, blocks[level])
            for step in reversed(self.steps[level]):
                h = step.inverse(h)
            h = unsqueeze(h)
        u = h.reshape(h.shape[0], -1)
        if not self.base.diagonal:
            u = u @ self.rotate
        return self.base.unwhiten(u).reshape(h.shape)

    # --- the prior interface ----------------------------------------------------------
    def log_prob(self, x: Tensor) -> Tensor:
        x = self._flat(x, self.base.mean.dtype).reshape(-1, *self.shape)
        eps, logdet = self.encode(x)
        return (std_normal_log_prob(eps) + logdet.double()).to(eps.dtype)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.decode(self._noise(n, generator, like=self.base.mean))

    def config(self) -> dict[str, Any]:
        return {
            "shape": list(self.shape),
            "T": self.T,
            "levels": self.levels,
            "steps_per_level": self.steps_per_level,
            "hidden": self.hidden,
            "clamp": self.clamp,
            "base": "diagonal" if self.base.diagonal else "full",
            "seed": self.seed,
        }

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, levels={self.levels}, steps_per_level={self.steps_per_level}, "
            f"hidden={self.hidden}"
        )
