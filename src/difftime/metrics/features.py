"""Metrics on feature vectors: Frechet distance, KID, precision/recall, and the reference cache.

Everything is computed in float64.

* Frechet distance between N(mu1, S1) and N(mu2, S2):
  ``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})``. The trace of the matrix square
  root is computed without ``sqrtm``: for any factors S1 = L1 L1^T and S2 = L2 L2^T, the
  eigenvalues of S1 S2 are the squared singular values of L1^T L2, so ``Tr((S1 S2)^{1/2})`` is
  the nuclear norm of L1^T L2. The factors are Cholesky factors (or ``eigh`` square roots for
  singular covariances), or, with fewer samples than dimensions, the centred features
  themselves. That is real by construction (no imaginary parts to discard), accurate for the
  singular covariances that few samples in many dimensions give, and cheap: two Cholesky
  factorizations and one SVD (or only a small SVD when N <= D).
* KID: the unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged
  over random subsets as in Binkowski et al. 2018 and its standard implementations (100 subsets
  of min(1000, N, M) points each); the std over subsets is returned too.
* Precision/recall: Kynkaanniemi et al. 2019. Each real point gets a ball whose radius is the
  distance to its k-th nearest other real point; precision is the fraction of generated points
  inside at least one real ball, recall the fraction of real points inside at least one ball
  of the generated set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difftime import distributed
from difftime.errors import DifftimeError
from difftime.io import load_tensors, save_json, save_tensors

__all__ = [
    "cache_dir",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_features",
    "trace_sqrt_product",
    "kernel_inception_distance",
    "kid_bootstrap",
    "frechet_bootstrap",
    "bootstrap_counts",
    "precision_recall",
    "reference_features",
]

CACHE_ENV = "DIFFTIME_CACHE"
CACHE_FORMAT = 1


def _as_features(x: Any, name: str, min_n: int = 1) -> np.ndarray:
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if a.ndim != 2:
        raise DifftimeError(f"{name} has shape {a.shape}; expected a 2-D array (N, D) of features")
    if a.shape[0] < min_n:
        raise DifftimeError(f"{name} has {a.shape[0]} rows; expected at least {min_n}")
    if not np.isfinite(a).all():
        raise DifftimeError(f"{name} holds NaN or infinite values; expected finite features")
    return a


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of (N, D) features, N >= 2."""
    f = _as_features(features, "features", min_n=2)
    mu = f.mean(axis=0)
    c = f - mu
    sigma = c.T @ c / (f.shape[0] - 1)
    return mu, (sigma + sigma.T) / 2


def _factor(sigma: np.ndarray) -> np.ndarray:
    """A factor L with sigma = L L^T: Cholesky when sigma is positive definite (fast), else the
    symmetric square root from ``eigh`` with round-off negative eigenvalues clipped to 0."""
    sigma = (sigma + sigma.T) / 2
    try:
        return np.linalg.cholesky(sigma)
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(sigma)
        keep = w > 0
        return v[:, keep] * np.sqrt(w[keep])


def _trace_sqrt_from_factors(l1: np.ndarray, l2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) for S1 = L1 L1^T, S2 = L2 L2^T: the nuclear norm of L1^T L2.

    (L1^T L2)(L1^T L2)^T = L1^T S2 L1 has the nonzero eigenvalues of S2 L1 L1^T = S2 S1, so the
    singular values of L1^T L2 are the square roots of the eigenvalues of S1 S2; no matrix
    square root, no complex round-off, and exact zeros stay (nearly) zero.
    """
    return float(np.linalg.svd(l1.T @ l2, compute_uv=False).sum())


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2."""
    return _trace_sqrt_from_factors(_factor(np.asarray(sigma1, np.float64)), _factor(np.asarray(sigma2, np.float64)))


def _check_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> tuple[np.ndarray, ...]:
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise DifftimeError(
            f"frechet_distance: shapes mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 "
            f"{sigma2.shape}; expected (D,), (D, D), (D,), (D, D)"
        )
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise DifftimeError(f"frechet_distance: {name} holds NaN or infinite values")
    return mu1, sigma1, mu2, sigma2


def _fd(mu1: np.ndarray, tr1: float, l1: np.ndarray, mu2: np.ndarray, tr2: float, l2: np.ndarray) -> float:
    diff = mu1 - mu2
    value = diff @ diff + tr1 + tr2 - 2.0 * _trace_sqrt_from_factors(l1, l2)
    # Round-off can leave a tiny negative number for identical statistics; FD is >= 0.
    return max(float(value), 0.0)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet (2-Wasserstein squared) distance between N(mu1, S1) and N(mu2, S2), in float64:
    ``||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})``."""
    mu1, sigma1, mu2, sigma2 = _check_stats(mu1, sigma1, mu2, sigma2)
    return _fd(mu1, float(np.trace(sigma1)), _factor(sigma1), mu2, float(np.trace(sigma2)), _factor(sigma2))


def _gaussian_parts(
    features: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, float, np.ndarray]:
    """Mean, covariance trace and a covariance factor. With N <= D samples the centred data
    itself is an exact factor (S = Xc^T Xc / (N - 1)), which skips every D x D decomposition."""
    n, d = features.shape
    if n <= d:
        mu = features.mean(axis=0)
        l = (features - mu).T / np.sqrt(n - 1)
        return mu, float(np.sum(l * l)), l
    mu, sigma = stats if stats is not None else feature_statistics(features)
    return mu, float(np.trace(sigma)), _factor(sigma)


def frechet_distance_features(
    f1: Any, f2: Any, *, stats1: tuple[np.ndarray, np.ndarray] | None = None,
    stats2: tuple[np.ndarray, np.ndarray] | None = None,
) -> float:
    """FD between the Gaussian fits (mean, unbiased covariance) of two (N, D) feature sets.

    ``stats1``/``stats2`` may pass precomputed ``feature_statistics`` (e.g. cached reference
    statistics) to save recomputing a large covariance.
    """
    a = _as_features(f1, "features 1", min_n=2)
    b = _as_features(f2, "features 2", min_n=2)
    if a.shape[1] != b.shape[1]:
        raise DifftimeError(f"FD: feature dims differ ({a.shape[1]} vs {b.shape[1]}); expected the same extractor")
    return _fd(*_gaussian_parts(a, stats1), *_gaussian_parts(b, stats2))


def _poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    m = x.shape[0]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2.0 * kxy.mean())


def kernel_inception_distance(
    f1: Any, f2: Any, *, n_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: mean and std over ``n_subsets`` of the unbiased polynomial-kernel MMD^2.

    Each subset draws min(subset_size, N1, N2) points without replacement from each set; an
    unbiased estimate, so it can be negative when the sets come from one distribution.
    """
    a = _as_features(f1, "features 1", min_n=2)
    b = _as_features(f2, "features 2", min_n=2)
    if a.shape[1] != b.shape[1]:
        raise DifftimeError(f"KID: feature dims differ ({a.shape[1]} vs {b.shape[1]}); expected the same extractor")
    if n_subsets < 1 or subset_size < 2:
        raise DifftimeError(f"KID: n_subsets={n_subsets}, subset_size={subset_size}; expected >= 1 and >= 2")
    m = min(subset_size, a.shape[0], b.shape[0])
    rng = np.random.default_rng(seed)
    vals = np.empty(n_subsets)
    for i in range(n_subsets):
        vals[i] = _poly_mmd2(a[rng.choice(a.shape[0], m, replace=False)], b[rng.choice(b.shape[0], m, replace=False)])
    return float(vals.mean()), float(vals.std(ddof=1)) if n_subsets > 1 else float("nan")


def bootstrap_counts(n: int, replicates: int, seed: int = 0) -> np.ndarray:
    """(replicates, n) multinomial resampling counts of n rows, a function of (n, replicates, seed)
    only. Every sample set of size n scored with the same seed is resampled with the same counts,
    so for two sets whose rows are paired (row i of both started from the same x_T noise) the
    replicate differences are a paired bootstrap of the difference of their scores."""
    if n < 2 or replicates < 2:
        raise DifftimeError(f"bootstrap needs n >= 2 rows and >= 2 replicates, got n={n}, replicates={replicates}")
    rng = np.random.default_rng([seed, n, replicates])
    return rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64)


_KYY_CACHE: dict[str, float] = {}


def _kyy_offdiag_mean(y: torch.Tensor, block: int = 1024) -> float:
    """mean_{j != j'} k(y_j, y_j') for the cubic kernel, in blocks (the reference's own term, the
    same for every sample set scored against it, so it is computed once per process)."""
    key = hashlib.sha256(y.numpy().tobytes()).hexdigest()
    if key not in _KYY_CACHE:
        m, d = y.shape
        total = 0.0
        for s in range(0, m, block):
            k = (y[s:s + block] @ y.T / d + 1.0) ** 3
            total += float(k.sum()) - float(torch.diagonal(k, offset=s).sum())
        _KYY_CACHE[key] = total / (m * (m - 1))
    return _KYY_CACHE[key]


def kid_bootstrap(f1: Any, f2: Any, counts: np.ndarray, block: int = 1024) -> tuple[float, np.ndarray]:
    """KID as the full unbiased U-statistic over every pair (the same expectation as the subset
    mean of ``kernel_inception_distance`` with less variance), and its bootstrap replicates.

    Replicate b resamples the rows of ``f1`` with ``counts[b]`` (w) and keeps the reference ``f2``
    fixed: xx_b = (w^T Kxx w - w . diag Kxx) / (n (n - 1)) (the U-statistic over distinct draw
    positions), xy_b = w . mean_j Kxy / n, KID_b = xx_b + yy - 2 xy_b. Their spread is the sampling
    noise of the score given this reference, which is what a comparison of cells against one
    reference needs.
    """
    a = torch.from_numpy(_as_features(f1, "features 1", min_n=2))
    b = torch.from_numpy(_as_features(f2, "features 2", min_n=2))
    if a.shape[1] != b.shape[1]:
        raise DifftimeError(f"KID: feature dims differ ({a.shape[1]} vs {b.shape[1]}); expected the same extractor")
    w = torch.from_numpy(np.asarray(counts, np.float64))
    n, d = a.shape
    if w.dim() != 2 or w.shape[1] != n:
        raise DifftimeError(f"bootstrap counts have shape {tuple(w.shape)}; expected (replicates, {n})")
    kxx = (a @ a.T / d + 1.0) ** 3
    diag = kxx.diagonal()
    kxy_mean = torch.cat([((a[s:s + block] @ b.T / d + 1.0) ** 3).mean(1) for s in range(0, n, block)])
    yy = _kyy_offdiag_mean(b, block)
    value = (float(kxx.sum()) - float(diag.sum())) / (n * (n - 1)) + yy - 2.0 * float(kxy_mean.mean())
    xx_b = (((w @ kxx) * w).sum(1) - w @ diag) / (n * (n - 1))
    reps = xx_b + yy - 2.0 * (w @ kxy_mean) / n
    return value, reps.numpy()


def frechet_bootstrap(f1: Any, counts: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """Bootstrap replicates of the FD of ``f1`` against fixed reference statistics: replicate b
    fits the weighted mean and covariance of the rows of ``f1`` resampled with ``counts[b]``."""
    a = _as_features(f1, "features 1", min_n=2)
    mu2, sigma2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    tr2, l2 = float(np.trace(sigma2)), _factor(sigma2)
    n, d = a.shape
    out = np.empty(len(counts))
    for i, w in enumerate(np.asarray(counts, np.float64)):
        mu = w @ a / n
        c = a - mu
        if n <= d:
            # sigma = (W^1/2 c)^T (W^1/2 c) / (n - 1): that (d, n) matrix is itself a factor, so
            # fewer samples than features (Inception's 2048) need no d x d decomposition per replicate.
            factor = (c * np.sqrt(w / (n - 1))[:, None]).T
            out[i] = _fd(mu, float((factor * factor).sum()), factor, mu2, tr2, l2)
        else:
            sigma = (c.T * w) @ c / (n - 1)
            out[i] = _fd(mu, float(np.trace(sigma)), _factor(sigma), mu2, tr2, l2)
    return out


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp_(min=0.0)


def _kth_radii(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Squared distance from each row to its k-th nearest *other* row."""
    out = torch.empty(x.shape[0], dtype=x.dtype)
    for s in range(0, x.shape[0], block):
        d = _sq_dists(x[s:s + block], x)
        rows = torch.arange(d.shape[0])
        d[rows, rows + s] = -1.0  # the point itself is the smallest, so it is skipped below
        out[s:s + block] = torch.topk(d, k + 1, dim=1, largest=False).values[:, k]
    return out


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    """Fraction of ``points`` within distance radius_j of some centre j (squared, with a
    relative round-off allowance so a point exactly on a sphere counts as inside)."""
    cn = (centres * centres).sum(1)
    inside = 0
    for s in range(0, points.shape[0], block):
        p = points[s:s + block]
        d = _sq_dists(p, centres)
        tol = 1e-10 * ((p * p).sum(1)[:, None] + cn[None, :])
        inside += int((d <= radii[None, :] + tol).any(1).sum())
    return inside / points.shape[0]


def precision_recall(real: Any, fake: Any, k: int = 3, block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds."""
    if not isinstance(k, int) or k < 1:
        raise DifftimeError(f"precision_recall: k={k!r}; expected an integer >= 1")
    r = torch.from_numpy(_as_features(real, "reference features", min_n=k + 1))
    f = torch.from_numpy(_as_features(fake, "sample features", min_n=k + 1))
    if r.shape[1] != f.shape[1]:
        raise DifftimeError(f"precision_recall: feature dims differ ({r.shape[1]} vs {f.shape[1]})")
    precision = _coverage(f, r, _kth_radii(r, k, block), block)
    recall = _coverage(r, f, _kth_radii(f, k, block), block)
    return precision, recall


# --------------------------------------------------------------------------------------
# Reference feature cache
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """``$DIFFTIME_CACHE`` or ``~/.cache/difftime``; reference statistics live in ``reference/``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "difftime") / "reference"


def reference_features(
    key_fields: dict[str, Any],
    compute: Callable[[], np.ndarray],
    *,
    use_cache: bool = True,
    shard: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Reference features, mean and covariance, from the cache or by ``compute()``.

    ``key_fields`` must name everything the features depend on (dataset spec, split, N, the
    extractor's name and hash, its preprocessing); its canonical JSON hashes to the file name.
    Entries are written atomically (safetensors + JSON) and checked by sha256 when read; an
    entry that fails the check is recomputed and overwritten. With ``shard`` (every torchrun rank
    calling, ``compute`` shared among them) rank 0 decides whether the entry is usable, so every
    rank computes or every rank reads, and rank 0 writes.
    """
    fields = {**key_fields, "format": CACHE_FORMAT}
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{fields.get('dataset', 'data')}-{fields.get('split', '')}")
    stem = f"{stem}-n{fields.get('n', '')}-{key[:16]}"
    base = cache_dir()
    tpath, jpath = base / f"{stem}.safetensors", base / f"{stem}.json"
    info = {"path": str(tpath), "hit": False, "key": key}

    def cached() -> dict[str, torch.Tensor] | None:
        if use_cache and tpath.is_file() and jpath.is_file():
            try:
                meta = json.loads(jpath.read_text())
                if meta.get("key") == key and meta.get("fields") == json.loads(json.dumps(fields)):
                    return load_tensors(tpath, meta.get("sha256"))
            except (OSError, ValueError):  # DifftimeError is a ValueError: a corrupt entry is recomputed
                pass
        return None

    usable = distributed.on_main(lambda: cached() is not None) if shard else True
    t = cached() if usable else None
    if t is not None:
        info["hit"] = True
        return t["features"].numpy().astype(np.float64), t["mu"].numpy(), t["sigma"].numpy(), info
    feats = np.ascontiguousarray(compute(), dtype=np.float64)
    mu, sigma = feature_statistics(feats) if feats.shape[0] >= 2 else (feats.mean(0), np.zeros((0, 0)))
    if use_cache and (not shard or distributed.is_main()):
        try:
            f32 = feats.astype(np.float32)  # extractors emit float32, so this is usually exact
            stored = f32 if np.array_equal(f32.astype(np.float64), feats) else feats
            sha = save_tensors(tpath, {"features": torch.from_numpy(stored), "mu": torch.from_numpy(mu),
                                       "sigma": torch.from_numpy(np.ascontiguousarray(sigma))})
            save_json(jpath, {"key": key, "fields": fields, "sha256": sha})
        except OSError as exc:  # an unwritable cache only costs time
            info["error"] = str(exc)
    return feats, mu, sigma, info
