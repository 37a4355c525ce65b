"""difftime: score-based diffusion models where the diffusion time T is a first-class choice.

The public API, resolved lazily on first use so that ``import difftime`` stays cheap::

    import difftime as dt
    run = dt.load_run("runs/digits")
    prior = dt.load_prior("runs/digits/priors/gaussian-T0.4")  # or dt.GaussianPrior.from_data, dt.fit_prior
    x0, nfe = dt.sample(run.model, run.sde, prior, 0.4, n=64, sampler="dpm++2m", steps=10)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> the module that owns it
_EXPORTS = {
    "DifftimeError": "difftime.errors",
    "SDE": "difftime.sde", "VPSDE": "difftime.sde", "SubVPSDE": "difftime.sde", "VESDE": "difftime.sde",
    "sde_from_config": "difftime.sde",
    "Run": "difftime.run", "load_run": "difftime.run",
    "train_run": "difftime.training", "load_data": "difftime.data",
    "sample": "difftime.sampling", "timesteps": "difftime.sampling", "SAMPLERS": "difftime.sampling",
    "SPACINGS": "difftime.sampling",
    "elbo": "difftime.likelihood", "ode_log_likelihood": "difftime.likelihood", "ode_flow": "difftime.likelihood",
    "bits_per_dim": "difftime.likelihood",
    "Prior": "difftime.priors", "PriorModule": "difftime.priors", "StandardPrior": "difftime.priors",
    "GaussianPrior": "difftime.priors",
    "FlowPrior": "difftime.priors", "GlowPrior": "difftime.priors", "fit_prior": "difftime.priors",
    "load_prior": "difftime.priors", "save_prior": "difftime.priors", "PRIOR_FAMILIES": "difftime.priors",
    "quality_metrics": "difftime.metrics",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'difftime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
