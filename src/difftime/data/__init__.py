"""Offline data sources, their fixed train/test splits, and the map to model space.

Every source returns *raw* data: integer levels (uint8) for images, float32 for vectors.
The :class:`Scaler` that comes with it owns the map to model space, so that likelihoods in
bits/dim can account for dequantization and samples can be turned back into valid images.

Nothing here downloads anything, and no user file is ever unpickled with the stock
unpickler: CIFAR-10 batches go through a restricted unpickler that admits numpy arrays only.

One module per concern: :mod:`~difftime.data.dataset` (the :class:`Dataset` type),
:mod:`~difftime.data.load` (``load_data`` and the spec forms), :mod:`~difftime.data.synthetic`
(toy and gaussian), :mod:`~difftime.data.digits`, :mod:`~difftime.data.mnist`,
:mod:`~difftime.data.idx` (idx and fashion-mnist), :mod:`~difftime.data.cifar`,
:mod:`~difftime.data.npz`, :mod:`~difftime.data.folder` and :mod:`~difftime.data.unpickle`.
"""

from __future__ import annotations

from difftime.data.dataset import Dataset
from difftime.data.digits import DIGITS_N_TEST
from difftime.data.idx import FASHION_MNIST_DIR, FASHION_MNIST_ENV, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC
from difftime.data.load import SPEC_FORMS, load_data
from difftime.data.mnist import MNIST_INSTALL_HINT, MNIST_SHA256
from difftime.data.synthetic import gaussian_params
from difftime.scaler import Scaler

__all__ = [
    "DIGITS_N_TEST",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "MNIST_INSTALL_HINT",
    "MNIST_SHA256",
    "SPEC_FORMS",
    "Dataset",
    "Scaler",
    "gaussian_params",
    "load_data",
]
