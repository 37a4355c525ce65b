"""The exponential moving average of the weights, with a warm-up of its decay.

Update n (n >= 1 updates already averaged; the first update copies the weights) uses

    decay_n = min(decay, (1 + n) / (10 + n))

(TensorFlow's ``ExponentialMovingAverage(num_updates=n)``). Without the warm-up the first
weights keep decay^n of the average: 0.999^2000 = 13.5% after 2,000 updates, enough to make a
short run's EMA network sample pure noise (measured: docs/design.md §4). With it their share falls
below 1e-20 within 2,000 updates at decay 0.999.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor


def ema_decay_at(decay: float, n: int, warmup: bool = True) -> float:
    """The decay of the update that follows ``n`` averaged updates."""
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


def initial_weight_share(decay: float, n_averaged: int, warmup: bool = True) -> float:
    """The weight the EMA still gives to the first averaged weights after ``n_averaged`` updates."""
    if not warmup:
        return decay ** max(n_averaged - 1, 0)
    factors = [ema_decay_at(decay, k) for k in range(1, min(n_averaged, 100_000))]
    if min(factors, default=1.0) == 0.0:  # decay 0: the average is the latest weights alone
        return 0.0
    return math.exp(sum(math.log(f) for f in factors))


def ema_update(decay: float, warmup: bool = True) -> Callable[[list[Tensor], list[Tensor], Tensor | int], None]:
    """A ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel`` with the warmed-up decay."""

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor | int) -> None:
        torch._foreach_lerp_(averaged, current, 1.0 - ema_decay_at(decay, int(num_averaged), warmup))

    return update
