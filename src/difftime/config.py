"""Run configuration: defaults, presets, merging and validation.

A config is plain JSON-ready nested dicts. Every key a user gives must exist in the defaults
and have a compatible type, so a typo is an error instead of a silently ignored setting.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from difftime.errors import DifftimeError
from difftime.io import read_json_file
from difftime.nets.precond import PRECONDITIONINGS
from difftime.sde import sde_from_config

PRESET_DIR = Path(__file__).resolve().parent / "presets"
# The loss's choices of time distribution and weighting (difftime.training.loss defines them).
T_DISTRIBUTIONS = ("uniform", "log-snr-normal")
WEIGHTINGS = ("standard", "likelihood", "min-snr", "edm")

DEFAULTS: dict[str, Any] = {
    "data": "digits",
    "seed": 0,
    "sde": {"kind": "vp", "b0": 0.1, "b1": 20.0, "sigma_min": 0.01, "sigma_max": 50.0,
            "T_max": 1.0, "eps": 1e-5},
    # "auto" picks a U-Net for images and an MLP for vectors; the resolved net is recorded.
    "net": {"kind": "auto", "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_levels": [],
            "mid_attention": True, "dropout": 0.0, "groups": 8, "heads": 1,
            "hidden": 128, "depth": 3, "time_dim": 64,
            # "edm": EDM's input/output scaling and skip around the network (nets/precond.py); the
            # result is still an eps-network. sigma_data is the data std it assumes.
            "precond": "none", "sigma_data": 0.5},
    "train": {
        "T": 1.0,                # training horizon: t ~ [eps, T]
        "steps": 2000,
        "batch_size": 128,
        "lr": 2e-4,
        "lr_schedule": "constant",  # after the linear warm-up: "constant" or "cosine" (to 0 at train.steps)
        "adam_betas": [0.9, 0.999],
        "weight_decay": 0.0,
        "warmup": 100,
        "grad_clip": 1.0,
        "ema_decay": 0.999,
        "ema_warmup": True,      # decay_n = min(ema_decay, (1 + n)/(10 + n)) (training/ema.py); False: constant
        # The loss w(t) ||eps_hat - z||^2 with t ~ p(t) on [eps, T] (training/loss.py):
        "weighting": "standard",  # w: "standard" (1), "likelihood" (g^2/v), "min-snr", "edm"
        "importance_sampling": True,  # only used with likelihood weighting
        "t_distribution": "uniform",  # p(t): "uniform" or "log-snr-normal" (log-SNR ~ N(mean, std))
        "log_snr_mean": 1.2,     # EDM's ln sigma ~ N(-1.2, 1.2) is log-SNR = log(m/s) ~ N(1.2, 1.2)
        "log_snr_std": 1.2,
        "min_snr_gamma": 5.0,
        "bf16": False,
        "channels_last": False,
        # Under torchrun: "per-rank" noise streams, or "shared": every rank draws the whole global
        # batch's noise and keeps its slice, so the run is the same whatever the process count.
        "ddp_noise": "per-rank",
        "log_every": 25,
        "ckpt_every": 500,
        "keep_checkpoints": 3,   # checkpoints/step-N/ folders kept besides the top-level copy
        "skip_nonfinite": 0,     # steps with a NaN/Inf loss or gradient to skip before stopping
    },
    # `difftime study`: the grid over T x prior x sampler and what each cell measures.
    "study": {
        "mode": "truncate",      # "truncate": one model on [eps, train.T]; "per-T": one model per T
        "T_grid": [0.2, 0.4, 0.6, 0.8, 1.0],
        "priors": ["standard", "gaussian", "flow"],
        "samplers": ["heun", "em"],  # any name in difftime.sampling.SAMPLERS; aliases ode (= heun), sde (= em)
        "spacing": "auto",           # time grid of every sampler: auto (each sampler's own default) or a SPACINGS name
        # The sampling end time, separate from sde.eps (which the likelihoods keep). 0 means
        # max(sampling.DEFAULT_SAMPLE_EPS, sde.eps); the study records the value it resolved.
        "sample_eps": 0.0,
        # The quality frontier: the best (T, prior, sampler) within each NFE budget. Every cell samples
        # each of frontier_samplers at exactly these NFE (empty: no frontier sampling).
        "nfe_budgets": [4, 6, 8, 10, 15, 20, 30, 50],
        "frontier_samplers": ["dpm++2m", "dpm++3m", "ipndm"],
        # The frontier also samples each frontier sampler on these optimized grids (difftime.gridopt:
        # gaussian, gits), found per (T, prior, sampler, budget) and kept in the study's grids/.
        "frontier_grids": [],
        "steps_per_unit_time": 100.0,  # the budget proportional to T: round(steps_per_unit_time * T) steps
        "fixed_steps": 20,           # one budget shared by every T; 0: none
        "sample_precision": "fp32",  # the network during sampling: fp32, or bf16 (autocast; likelihoods stay fp32)
        "n_samples": 500,
        # The most samples integrated at once; also the unit that torchrun's ranks share, so a set of
        # n samples keeps ceil(n / sample_batch) ranks busy. A stochastic sampler's draws depend on it.
        "sample_batch": 500,
        "n_likelihood": 200,
        "n_pfode": 0,                # PF-ODE bits/dim on the first n_pfode of those (0: all n_likelihood)
        "n_t": 32,
        "n_prior": 4,
        "dequant_repeats": 1,
        "tol": 1e-4,
        "divergence": "auto",
        "metrics": ["auto"],         # auto: fd, kid, pr for images; mmd, swd for vectors
        # Samples are scored against this split ("auto": the larger one); real examples of the other
        # split, scored the same way, are the data floor.
        "reference_split": "auto",
        "bootstrap": 200,            # bootstrap replicates per quality score (paired across cells); 0: none
        "elbo_design": "auto",       # across-T ELBO draws: auto (nested for one network, else inverse_cdf)
        "headroom_n": 200,           # held-out x_T per T for the prior headroom (difftime.headroom); 0: skip
        "fid": False,                # Inception FID for every cell (slow on CPU: docs/design.md §9)
        "fid_headline": 0,           # Inception FID of the frontier's best and T_ref-standard configurations,
                                     # on this many samples against as many reference images (0: none)
        "prior_steps": 1000,
        "prior_batch_size": 256,
        "prior_lr": 1e-3,
        "grid_images": 36,
    },
}

_NET_KEYS = {
    "mlp": ("hidden", "depth", "time_dim", "dropout"),
    "unet": ("ch", "ch_mult", "num_res_blocks", "attn_levels", "mid_attention", "dropout",
             "groups", "heads"),
}
_SDE_KEYS = {"vp": ("b0", "b1"), "subvp": ("b0", "b1"), "ve": ("sigma_min", "sigma_max")}


# Lists whose default is empty hold names, not the integers an empty default implies.
_NAME_LISTS = ("study.frontier_grids",)


def _list_item_ok(default: list[Any], item: Any, path: str = "") -> bool:
    """List items take the type of the default's items; an int is accepted where floats are."""
    if any(isinstance(v, str) for v in default) or path in _NAME_LISTS:
        return isinstance(item, str)
    if isinstance(item, bool):
        return False
    if any(isinstance(v, float) for v in default):
        return isinstance(item, (int, float))
    return isinstance(item, int)


def _check_type(path: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(_list_item_ok(default, v, path) for v in value)
        value = [float(v) for v in value] if ok and any(isinstance(v, float) for v in default) else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        if isinstance(default, float) and isinstance(value, float):
            raise DifftimeError(f"config key {path!r} must be a finite number, got {value!r}")
        raise DifftimeError(
            f"config key {path!r} must be of type {type(default).__name__}, got {value!r}"
        )
    return value


def merge(base: dict[str, Any], override: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Deep-merge ``override`` into a copy of ``base``; unknown keys and wrong types are errors."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        path = f"{prefix}{key}"
        if key not in base:
            raise DifftimeError(
                f"unknown config key {path!r}; known keys here: {', '.join(sorted(base))}"
            )
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise DifftimeError(f"config key {path!r} must be an object, got {value!r}")
            out[key] = merge(base[key], value, prefix=f"{path}.")
        else:
            out[key] = _check_type(path, base[key], value)
    return out


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise DifftimeError(f"unknown preset {name!r}; available: {', '.join(presets())}")
    return read_json_file(path, "preset")


def build_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Defaults <- preset <- config file <- command-line overrides, then validated."""
    config = copy.deepcopy(DEFAULTS)
    if preset is not None:
        config = merge(config, load_preset(preset))
    if config_file is not None:
        config = merge(config, read_json_file(config_file, "config file"))
    if overrides:
        config = merge(config, overrides)
    validate(config)
    return config


def validate(config: dict[str, Any]) -> None:
    """Range checks that types alone cannot express."""
    tr = config["train"]
    sde = config["sde"]
    if sde["kind"] not in _SDE_KEYS:
        raise DifftimeError(f"sde.kind must be one of {sorted(_SDE_KEYS)}, got {sde['kind']!r}")
    if config["net"]["kind"] not in ("auto", *_NET_KEYS):
        raise DifftimeError(f"net.kind must be one of auto, mlp, unet; got {config['net']['kind']!r}")
    if not 0 < sde["eps"] < tr["T"] <= sde["T_max"]:
        raise DifftimeError(
            f"need 0 < sde.eps < train.T <= sde.T_max; got eps={sde['eps']}, T={tr['T']}, "
            f"T_max={sde['T_max']}"
        )
    for key in ("steps", "batch_size", "log_every", "ckpt_every", "keep_checkpoints"):
        if tr[key] < 1:
            raise DifftimeError(f"train.{key} must be >= 1, got {tr[key]}")
    for key in ("lr",):
        if not tr[key] > 0:
            raise DifftimeError(f"train.{key} must be > 0, got {tr[key]}")
    for key in ("warmup", "weight_decay", "grad_clip", "skip_nonfinite"):
        if tr[key] < 0:
            raise DifftimeError(f"train.{key} must be >= 0, got {tr[key]}")
    if not 0 <= tr["ema_decay"] < 1:
        raise DifftimeError(f"train.ema_decay must be in [0, 1), got {tr['ema_decay']}")
    if tr["ddp_noise"] not in ("per-rank", "shared"):
        raise DifftimeError(f"train.ddp_noise must be 'per-rank' or 'shared', got {tr['ddp_noise']!r}")
    if tr["weighting"] not in WEIGHTINGS:
        raise DifftimeError(f"train.weighting must be one of {', '.join(WEIGHTINGS)}, got {tr['weighting']!r}")
    if tr["t_distribution"] not in T_DISTRIBUTIONS:
        raise DifftimeError(f"train.t_distribution must be one of {', '.join(T_DISTRIBUTIONS)}, "
                            f"got {tr['t_distribution']!r}")
    if tr["weighting"] == "likelihood" and tr["t_distribution"] != "uniform":
        raise DifftimeError("train.weighting='likelihood' draws t uniformly or by importance sampling; "
                            "set train.t_distribution='uniform'")
    if tr["lr_schedule"] not in ("constant", "cosine"):
        raise DifftimeError(f"train.lr_schedule must be 'constant' or 'cosine', got {tr['lr_schedule']!r}")
    betas = tr["adam_betas"]
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise DifftimeError(f"train.adam_betas must be two numbers in [0, 1), got {betas}")
    for key in ("log_snr_std", "min_snr_gamma"):
        if not tr[key] > 0:
            raise DifftimeError(f"train.{key} must be > 0, got {tr[key]}")
    if not 0 <= config["seed"] < 2**63:  # the trainer seeds torch generators with seed + 2
        raise DifftimeError(f"seed must be in [0, 2**63), got {config['seed']}")
    _validate_net(config["net"])
    sde_from_config(sde_config(config))


def _validate_net(net: dict[str, Any]) -> None:
    """Limits the network constructors would otherwise hit deep inside torch."""
    for key in ("hidden", "depth", "time_dim", "ch", "num_res_blocks", "groups", "heads"):
        if net[key] < 1:
            raise DifftimeError(f"net.{key} must be >= 1, got {net[key]}")
    for key in ("time_dim", "ch"):  # each feeds sin/cos time features, half and half
        if net[key] % 2:
            raise DifftimeError(f"net.{key} must be even, got {net[key]}")
    if net["precond"] not in PRECONDITIONINGS:
        raise DifftimeError(f"net.precond must be one of {', '.join(PRECONDITIONINGS)}, got {net['precond']!r}")
    if not net["sigma_data"] > 0:
        raise DifftimeError(f"net.sigma_data must be > 0, got {net['sigma_data']}")
    if not 0 <= net["dropout"] < 1:
        raise DifftimeError(f"net.dropout must be in [0, 1), got {net['dropout']}")
    mult = net["ch_mult"]
    if not mult or min(mult) < 1:
        raise DifftimeError(f"net.ch_mult must be a non-empty list of integers >= 1, got {mult}")
    if any(not 0 <= level < len(mult) for level in net["attn_levels"]):
        raise DifftimeError(
            f"net.attn_levels must hold level indices in 0..{len(mult) - 1} (one per ch_mult entry), "
            f"got {net['attn_levels']}"
        )
    widths = [net["ch"] * m for level, m in enumerate(mult) if level in net["attn_levels"]]
    widths += [net["ch"] * mult[-1]] if net["mid_attention"] else []
    if any(w % net["heads"] for w in widths):
        raise DifftimeError(f"net.heads={net['heads']} must divide the width of every attention layer, {widths}")


def sde_config(config: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of the configured SDE, without the other kinds' keys."""
    sde = config["sde"]
    keys = (*_SDE_KEYS[sde["kind"]], "T_max", "eps")
    return {"kind": sde["kind"], **{k: sde[k] for k in keys}}


def net_config(config: dict[str, Any], shape: tuple[int, ...]) -> dict[str, Any]:
    """Resolve ``net.kind = auto`` and the input size from the data shape."""
    net = config["net"]
    kind = net["kind"]
    if kind == "auto":
        kind = "unet" if len(shape) == 3 else "mlp"
    if kind == "unet":
        if len(shape) != 3:
            raise DifftimeError(f"net.kind 'unet' needs images (C, H, W); the data has shape {shape}")
        resolved: dict[str, Any] = {"kind": "unet", "in_channels": shape[0]}
    else:
        d = 1
        for s in shape:
            d *= s
        resolved = {"kind": "mlp", "dim": d}
    resolved.update({k: net[k] for k in _NET_KEYS[kind]})
    if net["precond"] != "none":  # absent means none, so runs saved before the key resolve as they did
        resolved.update(precond=net["precond"], sigma_data=net["sigma_data"])
    return resolved
