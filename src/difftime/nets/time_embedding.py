"""Fourier features of absolute diffusion time."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class FourierTime(nn.Module):
    """sin/cos of t at geometrically spaced frequencies from 1 to ``max_freq`` (in units of 2 pi).

    The frequencies are fixed, not learned, so the same t always means the same thing, and a
    network trained on [eps, 1] is queried on any sub-horizon without rescaling.
    """

    freqs: Tensor

    def __init__(self, dim: int, max_freq: float = 1000.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        half = dim // 2
        freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), half)) * 2 * math.pi
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        angles = t.float()[:, None] * self.freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)
