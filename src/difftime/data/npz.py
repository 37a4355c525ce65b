"""``npz:FILE``: numpy.savez output with arrays train and test (and optionally their labels), no pickles."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difftime.data.dataset import Dataset, _image_dataset, _vector_dataset
from difftime.errors import DifftimeError
from difftime.errors import located_error as _err
from difftime.io import refuse_pickle

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
