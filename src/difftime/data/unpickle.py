"""Restricted unpickling (CIFAR-10 batches, and MNIST as a second line of defence).

No user file is ever unpickled with the stock unpickler: only what a plain numpy array needs is admitted.
"""

from __future__ import annotations

import codecs
import io
import pickle
from collections.abc import Callable
from typing import Any

import numpy as np

from difftime.errors import DifftimeError
from difftime.errors import located_error as _err


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
