"""Auxiliary priors nu_phi(x_T) for a short diffusion horizon T.

Families: ``standard`` (the SDE's N(0, std^2 I)), ``gaussian`` (moment-matched to p_T, the
KL-best Gaussian), ``flow`` (a zuko flow based at that Gaussian) and ``glow`` (a multi-scale
Glow for images, based at the full (ZCA) Gaussian up to 4096 dimensions). Build one with :func:`make_prior`, fit it
with :func:`fit_prior`, store it with :func:`save_prior` / :func:`load_prior`.

Measured (docs/priors-headroom; VP, 1 CPU thread on a shared 2-core machine): held-out
NLL of x_T on fresh noise, fitted prior minus the moment-matched Gaussian, nats per example, with
95% paired intervals (MAF 3x128 on PCA coordinates; Glow 2 levels x 3 steps, width 32, full base):

    digits  T=0.2  flow -1.224 [-1.275, -1.173]   (4000 steps, batch 512, ~2 min)
            T=0.4  flow -0.018 [-0.024, -0.012]
    MNIST   T=0.2  flow -6.64 [-6.82, -6.46]   glow -5.23 [-5.39, -5.08]  (flow 3000 steps in 344 s;
            T=0.4  flow -0.436 [-0.468, -0.404]  glow -0.045 [-0.060, -0.029]  glow time-capped at 420 s)

MAF on PCA coordinates is the image default: at equal or smaller wall time it beats the Glow at
28x28 by 1.40 [1.20, 1.61] nats at T=0.2 and 0.39 [0.36, 0.43] at T=0.4. Fitting these small models
is much faster with ``torch.set_num_threads(1)`` on a busy 2-core machine.
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
