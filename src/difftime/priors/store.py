"""Saving and loading priors: ``<dir>/config.json`` + ``<dir>/prior.safetensors``, never pickles.

The weights are written first and config.json last, recording the weights' sha256, so a folder
is complete exactly when the checksum matches; a torn or tampered write fails at load. A new
prior is written into a hidden sibling folder and swapped in by renames, so a failed or killed
save never damages a good prior already in place.

``PRIOR_FAMILIES`` maps each family name to its class:

>>> from difftime.priors import PRIOR_FAMILIES
>>> list(PRIOR_FAMILIES)
['standard', 'gaussian', 'flow', 'glow']
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

from difftime.errors import DifftimeError
from difftime.io import (
    fsync_dir,
    load_state_dict_strict,
    load_tensors,
    read_json_file,
    save_json,
    save_tensors,
    sha256_file,
)
from difftime.priors.base import PriorModule
from difftime.priors.flow import FlowPrior
from difftime.priors.gaussian import GaussianPrior
from difftime.priors.glow import GlowPrior
from difftime.priors.standard import StandardPrior

PRIOR_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "prior.safetensors"
PRIOR_FAMILIES: dict[str, type[PriorModule]] = {
    cls.family: cls for cls in (StandardPrior, GaussianPrior, FlowPrior, GlowPrior)
}


def prior_dir(run_dir: str | Path, family: str, T: float) -> Path:
    """run_dir / "priors" / "<family>-T<T:g>"."""
    return Path(run_dir) / "priors" / f"{family}-T{float(T):g}"


def save_prior(prior: PriorModule, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the prior's weights and config (plus JSON-ready ``extra``, e.g. fit results).

    ``prior`` is one of the library's priors (``PRIOR_FAMILIES``), ``directory`` the folder to write
    (replaced atomically if it exists). Returns ``directory`` as a Path; raises DifftimeError for
    any other object.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from difftime.priors import StandardPrior, save_prior
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     folder = save_prior(StandardPrior((2,), T=0.4), Path(tmp) / "standard-T0.4")
    ...     sorted(p.name for p in folder.iterdir())
    ['config.json', 'prior.safetensors']
    """
    if not isinstance(prior, PriorModule) or PRIOR_FAMILIES.get(prior.family) is not type(prior):
        raise DifftimeError(f"save_prior: got {type(prior).__name__}; expected one of the library's priors")
    directory = Path(directory)
    staging = _sibling(directory, "new")
    shutil.rmtree(staging, ignore_errors=True)
    sha = save_tensors(staging / WEIGHTS_FILE, prior.state_dict())
    save_json(
        staging / CONFIG_FILE,
        {
            "format_version": PRIOR_FORMAT_VERSION,
            "family": prior.family,
            "T": prior.T,
            "shape": list(prior.shape),
            "config": prior.config(),
            "sha256": sha,
            "extra": extra if extra is not None else {},
        },
    )
    _finish_swap(directory)
    old = _sibling(directory, "old")
    if directory.exists():
        os.rename(directory, old)
    os.rename(staging, directory)
    fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _sibling(directory: Path, role: str) -> Path:
    return directory.with_name(f".{directory.name}.{role}")


def _finish_swap(directory: Path) -> None:
    """A save killed between its two renames left the previous prior in the .old sibling: put it back."""
    old = _sibling(directory, "old")
    if old.is_dir() and not directory.exists():
        os.rename(old, directory)


def load_prior(directory: str | Path) -> PriorModule:
    """Rebuild a prior saved by :func:`save_prior`, strictly: any mismatch is a DifftimeError.

    ``directory`` is the folder :func:`save_prior` wrote (a run's priors live at
    ``prior_dir(run, family, T)``). Returns the prior, of its saved family, in eval mode. A missing
    or incomplete folder, a checksum that does not match or weights that do not fit its config
    raise DifftimeError.

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from difftime.priors import GaussianPrior, load_prior, save_prior
    >>> prior = GaussianPrior.from_moments((2,), 0.4, mean=torch.ones(2), cov=torch.eye(2))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     again = load_prior(save_prior(prior, Path(tmp) / "gaussian-T0.4"))
    >>> again, bool(torch.equal(again.mean, prior.mean))
    (GaussianPrior(T=0.4, shape=(2,), diagonal=False), True)
    """
    directory = Path(directory)
    _finish_swap(directory)
    if not directory.is_dir():
        raise DifftimeError(f"prior folder {directory} does not exist; expected a folder written by save_prior")
    cfg_path = directory / CONFIG_FILE
    meta = read_json_file(cfg_path, "prior config")
    missing = [k for k in ("format_version", "family", "T", "shape", "config", "sha256") if k not in meta]
    if missing:
        raise DifftimeError(f"prior config {cfg_path} lacks {', '.join(missing)}; it was not written by save_prior")
    if meta["format_version"] != PRIOR_FORMAT_VERSION:
        raise DifftimeError(
            f"prior config {cfg_path} has format_version {meta['format_version']!r}; expected {PRIOR_FORMAT_VERSION}"
        )
    family = meta["family"]
    if family not in PRIOR_FAMILIES:
        raise DifftimeError(
            f"prior config {cfg_path} names family {family!r}; expected one of {', '.join(PRIOR_FAMILIES)}"
        )
    config = meta["config"]
    if not isinstance(config, dict):
        raise DifftimeError(f"prior config {cfg_path}: 'config' must be an object")
    try:
        prior = PRIOR_FAMILIES[family](**config)
    except DifftimeError as exc:
        raise DifftimeError(f"prior config {cfg_path} is invalid: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise DifftimeError(f"prior config {cfg_path} has bad arguments for {family}: {exc}") from None
    try:
        T_ok = math.isclose(float(meta["T"]), prior.T, rel_tol=1e-12)
        shape_ok = [int(s) for s in meta["shape"]] == list(prior.shape)
    except (TypeError, ValueError):
        T_ok = shape_ok = False
    if not (T_ok and shape_ok):
        raise DifftimeError(
            f"prior config {cfg_path}: T={meta['T']!r}, shape={meta['shape']!r} disagree with its own config"
        )
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise DifftimeError(f"prior weights {weights} do not exist; the prior folder is incomplete")
    if sha256_file(weights) != meta["sha256"]:
        raise DifftimeError(
            f"prior weights {weights} do not match the checksum in {CONFIG_FILE}: the file is corrupt or from "
            "another prior"
        )
    load_state_dict_strict(prior, load_tensors(weights), weights)
    prior.eval()
    return prior
