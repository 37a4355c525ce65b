"""IDX files: ``idx:DIR`` and ``fashion-mnist`` (the system package's directory, or $DIFFTIME_FASHION_MNIST_DIR)."""

from __future__ import annotations

import functools
import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from difftime.data.dataset import Dataset, _image_dataset, _read_bytes
from difftime.errors import located_error as _err

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "DIFFTIME_FASHION_MNIST_DIR"

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
