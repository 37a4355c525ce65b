"""A pretrained diffusers DDPM (``UNet2DModel`` + linear-beta scheduler) as a VP eps-network.

The correspondence (Song et al. 2021). A DDPM with N training steps and linear betas
beta_0..beta_{N-1} (diffusers' 0-based indexing) discretises the VP SDE with b0 = N beta_0 and
b1 = N beta_{N-1}: training step i sits at t_i = (i + 1) / N and alphas_cumprod[i] ~ m(t_i)^2 =
exp(-B(t_i)). The two agree up to O(beta^2) per step. :func:`check_schedule` measures the largest
gap in the kernel's mean factor m and standard deviation sigma over the N steps and refuses a
schedule where it exceeds ``KERNEL_TOL`` = 0.01 (non-linear betas, or too few steps). For the
common 1e-4..0.02 with N = 1000 the gap is 0.0013; with N = 200 and 5e-4..0.1 it is 0.0068.

The time map. The network is evaluated at the fractional step tau(t) whose noise level is exactly
the continuous one: log alphas_cumprod, linear between integer steps (and 0 at step -1, t = 0),
equals -B(t). So eps_hat(x, t) = unet(x, tau(t)) sees the noise level of x_t, between two it was
trained on, and tau(t_i) stays within a few steps of i (3.4 for 1e-4..0.02, N = 1000). The run's eps is
1/N, step 0: the least noise the network has seen. A difftime grid from T = 1 to eps = 1/N with
N - 1 steps is then DDPM's own grid (N network calls with the final denoising step), and T = 0.4
with 0.4 N - 1 steps is its last 40%.

diffusers is an optional extra and is imported only when a retrofitted network is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from difftime.errors import DifftimeError
from difftime.sde import VPSDE, broadcast_to

KERNEL_TOL = 0.01
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def diffusers_module() -> Any:
    try:
        import diffusers
    except ImportError:
        raise DifftimeError(
            "retrofitted diffusers models need the optional extra: pip install 'difftime[diffusers]'"
        ) from None
    return diffusers


@dataclass(frozen=True)
class DDPMSchedule:
    """A linear-beta DDPM training schedule and the VP SDE it discretises."""

    num_train_timesteps: int
    beta_start: float
    beta_end: float

    def __post_init__(self) -> None:
        n, lo, hi = self.num_train_timesteps, self.beta_start, self.beta_end
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise DifftimeError(f"num_train_timesteps must be an integer >= 2, got {n!r}")
        if not (0 < lo < hi < 1):
            raise DifftimeError(f"need 0 < beta_start < beta_end < 1 for a VP SDE; got {lo!r}, {hi!r}")

    def betas(self) -> Tensor:
        return torch.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=torch.float64)

    def neg_log_alphas_cumprod(self) -> Tensor:
        """-log alphas_cumprod at steps -1, 0, ..., N-1 (increasing; 0 at step -1), float64."""
        cum = torch.cumsum(-torch.log1p(-self.betas()), 0)
        return torch.cat([cum.new_zeros(1), cum])

    def step_times(self) -> Tensor:
        """The continuous t of each training step i = 0..N-1, where m(t)^2 = alphas_cumprod[i] exactly.

        The inverse of :meth:`DiffusersEps.timestep` at integer steps: it lets a diffusers scheduler
        drive a continuous-time difftime network (float64).
        """
        return self.sde().B_inverse(self.neg_log_alphas_cumprod()[1:])

    def sde(self) -> VPSDE:
        n = self.num_train_timesteps
        return VPSDE(b0=n * self.beta_start, b1=n * self.beta_end, T_max=1.0, eps=1.0 / n)

    def kernel_error(self) -> float:
        """max over steps i of |m_disc - m(t_i)| and |sigma_disc - sigma(t_i)|, t_i = (i + 1) / N."""
        n = self.num_train_timesteps
        c = self.neg_log_alphas_cumprod()[1:]
        B = self.sde().B(torch.arange(1, n + 1, dtype=torch.float64) / n)
        dm = (torch.exp(-c / 2) - torch.exp(-B / 2)).abs().max()
        ds = (torch.sqrt(-torch.expm1(-c)) - torch.sqrt(-torch.expm1(-B))).abs().max()
        return float(max(dm, ds))


def check_schedule(config: dict[str, Any], where: str = "scheduler") -> tuple[DDPMSchedule, str]:
    """The schedule and prediction type of a diffusers scheduler config, or a DifftimeError.

    Missing keys take diffusers' DDPMScheduler defaults. Only linear betas have a VP SDE here;
    ``trained_betas`` are accepted when they are linear.
    """
    n = config.get("num_train_timesteps", 1000)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise DifftimeError(f"{where}: num_train_timesteps must be an integer >= 2, got {n!r}")
    trained = config.get("trained_betas")
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float64)
        if betas.shape != (n,) or not np.all(np.isfinite(betas)):
            raise DifftimeError(f"{where}: trained_betas must be {n} finite numbers")
        if not np.allclose(betas, np.linspace(betas[0], betas[-1], n), rtol=1e-5, atol=1e-9):
            raise DifftimeError(
                f"{where}: trained_betas are not linear in the step; difftime maps only linear-beta "
                "DDPMs to a VP SDE (b0 = N beta_1, b1 = N beta_N)"
            )
        start, end = float(betas[0]), float(betas[-1])
    else:
        kind = config.get("beta_schedule", "linear")
        if kind != "linear":
            raise DifftimeError(
                f"{where}: beta_schedule {kind!r} is not supported; difftime maps only linear-beta "
                "DDPMs to a VP SDE (b0 = N beta_1, b1 = N beta_N)"
            )
        start, end = config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
    if config.get("rescale_betas_zero_snr", False):
        raise DifftimeError(
            f"{where}: rescale_betas_zero_snr gives alphas_cumprod = 0 at the last step, which no "
            "VP SDE reaches; use a checkpoint trained without it"
        )
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise DifftimeError(
            f"{where}: prediction_type {prediction!r} is unknown; expected one of {', '.join(PREDICTION_TYPES)}"
        )
    try:
        schedule = DDPMSchedule(n, float(start), float(end))
    except (TypeError, ValueError) as exc:
        raise DifftimeError(f"{where}: {exc}") from None
    err = schedule.kernel_error()
    if not err <= KERNEL_TOL:
        raise DifftimeError(
            f"{where}: the {n}-step DDPM with betas {start:g}..{end:g} departs from the VP SDE "
            f"(b0 = {n * start:g}, b1 = {n * end:g}) by {err:.4f} in the kernel's mean or std, over the tolerance "
            f"{KERNEL_TOL}; too few steps for a continuous-time model"
        )
    return schedule, prediction


def check_unet_config(
    config: dict[str, Any], variance_type: str = "fixed_small", where: str = "unet"
) -> tuple[int, int, int]:
    """The image shape (C, H, W) of an unconditional UNet2DModel config, or a DifftimeError."""
    name = config.get("_class_name", "UNet2DModel")
    if name != "UNet2DModel":
        raise DifftimeError(f"{where}: {name} is not supported; difftime retrofits unconditional UNet2DModel only")
    embedding = config.get("time_embedding_type", "positional")
    if embedding != "positional":
        raise DifftimeError(
            f"{where}: time_embedding_type {embedding!r} is not supported; only 'positional' "
            "embeddings (DDPM) take a fractional training step"
        )
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        raise DifftimeError(f"{where}: class-conditional UNets are not supported; difftime samples unconditionally")
    if config.get("center_input_sample", False):
        raise DifftimeError(f"{where}: center_input_sample = true is not supported; it expects data in [0, 1]")
    c_in, c_out = config.get("in_channels", 3), config.get("out_channels", 3)
    if c_out != c_in and not (c_out == 2 * c_in and variance_type in ("learned", "learned_range")):
        raise DifftimeError(
            f"{where}: out_channels {c_out} != in_channels {c_in}; expected eps of the input's "
            "shape (or eps plus a learned variance)"
        )
    size = config.get("sample_size")
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise DifftimeError(f"{where}: sample_size must be an integer or [H, W], got {config.get('sample_size')!r}")
    return (int(c_in), size[0], size[1])


class DiffusersEps(nn.Module):
    """``model(x, t) -> eps_hat`` around a diffusers ``UNet2DModel`` trained as a linear-beta DDPM.

    t is absolute time in [eps, 1] of the VP SDE ``self.sde``; the UNet is called at the
    fractional training step :meth:`timestep` (t), whose alphas_cumprod equals m(t)^2.
    """

    def __init__(
        self,
        unet: dict[str, Any],
        num_train_timesteps: int,
        beta_start: float,
        beta_end: float,
        prediction_type: str = "epsilon",
    ) -> None:
        super().__init__()
        if prediction_type not in PREDICTION_TYPES:
            raise DifftimeError(
                f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}"
            )
        self.schedule = DDPMSchedule(num_train_timesteps, beta_start, beta_end)
        self.sde = self.schedule.sde()
        self.prediction_type = prediction_type
        try:
            config = {k: v for k, v in unet.items() if not k.startswith("_")}
            self.unet = diffusers_module().UNet2DModel.from_config(config)
        except (TypeError, ValueError, KeyError) as exc:
            raise DifftimeError(f"bad UNet2DModel config: {exc}") from None
        # A plain float64 attribute, not a buffer, so that .half() or .float() cannot coarsen the map.
        self._neg_log_abar = self.schedule.neg_log_alphas_cumprod()

    def timestep(self, t: Tensor) -> Tensor:
        """The fractional training step tau(t) with -log alphas_cumprod(tau) = B(t), in float64."""
        table = self._neg_log_abar.to(t.device)
        target = self.sde.B(t.to(torch.float64))
        hi = torch.searchsorted(table, target).clamp(1, len(table) - 1)
        lo = hi - 1
        frac = (target - table[lo]) / (table[hi] - table[lo])  # linear extrapolation past either end
        return (lo - 1).to(torch.float64) + frac

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if t.dim() == 0:
            t = t.expand(len(x))
        tau = self.timestep(t).to(torch.float32)
        out = self.unet(x.to(self.unet.dtype), tau, return_dict=False)[0]
        out = out[:, : x.shape[1]].to(x.dtype)  # learned-variance UNets append log-variance channels
        if self.prediction_type == "epsilon":
            return out
        m, sigma = broadcast_to(self.sde.m(t).to(x.dtype), x), broadcast_to(self.sde.sigma(t).to(x.dtype), x)
        if self.prediction_type == "v_prediction":  # v = m eps - sigma x0 and x = m x0 + sigma eps
            return m * out + sigma * x
        return (x - m * out) / sigma  # "sample": out is x0

    def extra_repr(self) -> str:
        s = self.schedule
        return (
            f"N={s.num_train_timesteps}, betas={s.beta_start:g}..{s.beta_end:g}, prediction_type={self.prediction_type}"
        )
