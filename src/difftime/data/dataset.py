"""The :class:`Dataset` every source returns, its image and vector constructors, and reading a file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from difftime.errors import located_error as _err
from difftime.scaler import Scaler

_IMAGE_SCALER = Scaler(levels=256, a=2.0, b=-1.0)


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


def _read_bytes(spec: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _err(spec, f"cannot read {path} ({exc.strerror or exc})") from None
