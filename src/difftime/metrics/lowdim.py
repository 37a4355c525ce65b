"""Sample-quality metrics for low-dimensional vector data (2-D toys, small Gaussians).

* ``mmd_rbf``: the unbiased estimate of MMD^2 with a Gaussian RBF kernel
  k(x, y) = exp(-||x - y||^2 / (2 h^2)), the bandwidth h by the median heuristic (median
  pairwise distance of the pooled sample, on a seeded subsample of at most 2000 points). It is
  unbiased, so it scatters around 0 (and can be negative) when both sets share a distribution.
* ``sliced_wasserstein``: the mean over random unit directions theta (seeded) of the exact 1-D
  Wasserstein-1 distance between the projections theta.x and theta.y, computed from sorted
  samples (quantile functions; sets of different sizes are handled exactly). Its standard
  error over directions is returned too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from difftime.errors import DifftimeError

__all__ = ["median_bandwidth", "mmd_rbf", "random_directions", "sliced_wasserstein", "wasserstein_1d"]


def _as_points(x: Any, name: str, min_n: int = 1) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise DifftimeError(f"{name} has shape {a.shape}; expected (N, D) points")
    if a.shape[0] < min_n:
        raise DifftimeError(f"{name} has {a.shape[0]} points; expected at least {min_n}")
    if not np.isfinite(a).all():
        raise DifftimeError(f"{name} holds NaN or infinite values; expected finite points")
    return a


def median_bandwidth(x: Any, y: Any, seed: int = 0, max_points: int = 2000) -> float:
    """Median pairwise Euclidean distance of the pooled sample (seeded subsample)."""
    z = np.concatenate([_as_points(x, "x"), _as_points(y, "y")])
    if z.shape[0] > max_points:
        z = z[np.random.default_rng(seed).choice(z.shape[0], max_points, replace=False)]
    t = torch.from_numpy(z)
    d = torch.cdist(t, t)
    iu = torch.triu_indices(len(z), len(z), offset=1)
    h = float(d[iu[0], iu[1]].median()) if len(z) > 1 else 0.0
    return h if h > 0 else 1.0


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, gamma: float, block: int = 2048) -> float:
    total = 0.0
    for s in range(0, a.shape[0], block):
        d2 = torch.cdist(a[s:s + block], b).square_()
        total += float(torch.exp(d2.mul_(-gamma)).sum())
    return total


def mmd_rbf(x: Any, y: Any, bandwidth: float | None = None, seed: int = 0) -> tuple[float, float]:
    """Unbiased MMD^2 between point sets (N, D) and (M, D); returns (MMD^2, bandwidth used)."""
    a = torch.from_numpy(_as_points(x, "samples", min_n=2))
    b = torch.from_numpy(_as_points(y, "reference", min_n=2))
    if a.shape[1] != b.shape[1]:
        raise DifftimeError(f"mmd: dimensions differ ({a.shape[1]} vs {b.shape[1]})")
    h = median_bandwidth(a, b, seed) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise DifftimeError(f"mmd: bandwidth={bandwidth!r}; expected a number > 0")
    gamma = 1.0 / (2.0 * h * h)
    n, m = a.shape[0], b.shape[0]
    kxx = (_kernel_sum(a, a, gamma) - n) / (n * (n - 1))  # k(x, x) = 1 on the diagonal
    kyy = (_kernel_sum(b, b, gamma) - m) / (m * (m - 1))
    kxy = _kernel_sum(a, b, gamma) / (n * m)
    return kxx + kyy - 2.0 * kxy, h


def random_directions(dim: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors uniform on the sphere in R^dim, from ``np.random.default_rng(seed)``."""
    g = np.random.default_rng(seed).standard_normal((n, dim))
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def wasserstein_1d(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Exact W1 between empirical distributions, row by row: u (P, N), v (P, M) -> (P,).

    W1 = integral over q in (0, 1) of |F_u^{-1}(q) - F_v^{-1}(q)|; both quantile functions are
    step functions with jumps at i/N and j/M, so the integral is a finite sum.
    """
    us, vs = np.sort(u, axis=1), np.sort(v, axis=1)
    n, m = us.shape[1], vs.shape[1]
    if n == m:
        return np.abs(us - vs).mean(axis=1)
    q = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)
    q = q[q <= 1.0]
    w = np.diff(np.concatenate([[0.0], q]))
    mid = q - w / 2
    iu = np.minimum((mid * n).astype(np.int64), n - 1)
    iv = np.minimum((mid * m).astype(np.int64), m - 1)
    return (np.abs(us[:, iu] - vs[:, iv]) * w).sum(axis=1)


def sliced_wasserstein(
    x: Any, y: Any, n_projections: int = 512, seed: int = 0
) -> tuple[float, float]:
    """Sliced Wasserstein-1 distance and its standard error over the random directions."""
    a = _as_points(x, "samples")
    b = _as_points(y, "reference")
    if a.shape[1] != b.shape[1]:
        raise DifftimeError(f"swd: dimensions differ ({a.shape[1]} vs {b.shape[1]})")
    if not isinstance(n_projections, int) or n_projections < 1:
        raise DifftimeError(f"swd: n_projections={n_projections!r}; expected an integer >= 1")
    theta = random_directions(a.shape[1], n_projections, seed)
    w = np.empty(n_projections)
    for s in range(0, n_projections, 64):  # bounded memory: 64 projections of both sets at a time
        th = theta[s:s + 64]
        w[s:s + 64] = wasserstein_1d(th @ a.T, th @ b.T)
    se = float(w.std(ddof=1) / np.sqrt(n_projections)) if n_projections > 1 else float("nan")
    return float(w.mean()), se
