"""``cifar10:DIR``: the python pickle batches of CIFAR-10, through the restricted unpickler."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from difftime.data.dataset import Dataset, _image_dataset, _read_bytes
from difftime.data.unpickle import _safe_unpickle
from difftime.errors import located_error as _err

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
