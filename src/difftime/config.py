"""Run configuration: defaults, presets, merging and validation.

A config is plain JSON-ready nested dicts. Every key a user gives must exist in the defaults
and have a compatible type, so a typo is an error instead of a silently ignored setting.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from difftime.errors import DifftimeError

PRESET_DIR = Path(__file__).resolve().parent / "presets"

DEFAULTS: dict[str, Any] = {
    "data": "digits",
    "seed": 0,
    "sde": {"kind": "vp", "b0": 0.1, "b1": 20.0, "sigma_min": 0.01, "sigma_max": 50.0,
            "T_max": 1.0, "eps": 1e-5},
    # "auto" picks a U-Net for images and an MLP for vectors; the resolved net is recorded.
    "net": {"kind": "auto", "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_levels": [],
            "mid_attention": True, "dropout": 0.0, "groups": 8, "heads": 1,
            "hidden": 128, "depth": 3, "time_dim": 64},
    "train": {
        "T": 1.0,                # training horizon: t ~ [eps, T]
        "steps": 2000,
        "batch_size": 128,
        "lr": 2e-4,
        "weight_decay": 0.0,
        "warmup": 100,
        "grad_clip": 1.0,
        "ema_decay": 0.999,
        "weighting": "standard",  # "standard" (lambda = v) or "likelihood" (lambda = g^2)
        "importance_sampling": True,  # only used with likelihood weighting
        "bf16": False,
        "channels_last": False,
        "log_every": 25,
        "ckpt_every": 500,
    },
}

_NET_KEYS = {
    "mlp": ("hidden", "depth", "time_dim", "dropout"),
    "unet": ("ch", "ch_mult", "num_res_blocks", "attn_levels", "mid_attention", "dropout",
             "groups", "heads"),
}
_SDE_KEYS = {"vp": ("b0", "b1"), "subvp": ("b0", "b1"), "ve": ("sigma_min", "sigma_max")}


def _check_type(path: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    else:
        ok = isinstance(value, type(default))
    if not ok:
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


def read_json_file(path: str | Path, what: str) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DifftimeError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DifftimeError(f"cannot read {what} {path}: {exc}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DifftimeError(f"{what} {path} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise DifftimeError(f"{what} {path} must hold a JSON object, got {type(obj).__name__}")
    return obj


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
    for key in ("steps", "batch_size", "log_every", "ckpt_every"):
        if tr[key] < 1:
            raise DifftimeError(f"train.{key} must be >= 1, got {tr[key]}")
    for key in ("lr",):
        if not tr[key] > 0:
            raise DifftimeError(f"train.{key} must be > 0, got {tr[key]}")
    for key in ("warmup", "weight_decay", "grad_clip"):
        if tr[key] < 0:
            raise DifftimeError(f"train.{key} must be >= 0, got {tr[key]}")
    if not 0 <= tr["ema_decay"] < 1:
        raise DifftimeError(f"train.ema_decay must be in [0, 1), got {tr['ema_decay']}")
    if tr["weighting"] not in ("standard", "likelihood"):
        raise DifftimeError(
            f"train.weighting must be 'standard' or 'likelihood', got {tr['weighting']!r}"
        )
    if config["seed"] < 0:
        raise DifftimeError(f"seed must be >= 0, got {config['seed']}")


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
    return resolved
