"""`difftime study`: how much diffusion time is enough? A grid of T x prior, measured cell by cell.

A study directory holds:
  study.json                the config (training + ``study`` section) and the run it uses; written first
  runs/main/ or runs/T<T>/  the trained run(s): one for ``truncate``, one per T for ``per-T``
  likelihood.json/.npz      the paired likelihood stage over every T x prior (per-example bits/dim in the .npz)
  headroom/T<T>.json        how much any prior could still gain at T (difftime.headroom)
  data_floor.json           held-out real data scored exactly as samples are
  cells/T<T>-<prior>.json   one finished cell each, written atomically; a rerun skips them
  samples/T<T>-<prior>.npz  the samples behind each cell's grid
  results.json, results.csv, report.md and the PNG plots (see :mod:`difftime.study.report`)
  .lock                     held by the process running the study

Each cell measures, at horizon T with one prior: the ELBO terms and the PF-ODE bits/dim on the
test split, the prior-improvement bound on KL(p_T || N), and, for every sampler, sample quality
at a step count proportional to T and at one fixed step count. The cell at the largest T with
the standard prior also sweeps the proportional step counts of the smaller T values, so short
horizons can be compared with the usual T at equal NFE. Every cell also samples each of
``study.frontier_samplers`` at exactly the NFE of ``study.nfe_budgets`` (budget kind "frontier"):
the quality frontier (``frontier.json``) is the best (T, prior, sampler) within each budget,
against T = T_ref with the standard prior. Sampling ends at ``study.sample_eps``; the likelihoods
keep sde.eps.

Modules: :mod:`~difftime.study.settings` (the validated settings and the study config),
:mod:`~difftime.study.runner` (the :class:`Study`), :mod:`~difftime.study.records` (reading a study
directory back), :mod:`~difftime.study.analysis`, :mod:`~difftime.study.report` and
:mod:`~difftime.study.figures`.
"""

from __future__ import annotations

from difftime.sampling import default_spacing
from difftime.study.records import cell_name, frontier_choice, run_identity
from difftime.study.runner import FID_BOOTSTRAP, Study
from difftime.study.settings import (
    GRID_KEYS,
    MODES,
    SAMPLER_ALIASES,
    frontier_steps,
    quality_metric_names,
    sample_eps,
    study_config,
    study_settings,
)

__all__ = [
    "FID_BOOTSTRAP",
    "GRID_KEYS",
    "MODES",
    "SAMPLER_ALIASES",
    "Study",
    "cell_name",
    "default_spacing",
    "frontier_choice",
    "frontier_steps",
    "quality_metric_names",
    "run_identity",
    "sample_eps",
    "study_config",
    "study_settings",
]
