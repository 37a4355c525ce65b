"""``folder:DIR``: a directory of same-size image files, split with a fixed seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from difftime.data.dataset import Dataset, _image_dataset
from difftime.errors import located_error as _err

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
