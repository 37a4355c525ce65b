"""``digits``: scikit-learn's 8x8 digits, with a fixed test split."""

from __future__ import annotations

import functools

import numpy as np

from difftime.data.dataset import Dataset, _image_dataset
from difftime.errors import located_error as _err
from difftime.scaler import Scaler

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
