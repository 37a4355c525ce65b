"""Building a prior of a family at T from a dataset (``make_prior``), and fitting and storing a run's
prior in its run directory (``fit_run_prior``)."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from difftime import distributed
from difftime.data import Dataset
from difftime.errors import DifftimeError
from difftime.io import exclusive_lock
from difftime.priors.base import PriorModule
from difftime.priors.fit import fit_prior, save_fit_curve
from difftime.priors.flow import FlowPrior
from difftime.priors.gaussian import GaussianPrior
from difftime.priors.glow import GlowPrior
from difftime.priors.standard import StandardPrior
from difftime.priors.store import PRIOR_FAMILIES, prior_dir, save_prior
from difftime.sde import SDE


def training_data(dataset: Dataset, seed: int = 0) -> torch.Tensor:
    """The whole training split in model space, dequantized with a generator seeded by ``seed``."""
    return dataset.scaler.encode(dataset.train, generator=torch.Generator().manual_seed(int(seed)))


def make_prior(family: str, sde: SDE, T: float, dataset: Dataset, *, seed: int = 0, **options: Any) -> PriorModule:
    """Build a prior of ``family`` at horizon T, moment-matched to p_T of ``dataset.train``.

    ``seed`` fixes the dequantization of the moments and the network initialisation; the other
    options go to the family: gaussian (diagonal, max_full_dim), flow (flow, transforms, hidden,
    bins, diagonal, max_full_dim), glow (levels, steps_per_level, hidden, clamp, base, max_full_dim).
    """
    if family not in PRIOR_FAMILIES:
        raise DifftimeError(f"unknown prior family {family!r}; expected one of {', '.join(PRIOR_FAMILIES)}")
    T, _ = sde.check_horizon(T)
    if family == "glow" and not dataset.is_image:
        raise DifftimeError(
            f"the glow prior needs image data (C, H, W) but {dataset.name} has shape {dataset.shape}; "
            "use the flow prior instead"
        )
    try:
        if family == "standard":
            if options:
                raise TypeError(f"unexpected options {sorted(options)}")
            return StandardPrior.for_sde(sde, T, dataset.shape)
        x0 = training_data(dataset, seed)
        if family == "gaussian":
            return GaussianPrior.from_data(sde, T, x0, **options)
        cls = FlowPrior if family == "flow" else GlowPrior
        return cls.from_data(sde, T, x0, seed=seed, **options)
    except TypeError as exc:
        raise DifftimeError(f"bad options for the {family} prior: {exc}") from None


def fit_run_prior(run_path: str | Path, sde: SDE, shape: tuple[int, ...], family: str, T: float, dataset: Dataset,
                  *, steps: int, batch_size: int, lr: float, seed: int = 0, progress: bool = True,
                  fit_options: dict[str, Any] | None = None, device: str | torch.device = "cpu",
                  **options: Any) -> tuple[PriorModule, dict[str, Any]]:
    """Build, fit and store a run's prior of ``family`` at T in ``prior_dir(run_path, family, T)``.

    ``fit_options`` go to :func:`fit_prior` (n_eval, eval_every, patience, z, schedule, warmup,
    time_limit, data_init); ``options`` to the family. Fitting checkpoints into a hidden sibling
    folder, so a killed fit rerun with the same arguments resumes; the stored prior only changes
    once the new one is complete. The folder also holds the fit curve (fit_curve.json, .png).
    The prior is fitted on ``device`` (any name of ``difftime.distributed.resolve_device``; batches
    are drawn on the CPU and moved), stored from the CPU, and returned on ``device`` with its fit record.
    """
    directory = prior_dir(run_path, family, T)
    main = distributed.is_main()  # under torchrun every rank fits the same prior; rank 0 writes it
    lock = directory.with_name(f".{directory.name}.lock")
    with exclusive_lock(lock, f"the {family} prior at T={T:g} of {run_path}") if main else contextlib.nullcontext():
        prior = make_prior(family, sde, T, dataset, seed=seed, **options).to(distributed.resolve_device(device))
        fit = fit_prior(prior, sde, T, dataset, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                        progress=progress, checkpoint=directory.with_name(f".{directory.name}.partial"),
                        **(fit_options or {}))
        extra = {"fit": fit, "data": dataset.name, "seed": seed, "options": options,
                 "test_nll_bits_per_dim_of_x_T": fit["test_nll"] / (math.prod(shape) * math.log(2))}
        if main:
            save_prior(prior, directory, extra=json.loads(json.dumps(extra, default=str)))
            save_fit_curve(fit, directory, f"{family} prior at T={T:g} ({dataset.name})")
    prior.eval()
    return prior, fit
