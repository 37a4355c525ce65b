"""Independent random streams derived from one seed, and the rule that keeps them device-independent.

The rule: every random draw of difftime comes from a ``torch.Generator`` on its own device (a CPU
generator, ``torch.Generator().manual_seed(seed)``, everywhere in the library) and is then moved to
the device that uses it. CUDA's generator (Philox) and the CPU's (Mersenne Twister) give different
numbers for one seed, so drawing on the tensor's device would make a seed mean different samples on
a GPU; drawn on the CPU and moved, a seed gives the same x_T, noise, time draws and probes on every
device, and results agree up to float error. ``generator=None`` draws from the CPU's global stream.
The one exception is dropout in training, which draws from the global stream of the device the
network runs on (the trainer checkpoints it). The draw helpers below are the one place that applies
the rule: code that needs random numbers on a device calls them instead of
``torch.randn(..., generator=g, device=x.device)``, which also fails outright when ``g`` is a CPU
generator and ``x`` lives on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

Shape = int | Sequence[int] | torch.Size


def stream_seed(seed: int, stream: int) -> int:
    """Independent 63-bit seeds for the training and evaluation randomness of one ``seed``."""
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1, np.uint64)[0] >> 1)


def _source(generator: torch.Generator | None) -> torch.device:
    """Where the draws of ``generator`` are made: its own device (the CPU's global stream for None)."""
    return generator.device if generator is not None else torch.device("cpu")


def _to(x: Tensor, device: torch.device | str | None) -> Tensor:
    return x if device is None else x.to(device)


def randn_on(shape: Shape, generator: torch.Generator | None = None, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> Tensor:
    """Standard normals of ``shape`` drawn on the generator's device, then moved to ``device`` (module rule).

    >>> import torch
    >>> from difftime.rng import randn_on
    >>> z = randn_on((2, 3), torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> bool(torch.equal(z, torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)))
    True
    """
    return _to(torch.randn(shape, generator=generator, dtype=dtype, device=_source(generator)), device)


def randn_like_on(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Standard normals shaped like ``x``, in its dtype and on its device, drawn by the module rule.

    >>> import torch
    >>> from difftime.rng import randn_like_on
    >>> x = torch.zeros(2, 3, dtype=torch.float64)
    >>> z = randn_like_on(x, torch.Generator().manual_seed(0))
    >>> z.dtype, z.device, bool(torch.equal(z, torch.randn(2, 3, generator=torch.Generator().manual_seed(0),
    ...                                                     dtype=torch.float64)))
    (torch.float64, device(type='cpu'), True)
    """
    return randn_on(x.shape, generator, dtype=x.dtype, device=x.device)


def rand_on(shape: Shape, generator: torch.Generator | None = None, *, dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None) -> Tensor:
    """Uniforms on [0, 1) of ``shape``, drawn by the module rule.

    >>> import torch
    >>> from difftime.rng import rand_on
    >>> u = rand_on(4, torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> tuple(u.shape), bool(((u >= 0) & (u < 1)).all())
    ((4,), True)
    """
    return _to(torch.rand(shape, generator=generator, dtype=dtype, device=_source(generator)), device)


def randint_on(high: int, shape: Shape, generator: torch.Generator | None = None, *,
               device: torch.device | str | None = None) -> Tensor:
    """Integers in [0, high) of ``shape`` (int64), drawn by the module rule.

    >>> import torch
    >>> from difftime.rng import randint_on
    >>> sorted(set(randint_on(2, (100,), torch.Generator().manual_seed(0)).tolist()))
    [0, 1]
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    return _to(torch.randint(0, int(high), shape, generator=generator, device=_source(generator)), device)
