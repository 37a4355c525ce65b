"""Generated sources: ``toy:NAME[:params]`` and ``gaussian[:params]``, with their key=value parameters.

``seed`` drives them; the train and test splits come from independent streams.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from difftime.data.dataset import Dataset, _vector_dataset
from difftime.errors import located_error as _err
from difftime.scaler import Scaler


def _number(s: str, kind: type, rule: str, ok: Callable[[Any], bool]) -> Any:
    try:
        v = kind(s)
    except ValueError:
        v = None
    if v is None or not math.isfinite(v) or not ok(v):
        raise ValueError(f"expected {rule}")
    return v


def _pos_int(s: str) -> int:
    return _number(s, int, "an integer >= 1", lambda v: v >= 1)


def _finite(s: str) -> float:
    return _number(s, float, "a finite number", lambda v: True)


def _nonneg(s: str) -> float:
    return _number(s, float, "a number >= 0", lambda v: v >= 0)


def _pos(s: str) -> float:
    return _number(s, float, "a number > 0", lambda v: v > 0)


def _unit_open(s: str) -> float:
    return _number(s, float, "a number in (0, 1)", lambda v: 0 < v < 1)


def _parse_params(spec: str, text: str, allowed: Mapping[str, Callable[[str], Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not text.strip():
        return out
    for item in text.split(","):
        key, eq, val = (part.strip() for part in item.partition("="))
        if not eq or not key or not val:
            raise _err(spec, f"parameter {item.strip()!r} is not key=value; expected e.g. n=20000,noise=0.05")
        if key not in allowed:
            raise _err(spec, f"unknown parameter {key!r}; expected some of {', '.join(allowed)}")
        if key in out:
            raise _err(spec, f"parameter {key!r} is given twice; expected each at most once")
        try:
            out[key] = allowed[key](val)
        except ValueError as exc:
            raise _err(spec, f"{key}={val!r} is invalid; {exc}") from None
    return out


def _split_rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Independent streams, so the test split does not change when n changes."""
    train_ss, test_ss = np.random.SeedSequence(seed).spawn(2)
    return np.random.default_rng(train_ss), np.random.default_rng(test_ss)


_ToyFn = Callable[[np.random.Generator, int, dict[str, Any]], tuple[np.ndarray, "np.ndarray | None"]]


def _moons(rng: np.random.Generator, n: int, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    lab = rng.integers(0, 2, n)
    t = rng.uniform(0.0, math.pi, n)
    upper = np.stack([np.cos(t), np.sin(t)], 1)
    lower = np.stack([1.0 - np.cos(t), 0.5 - np.sin(t)], 1)
    x = np.where(lab[:, None] == 0, upper, lower) + p["noise"] * rng.standard_normal((n, 2))
    return x, lab


def _circles(rng: np.random.Generator, n: int, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    lab = rng.integers(0, 2, n)
    t = rng.uniform(0.0, 2 * math.pi, n)
    r = np.where(lab == 0, 1.0, p["factor"])
    x = r[:, None] * np.stack([np.cos(t), np.sin(t)], 1) + p["noise"] * rng.standard_normal((n, 2))
    return x, lab


def _swissroll(rng: np.random.Generator, n: int, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray | None]:
    # The (x, z) plane of sklearn's 3-D make_swiss_roll.
    t = 1.5 * math.pi * (1.0 + 2.0 * rng.uniform(0.0, 1.0, n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], 1) + p["noise"] * rng.standard_normal((n, 2))
    return x, None


def _eight_gaussians(
    rng: np.random.Generator, n: int, p: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray | None]:
    lab = rng.integers(0, 8, n)
    angle = lab * (math.pi / 4)
    x = 2.0 * np.stack([np.cos(angle), np.sin(angle)], 1) + p["noise"] * rng.standard_normal((n, 2))
    return x, lab


def _checkerboard(
    rng: np.random.Generator, n: int, p: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray | None]:
    # 8 unit squares of a 4x4 board (FFJORD's construction), scaled to [-4, 4)^2.
    x1 = rng.uniform(-2.0, 2.0, n)
    x2 = rng.uniform(0.0, 1.0, n) - 2.0 * rng.integers(0, 2, n) + np.floor(x1) % 2
    return 2.0 * np.stack([x1, x2], 1), None


_COMMON = {"n": _pos_int, "n_test": _pos_int}
_TOYS: dict[str, tuple[_ToyFn, dict[str, Callable[[str], Any]], dict[str, Any]]] = {
    "moons": (_moons, {**_COMMON, "noise": _nonneg}, {"noise": 0.05}),
    "circles": (
        _circles,
        {**_COMMON, "noise": _nonneg, "factor": _unit_open},
        {"noise": 0.05, "factor": 0.5},
    ),
    "swissroll": (_swissroll, {**_COMMON, "noise": _nonneg}, {"noise": 0.5}),
    "8gaussians": (_eight_gaussians, {**_COMMON, "noise": _nonneg}, {"noise": 0.1}),
    "checkerboard": (_checkerboard, dict(_COMMON), {}),
}


def _load_toy(spec: str, rest: str, seed: int) -> Dataset:
    name, _, text = rest.partition(":")
    if name not in _TOYS:
        raise _err(spec, f"unknown toy {name!r}; expected toy:NAME with NAME one of {', '.join(_TOYS)}")
    fn, allowed, defaults = _TOYS[name]
    p = {"n": 10000, "n_test": 2000, **defaults, **_parse_params(spec, text, allowed)}
    rng_train, rng_test = _split_rngs(seed)
    xtr, ltr = fn(rng_train, p["n"], p)
    xte, lte = fn(rng_test, p["n_test"], p)
    return _vector_dataset(spec, xtr, xte, ltr, lte)


_GAUSS_ALLOWED = {"d": _pos_int, "mean": _finite, "scale": _pos, "n": _pos_int, "n_test": _pos_int}


def _gaussian_config(spec: str) -> dict[str, Any]:
    kind, _, text = spec.partition(":")
    if kind.strip() != "gaussian":
        raise _err(spec, "not a gaussian spec; expected gaussian[:d=D,mean=F,scale=F,n=N,n_test=N]")
    return {
        "d": 2,
        "mean": 0.0,
        "scale": 1.0,
        "n": 10000,
        "n_test": 2000,
        **_parse_params(spec, text, _GAUSS_ALLOWED),
    }


def gaussian_params(spec: str) -> tuple[Tensor, Tensor]:
    """Exact (mu, lam) of ``gaussian:`` data, for tests against closed-form scores and likelihoods.

    The data is N(mean * 1, diag(lam)) with lam_i = scale^2 * linspace(0.5, 1.5, d)_i
    (lam = 0.5 * scale^2 when d = 1): distinct variances, so a model that ignores the
    per-dimension structure is caught. Both are float64 tensors of shape (d,).
    """
    c = _gaussian_config(spec)
    mu = torch.full((c["d"],), c["mean"], dtype=torch.float64)
    lam = c["scale"] ** 2 * torch.linspace(0.5, 1.5, c["d"], dtype=torch.float64)
    return mu, lam


def _load_gaussian(spec: str, rest: str, seed: int) -> Dataset:
    c = _gaussian_config(spec)
    mu, lam = (t.numpy() for t in gaussian_params(spec))
    rng_train, rng_test = _split_rngs(seed)
    xtr = mu + np.sqrt(lam) * rng_train.standard_normal((c["n"], c["d"]))
    xte = mu + np.sqrt(lam) * rng_test.standard_normal((c["n_test"], c["d"]))
    # Identity scaler: the closed-form moments then hold in model space too.
    return _vector_dataset(spec, xtr, xte, scaler=Scaler(levels=None, a=1.0, b=0.0))
