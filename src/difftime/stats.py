"""Differences of per-example estimates, with standard errors and normal intervals.

It imports nothing of difftime (torch and math only) and sits in layer 2 of docs/design.md §1, so
the likelihood code beside it, the measurements and the study can all use it. "Paired" means both
estimates were made on the same examples with the same random draws (common random numbers), so
each example gives one difference and the standard error is that of the mean difference: whatever
the two estimates share cancels example by example.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

ArrayLike = Tensor | Sequence[float]


@dataclass(frozen=True)
class Difference:
    """The mean of a - b with its standard error and a normal ``level`` interval [lo, hi]."""

    mean: float
    se: float
    lo: float
    hi: float
    n: int
    level: float = 0.95
    paired: bool = True

    @property
    def resolved(self) -> bool:
        """True when the interval excludes zero: the sign of the difference is resolved."""
        return self.lo > 0 or self.hi < 0

    def to_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def _values(a: ArrayLike, name: str) -> Tensor:
    values = torch.as_tensor(a, dtype=torch.float64).detach().cpu()
    if values.dim() != 1 or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of per-example values, got shape "
                         f"{tuple(values.shape)}")
    return values


def normal_quantile(level: float) -> float:
    """The z with P(|N(0,1)| <= z) = level, e.g. 1.95996 for 0.95."""
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    return float(torch.special.ndtri(torch.tensor(0.5 + level / 2, dtype=torch.float64)))


def mean_se(values: ArrayLike) -> tuple[float, float]:
    """The mean of 1-D per-example values and its standard error sd/sqrt(n), in float64 (nan for one value)."""
    values = torch.as_tensor(values).detach().to(torch.float64)
    n = len(values)
    se = float(values.std(correction=1)) / math.sqrt(n) if n > 1 else math.nan
    return float(values.mean()), se


def row_standard_errors(draws: Tensor) -> Tensor:
    """sd/sqrt(n) of the draws over the last dimension, one per row (nan for one draw); for
    stratified draws an upper bound."""
    if draws.shape[-1] < 2:
        return torch.full(draws.shape[:-1], math.nan, dtype=torch.float64, device=draws.device)
    return draws.std(-1, correction=1) / math.sqrt(draws.shape[-1])


def _interval(mean: float, se: float, n: int, level: float, paired: bool) -> Difference:
    half = normal_quantile(level) * se
    return Difference(mean=mean, se=se, lo=mean - half, hi=mean + half, n=n, level=level, paired=paired)


def paired_difference(a: ArrayLike, b: ArrayLike, level: float = 0.95) -> Difference:
    """mean(a - b) for per-example values on the same examples and draws; se = sd(a - b)/sqrt(n).

    One example gives a nan standard error (and interval).
    """
    a, b = _values(a, "a"), _values(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same examples: got {len(a)} and {len(b)} values")
    mean, se = mean_se(a - b)
    return _interval(mean, se, len(a), level, paired=True)


def unpaired_difference(a: ArrayLike, b: ArrayLike, level: float = 0.95) -> Difference:
    """mean(a) - mean(b) for independent estimates; se = sqrt(var a / n_a + var b / n_b)."""
    a, b = _values(a, "a"), _values(b, "b")
    if len(a) < 2 or len(b) < 2:
        se = math.nan
    else:
        se = math.sqrt(float(a.var(correction=1)) / len(a) + float(b.var(correction=1)) / len(b))
    return _interval(float(a.mean() - b.mean()), se, min(len(a), len(b)), level, paired=False)


def adjacent_differences(values: Tensor, level: float = 0.95) -> list[Difference]:
    """Paired differences values[k + 1] - values[k] of a (K, B) table of per-example values (K grid points)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.dim() != 2:
        raise ValueError(f"values must be (K, B) per-example values, got shape {tuple(values.shape)}")
    return [paired_difference(values[k + 1], values[k], level) for k in range(len(values) - 1)]


def replicate_difference(value_a: float, value_b: float, reps_a: ArrayLike, reps_b: ArrayLike,
                         level: float = 0.95) -> Difference:
    """value_a - value_b for two scores with bootstrap replicates drawn with the same resampling
    counts (``difftime.metrics.features.bootstrap_counts``); se = sd(reps_a - reps_b).

    When the two sample sets share their rows' x_T seeds the replicates are paired and whatever
    the two sets share cancels; for unrelated sets the same counts still resample each set
    uniformly, and the se approaches sqrt(se_a^2 + se_b^2). ``n`` is the number of replicates.
    """
    a, b = _values(reps_a, "reps_a"), _values(reps_b, "reps_b")
    if a.shape != b.shape:
        raise ValueError(f"replicates must come from the same resampling counts: got {len(a)} and {len(b)}")
    se = float((a - b).std(correction=1)) if len(a) > 1 else math.nan
    return _interval(float(value_a) - float(value_b), se, len(a), level, paired=True)
