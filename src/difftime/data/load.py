"""``load_data``: a data source by spec, the one entry point."""

from __future__ import annotations

import numpy as np

from difftime.data.cifar import _load_cifar10
from difftime.data.dataset import Dataset
from difftime.data.digits import _load_digits
from difftime.data.folder import _load_folder
from difftime.data.idx import _load_fashion, _load_idx
from difftime.data.mnist import _load_mnist
from difftime.data.npz import _load_npz
from difftime.data.synthetic import _TOYS, _load_gaussian, _load_toy
from difftime.errors import located_error as _err

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

_NO_ARG = {"digits": _load_digits, "mnist": _load_mnist, "fashion-mnist": _load_fashion}
_PATH_ARG = {"idx": _load_idx, "cifar10": _load_cifar10, "npz": _load_npz, "folder": _load_folder}
_OPT_ARG = {"toy": _load_toy, "gaussian": _load_gaussian}


def load_data(spec: str, *, seed: int = 0) -> Dataset:
    """Load a data source by spec (see ``SPEC_FORMS``).

    ``seed`` only drives the generated sources (toy, gaussian); file-based sources have a
    fixed split so test numbers stay comparable across runs.

    ``spec`` is one of the forms of ``SPEC_FORMS`` (``"digits"``, ``"mnist"``, ``"toy:moons:n=200"``,
    ``"npz:FILE"``, ...). Returns a :class:`Dataset`: raw ``train`` and ``test`` tensors of shape
    (N, *shape) (integer levels for images, floats for vectors) and the ``scaler`` that maps them to
    model space. An unknown or malformed spec, or a missing file, raises DifftimeError.

    >>> from difftime.data import load_data
    >>> data = load_data("toy:moons:n=200,n_test=50")
    >>> tuple(data.train.shape), tuple(data.test.shape), data.shape, data.is_image
    ((200, 2), (50, 2), (2,), False)
    >>> bool((load_data("toy:moons:n=200,n_test=50").train == data.train).all())   # seed 0 by default
    True
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
