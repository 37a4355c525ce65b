"""A study's settings: the validated ``study`` section of its config, the study config itself, the
sampling end time and the frontier's step counts per NFE budget."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from difftime.config import build_config, merge, sde_config, validate
from difftime.errors import DifftimeError
from difftime.evaluation import SAMPLE_PRECISIONS
from difftime.gridopt import CALLS_PER_STEP, GRID_METHODS
from difftime.likelihood import ELBO_DESIGNS
from difftime.metrics import IMAGE_METRICS, METRICS, VECTOR_METRICS
from difftime.priors import PRIOR_FAMILIES
from difftime.run import read_run_config
from difftime.sampling import SAMPLERS, SPACINGS, default_sample_eps, default_spacing, timesteps
from difftime.sde import sde_from_config

SAMPLER_ALIASES = {"ode": "heun", "sde": "em"}
MODES = ("truncate", "per-T")
# Study settings that may change between reruns of one study directory: they only add or drop cells
# (or, for headroom_n, the headroom stage).
GRID_KEYS = ("T_grid", "priors", "headroom_n", "fid_headline", "frontier_grids")


def sample_eps(config: dict[str, Any]) -> float:
    """The study's sampling end time: ``study.sample_eps``, or for 0 (auto) the library's
    ``sampling.default_sample_eps`` of the config's SDE, max(DEFAULT_SAMPLE_EPS, sde.eps)."""
    value = config["study"]["sample_eps"]
    return float(value) if value > 0 else default_sample_eps(sde_from_config(sde_config(config)))


def _probe_nfe(sampler: str, steps: int, sde, T: float, eps: float) -> int:
    """The NFE ``sampler`` reports for ``steps`` steps, from a zero network on one scalar."""
    def zero(x, t):
        return torch.zeros_like(x)

    with torch.no_grad():
        ts = timesteps(sde, T, eps, steps, default_spacing(sampler))
        _, nfe = SAMPLERS[sampler](zero, sde, torch.zeros(1, 1), ts, generator=torch.Generator().manual_seed(0))
    return int(nfe)


def frontier_steps(sampler: str, budgets: list[int], sde, T: float, eps: float) -> dict[int, int]:
    """Budget -> the step count at which ``sampler`` spends exactly that NFE (with the final denoise),
    for the budgets it can meet exactly. The NFE is measured: a step count s costs a s + b."""
    n1, n2, n3 = (_probe_nfe(sampler, k, sde, T, eps) for k in (1, 2, 3))
    a, b = n2 - n1, n1 - (n2 - n1)
    if a < 1 or n3 != 3 * a + b:
        raise DifftimeError(f"study.frontier_samplers: {sampler} does not spend a fixed NFE per step (it chooses "
                            "its own steps); use a fixed-step sampler such as dpm++2m, dpm++3m, ipndm or ddim")
    out = {B: (B - b) // a for B in budgets if B - b >= a and (B - b) % a == 0}
    if not out:
        raise DifftimeError(f"study.frontier_samplers: {sampler} spends {a} x steps + {b} NFE and meets none of "
                            f"study.nfe_budgets {budgets} exactly")
    return out


def study_settings(config: dict[str, Any]) -> dict[str, Any]:
    """The validated ``study`` section, with sampler aliases resolved, T values sorted, the sampling
    eps resolved and the frontier's step count per sampler and budget."""
    s = copy.deepcopy(config["study"])
    sde, T_train = config["sde"], config["train"]["T"]
    if s["mode"] not in MODES:
        raise DifftimeError(f"study.mode must be one of {', '.join(MODES)}, got {s['mode']!r}")
    if not s["T_grid"]:
        raise DifftimeError("study.T_grid is empty; give at least one T, e.g. --T-grid 0.4,1.0")
    s["T_grid"] = sorted(set(s["T_grid"]))
    top = T_train if s["mode"] == "truncate" else sde["T_max"]
    for T in s["T_grid"]:
        if not sde["eps"] < T <= top:
            where = "train.T (the truncated model's horizon)" if s["mode"] == "truncate" else "sde.T_max"
            raise DifftimeError(f"study.T_grid value {T:g} is outside (eps={sde['eps']:g}, {top:g}]; "
                                f"the largest T is {where}")
    bad = [p for p in s["priors"] if p not in PRIOR_FAMILIES]
    if bad or not s["priors"]:
        raise DifftimeError(f"study.priors: unknown {bad}; choose from {', '.join(PRIOR_FAMILIES)}")
    s["priors"] = list(dict.fromkeys(s["priors"]))
    samplers = [SAMPLER_ALIASES.get(name, name) for name in s["samplers"]]
    bad = [name for name in samplers if name not in SAMPLERS]
    if bad or not samplers:
        raise DifftimeError(f"study.samplers: unknown {bad}; choose from "
                            f"{', '.join([*SAMPLERS, *SAMPLER_ALIASES])}")
    s["samplers"] = list(dict.fromkeys(samplers))
    if s["spacing"] not in ("auto", *SPACINGS):
        raise DifftimeError(f"study.spacing: unknown {s['spacing']!r}; choose from auto, {', '.join(SPACINGS)}")
    if s["sample_eps"] < 0:
        raise DifftimeError(f"study.sample_eps must be > 0 (or 0 for the default), got {s['sample_eps']}")
    s["sample_eps"] = sample_eps(config)
    if not s["sample_eps"] < s["T_grid"][0]:
        raise DifftimeError(f"study.sample_eps={s['sample_eps']:g} must be below the smallest T, "
                            f"{s['T_grid'][0]:g}")
    bad = [B for B in s["nfe_budgets"] if B < 2]
    if bad:
        raise DifftimeError(f"study.nfe_budgets must hold integers >= 2 (one step and the denoise), got {bad}")
    s["nfe_budgets"] = sorted(set(s["nfe_budgets"]))
    frontier = [SAMPLER_ALIASES.get(name, name) for name in s["frontier_samplers"]]
    bad = [name for name in frontier if name not in SAMPLERS]
    if bad:
        raise DifftimeError(f"study.frontier_samplers: unknown {bad}; choose from "
                            f"{', '.join([*SAMPLERS, *SAMPLER_ALIASES])}")
    s["frontier_samplers"] = list(dict.fromkeys(frontier))
    s["frontier_grids"] = list(dict.fromkeys(s["frontier_grids"]))
    bad = [m for m in s["frontier_grids"] if m not in GRID_METHODS]
    if bad:
        raise DifftimeError(f"study.frontier_grids: unknown {bad}; choose from {', '.join(GRID_METHODS)}")
    bad = [name for name in s["frontier_samplers"] if s["frontier_grids"] and name not in CALLS_PER_STEP]
    if bad:
        raise DifftimeError(f"study.frontier_grids: no optimized grid for {bad}; use frontier samplers among "
                            f"{', '.join(CALLS_PER_STEP)}")
    if s["frontier_samplers"] and not s["nfe_budgets"]:
        raise DifftimeError("study.nfe_budgets is empty; give budgets or set study.frontier_samplers to []")
    sde = sde_from_config(sde_config(config))
    # Stored as [budget, steps] pairs: JSON keys would turn the budgets into strings.
    s["frontier_steps"] = {name: sorted(frontier_steps(name, s["nfe_budgets"], sde, s["T_grid"][-1],
                                                       s["sample_eps"]).items())
                           for name in s["frontier_samplers"]}
    if s["headroom_n"] == 1 or s["headroom_n"] < 0:
        raise DifftimeError(f"study.headroom_n must be 0 (no headroom) or >= 2, got {s['headroom_n']}")
    if s["fid_headline"] < 0 or s["fid_headline"] == 1:
        raise DifftimeError(f"study.fid_headline must be 0 (none) or the number of samples (>= 2) to score, "
                            f"got {s['fid_headline']}")
    if s["fixed_steps"] < 0:
        raise DifftimeError(f"study.fixed_steps must be >= 1 (or 0 for no fixed budget), got {s['fixed_steps']}")
    if s["n_pfode"] == 0:
        s["n_pfode"] = s["n_likelihood"]
    if not 2 <= s["n_pfode"] <= s["n_likelihood"]:
        raise DifftimeError(f"study.n_pfode must be between 2 and study.n_likelihood={s['n_likelihood']} "
                            f"(0: all of them), got {s['n_pfode']}")
    if s["sample_precision"] not in SAMPLE_PRECISIONS:
        raise DifftimeError(f"study.sample_precision must be one of {', '.join(SAMPLE_PRECISIONS)}, "
                            f"got {s['sample_precision']!r}")
    for key in ("steps_per_unit_time", "n_samples", "sample_batch", "n_likelihood", "n_t", "n_prior",
                "dequant_repeats", "prior_steps", "prior_batch_size", "grid_images"):
        if s[key] < 1:
            raise DifftimeError(f"study.{key} must be >= 1, got {s[key]}")
    if s["n_samples"] < 4 or s["n_likelihood"] < 2:
        raise DifftimeError("study.n_samples must be >= 4 and study.n_likelihood >= 2 for standard errors")
    if not (s["tol"] > 0 and s["prior_lr"] > 0):
        raise DifftimeError("study.tol and study.prior_lr must be > 0")
    if s["reference_split"] not in ("auto", "train", "test"):
        raise DifftimeError(f"study.reference_split must be auto, train or test, got {s['reference_split']!r}")
    if s["bootstrap"] == 1 or s["bootstrap"] < 0:
        raise DifftimeError(f"study.bootstrap must be 0 (no intervals) or >= 2 replicates, got {s['bootstrap']}")
    if s["elbo_design"] not in ("auto", *ELBO_DESIGNS):
        raise DifftimeError(f"study.elbo_design must be auto or one of {', '.join(ELBO_DESIGNS)}, "
                            f"got {s['elbo_design']!r}")
    if s["divergence"] not in ("auto", "exact", "hutchinson"):
        raise DifftimeError(f"study.divergence must be auto, exact or hutchinson, got {s['divergence']!r}")
    bad = [m for m in s["metrics"] if m != "auto" and m not in METRICS]
    if bad:
        raise DifftimeError(f"study.metrics: unknown {bad}; choose from auto, {', '.join(METRICS)}")
    return s


def quality_metric_names(settings: dict[str, Any], is_image: bool) -> tuple[str, ...]:
    chosen = [m for m in settings["metrics"] if m != "auto"]
    if not chosen:
        chosen = ["fd", "kid", "pr"] if is_image else ["mmd", "swd"]
    if settings["fid"] and is_image and "fid" not in chosen:
        chosen.append("fid")
    allowed = IMAGE_METRICS if is_image else VECTOR_METRICS
    bad = [m for m in chosen if m not in allowed]
    if bad:
        kind = "image" if is_image else "vector"
        raise DifftimeError(f"study.metrics {bad} do not apply to {kind} data; use {', '.join(allowed)}")
    return tuple(chosen)


def study_config(preset: str | None, config_file: str | None, overrides: dict[str, Any],
                 run: str | None = None) -> dict[str, Any]:
    """The study's full config. With a pretrained ``run``, its training config replaces the preset's."""
    config = build_config(preset, config_file, overrides)
    if run is not None:
        saved = read_run_config(run)
        if not isinstance(saved.get("config"), dict):
            raise DifftimeError(f"{Path(run) / 'config.json'} has no 'config' object; is it a difftime run?")
        base = {k: v for k, v in saved["config"].items() if k != "study"}
        config = merge(merge(build_config(), base), {"study": config["study"], "seed": config["seed"]})
        validate(config)
    return config
