"""Raw data <-> model space: the affine map and the uniform dequantization of discrete data."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from difftime.errors import located_error as _err
from difftime.rng import rand_on

# Bins narrower than this many float32 ulps (at the largest |x|) cannot round-trip reliably.
_MIN_BIN_ULPS = 64
_F32_EPS = float(np.finfo(np.float32).eps)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))



@dataclass(frozen=True)
class Scaler:
    """Maps raw data to model space and back, and records the dequantization facts.

    Discrete data (``levels`` = L): a raw level k becomes y = (k + u) / L in [0, 1) with
    u ~ U[0, 1) (uniform dequantization, so a continuous density on x bounds the discrete
    likelihood), then x = a * y + b. Continuous data (``levels`` None): x = a * raw + b.
    The affine map is scalar so its log-determinant is simply ``D * log(a)``.
    """

    levels: int | None
    a: float
    b: float

    def __post_init__(self) -> None:
        levels = self.levels
        if levels is not None:
            if (
                not isinstance(levels, (int, np.integer))
                or isinstance(levels, (bool, np.bool_))
                or levels < 2
            ):
                raise _err(
                    "Scaler",
                    f"levels={levels!r} is invalid; expected an integer >= 2, or None for continuous data",
                )
            object.__setattr__(self, "levels", int(levels))
        for key in ("a", "b"):
            v = getattr(self, key)
            if not _is_number(v) or not math.isfinite(float(v)):
                raise _err("Scaler", f"{key}={v!r} is invalid; expected a finite number")
            object.__setattr__(self, key, float(v))
        if not self.a > 0:
            raise _err("Scaler", f"a={self.a!r} is invalid; expected a > 0 (x = a*y + b must preserve order)")
        if self.levels is not None:
            span = max(1.0, abs(self.b), abs(self.a + self.b))
            if self.a / self.levels < _MIN_BIN_ULPS * _F32_EPS * span:
                raise _err(
                    "Scaler",
                    f"levels={self.levels}, a={self.a}, b={self.b} give bins of width "
                    f"{self.a / self.levels:.3g} that "
                    f"float32 cannot resolve over |x| <= {span:.3g}; expected a/levels >= "
                    f"{_MIN_BIN_ULPS * _F32_EPS * span:.3g}",
                )

    @property
    def discrete(self) -> bool:
        return self.levels is not None

    def _levels_of(self, raw: Tensor) -> Tensor:
        """Validated levels as float64: a bad level would silently land in a wrong bin."""
        assert self.levels is not None
        if raw.is_complex():
            raise _err(
                "Scaler.encode",
                f"got a complex tensor ({raw.dtype}); expected integer levels 0..{self.levels - 1}",
            )
        k = raw.to(torch.float64)
        if k.numel() == 0:
            return k
        if raw.is_floating_point() and not bool(torch.all(torch.isfinite(k) & (k == torch.floor(k)))):
            raise _err(
                "Scaler.encode",
                f"got non-integer values in a {raw.dtype} tensor; expected integer levels "
                f"0..{self.levels - 1}",
            )
        lo, hi = float(k.min()), float(k.max())
        if lo < 0 or hi > self.levels - 1:
            raise _err(
                "Scaler.encode",
                f"levels range over [{lo:g}, {hi:g}]; expected integers in 0..{self.levels - 1}",
            )
        return k

    def encode(
        self, raw: Tensor, generator: torch.Generator | None = None, dequantize: bool = True
    ) -> Tensor:
        """Raw data -> float32 model space; dequantization noise comes from ``generator``.

        With ``dequantize=False`` discrete levels go to bin centres (u = 0.5): deterministic,
        for evaluation and plots. The result always decodes back to the input levels.
        """
        if not isinstance(raw, Tensor):
            raise _err("Scaler.encode", f"got {type(raw).__name__}; expected a torch.Tensor")
        if self.levels is None:
            if raw.is_complex():
                raise _err("Scaler.encode", f"got a complex tensor ({raw.dtype}); expected real values")
            return (raw.to(torch.float64) * self.a + self.b).to(torch.float32)
        k = self._levels_of(raw)
        if dequantize:
            u = rand_on(k.shape, generator, dtype=torch.float64, device=k.device)
        else:
            u = torch.full_like(k, 0.5)
        x = (self.a * (k + u) / self.levels + self.b).to(torch.float32)
        # Rounding to float32 can push a value that sat within an ulp of a bin edge across it;
        # such values (probability ~1e-7) are moved to the bin centre so decode(encode(k)) == k.
        bad = self._floor_level(x) != k
        if bool(bad.any()):
            centre = (self.a * (k + 0.5) / self.levels + self.b).to(torch.float32)
            x = torch.where(bad, centre, x)
        return x

    def decode(self, x: Tensor) -> Tensor:
        """Model space -> raw data; discrete output is clamped to valid levels (NaN -> 0)."""
        if self.levels is None:
            return ((x.to(torch.float64) - self.b) / self.a).to(torch.float32)
        top = self.levels - 1
        k = torch.nan_to_num(self._floor_level(x), nan=0.0, posinf=float(top), neginf=0.0).clamp_(0, top)
        return k.to(torch.uint8 if self.levels <= 256 else torch.int64)

    def _floor_level(self, x: Tensor) -> Tensor:
        """Unclamped float64 level of x; encode and decode must agree on it exactly."""
        assert self.levels is not None
        return torch.floor((x.to(torch.float64) - self.b) / self.a * self.levels)

    def to_dict(self) -> dict[str, Any]:
        return {"levels": self.levels, "a": self.a, "b": self.b}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scaler:
        if not isinstance(d, Mapping) or set(d) != {"levels", "a", "b"}:
            got = sorted(map(str, d)) if isinstance(d, Mapping) else type(d).__name__
            raise _err(
                "Scaler.from_dict", f"got {got}; expected a mapping with exactly the keys a, b, levels"
            )
        return cls(levels=d["levels"], a=d["a"], b=d["b"])
