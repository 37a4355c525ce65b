"""Auxiliary priors nu_phi(x_T) for a short diffusion horizon T.

Families: ``standard`` (the SDE's N(0, std^2 I)), ``gaussian`` (moment-matched to p_T, the
KL-best Gaussian), ``flow`` (a zuko flow based at that Gaussian) and ``glow`` (a multi-scale
Glow for images, based at the full (ZCA) Gaussian up to 4096 dimensions). Build one with :func:`make_prior`, fit it
with :func:`fit_prior`, store it with :func:`save_prior` / :func:`load_prior`.

MAF on PCA coordinates is the image default, chosen by measurement against the Glow: the held-out
gains of each family over the moment-matched Gaussian, with their wall times, are in
docs/priors-headroom/README.md (docs/design.md §7).
"""

from __future__ import annotations

from difftime.priors.base import Prior, PriorModule
from difftime.priors.build import fit_run_prior, make_prior, training_data
from difftime.priors.fit import fit_prior, heldout_nll, heldout_set, save_fit_curve
from difftime.priors.flow import FLOW_KINDS, FlowPrior
from difftime.priors.gaussian import GaussianPrior
from difftime.priors.glow import GlowPrior
from difftime.priors.standard import StandardPrior
from difftime.priors.store import PRIOR_FAMILIES, load_prior, prior_dir, save_prior

__all__ = [
    "FLOW_KINDS",
    "PRIOR_FAMILIES",
    "FlowPrior",
    "GaussianPrior",
    "GlowPrior",
    "Prior",
    "PriorModule",
    "StandardPrior",
    "fit_prior",
    "fit_run_prior",
    "heldout_nll",
    "heldout_set",
    "load_prior",
    "make_prior",
    "prior_dir",
    "save_fit_curve",
    "save_prior",
    "training_data",
]
