"""Retrofit: a local diffusers DDPM folder -> a difftime run directory (see :mod:`difftime.nets.diffusers`
for the VP correspondence and the time map)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from difftime.data import load_data
from difftime.errors import DifftimeError
from difftime.io import encode_tensors, load_state_dict_strict, read_json_file, sha256_file
from difftime.nets import net_from_config
from difftime.nets.diffusers import KERNEL_TOL, check_schedule, check_unet_config, diffusers_module
from difftime.provenance import versions
from difftime.run import lock_run, write_checkpoint, write_run_config

_SCHEDULER_FILE = "scheduler_config.json"


def _locate(directory: Path) -> tuple[Path, Path]:
    """(UNet folder, scheduler config) of a pipeline folder (unet/, scheduler/) or of a bare UNet folder."""
    if not directory.is_dir():
        raise DifftimeError(f"diffusers:{directory}: not a directory")
    if (directory / "unet" / "config.json").is_file():
        unet_dir = directory / "unet"
        candidates = [directory / "scheduler" / _SCHEDULER_FILE]
    elif (directory / "config.json").is_file():
        unet_dir = directory
        candidates = [directory / _SCHEDULER_FILE, directory.parent / "scheduler" / _SCHEDULER_FILE]
    else:
        raise DifftimeError(
            f"diffusers:{directory}: no unet/config.json or config.json; expected a folder saved by "
            "DDPMPipeline.save_pretrained or UNet2DModel.save_pretrained"
        )
    for path in candidates:
        if path.is_file():
            return unet_dir, path
    raise DifftimeError(
        f"diffusers:{directory}: no {_SCHEDULER_FILE} beside the UNet; difftime needs the training "
        "schedule: save the DDPMScheduler there with scheduler.save_pretrained(DIR)"
    )


def _weights_variant(unet_dir: Path) -> str | None:
    """The safetensors variant to load; pickled weights are refused rather than unpickled."""
    base = "diffusion_pytorch_model"
    if (unet_dir / f"{base}.safetensors").is_file() or (unet_dir / f"{base}.safetensors.index.json").is_file():
        return None
    variants = sorted(p.name[len(base) + 1 : -len(".safetensors")] for p in unet_dir.glob(f"{base}.*.safetensors"))
    if len(variants) == 1:
        return variants[0]
    if variants:
        raise DifftimeError(f"{unet_dir}: several weight variants {variants}; keep one {base}.safetensors")
    raise DifftimeError(
        f"{unet_dir}: no {base}.safetensors; difftime never unpickles .bin weights. Convert them "
        "once in a trusted environment: UNet2DModel.from_pretrained(DIR).save_pretrained(DIR)"
    )


def _check_data_range(dataset: Any, spec: str) -> None:
    """DDPM checkpoints are trained on images in [-1, 1]; a scaler that maps elsewhere would feed them garbage."""
    scaler = dataset.scaler
    if scaler.discrete:
        lo, hi = scaler.b, scaler.a + scaler.b
    else:
        x = scaler.encode(dataset.train[:4096])
        lo, hi = float(x.min()), float(x.max())
    if lo < -1 - 1e-6 or hi > 1 + 1e-6 or (scaler.discrete and (lo, hi) != (-1.0, 1.0)):
        raise DifftimeError(
            f"--data {spec} maps to model space [{lo:g}, {hi:g}], but a DDPM checkpoint expects "
            "images scaled to [-1, 1]"
        )


def import_diffusers(directory: str | Path, data: str, out: str | Path, seed: int = 0) -> dict[str, Any]:
    """Write a difftime run directory for a local diffusers UNet2DModel + DDPM scheduler.

    The UNet's weights are copied, as float32 safetensors, into ``out``/ema.safetensors (and
    model.safetensors), checksummed in state.json like a trained run's, so the run is
    self-contained. ``data`` is the data the model was trained on: fit-prior draws x0 from it.
    """
    directory, out = Path(directory).expanduser(), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DifftimeError(f"--out {out} exists and is not an empty directory; choose a new one")
    unet_dir, scheduler_path = _locate(directory)
    scheduler_cfg = read_json_file(scheduler_path, "scheduler config")
    unet_cfg = read_json_file(unet_dir / "config.json", "UNet config")
    schedule, prediction = check_schedule(scheduler_cfg, where=str(scheduler_path))
    shape = check_unet_config(unet_cfg, scheduler_cfg.get("variance_type", "fixed_small"), where=str(unet_dir))
    dataset = load_data(data, seed=seed)
    if tuple(dataset.shape) != shape:
        raise DifftimeError(
            f"--data {data} has shape {tuple(dataset.shape)}, but the UNet in {unet_dir} takes "
            f"{shape} (in_channels, sample_size); pass the data it was trained on"
        )
    _check_data_range(dataset, data)

    diffusers = diffusers_module()
    variant = _weights_variant(unet_dir)
    try:
        unet = diffusers.UNet2DModel.from_pretrained(
            unet_dir,
            use_safetensors=True,
            local_files_only=True,
            low_cpu_mem_usage=False,
            variant=variant,
            torch_dtype=torch.float32,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise DifftimeError(f"{unet_dir}: diffusers cannot load the UNet: {str(exc).splitlines()[0]}") from None
    net_cfg = {
        "kind": "diffusers",
        "unet": {k: v for k, v in dict(unet.config).items() if not k.startswith("_")},
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "prediction_type": prediction,
    }
    net_cfg = json.loads(json.dumps(net_cfg))  # tuples -> lists, exactly as load_run will read it back
    model = net_from_config(net_cfg)
    load_state_dict_strict(
        model,
        {f"unet.{k}": v.float() for k, v in unet.state_dict().items()},
        unet_dir,
        described_by="its own config.json",
    )
    sde = model.sde

    source_files = sorted(p for p in unet_dir.iterdir() if p.name.endswith(".safetensors"))
    # Only keys the config defaults know, so `study --run` can merge it; the real net is in "resolved".
    config = {"data": data, "seed": seed, "train": {"T": 1.0}, "sde": sde.to_config()}
    out.mkdir(parents=True, exist_ok=True)
    with lock_run(out):
        write_run_config(
            out, config,
            {"sde": sde.to_config(), "net": net_cfg, "scaler": dataset.scaler.to_dict(),
             "shape": list(dataset.shape), "data": dataset.name},
            versions={**versions(), "diffusers": diffusers.__version__},
            imported={
                "from": f"diffusers:{directory.resolve()}",
                "scheduler": scheduler_cfg,
                "kernel_error": schedule.kernel_error(),
                "kernel_tolerance": KERNEL_TOL,
                "source_sha256": {p.name: sha256_file(p) for p in source_files},
            },
        )
        # A pretrained checkpoint has one set of weights: "model" and "ema" are the same bytes, and
        # state.json checksums them like a trained run's.
        weights = encode_tensors(model.state_dict())
        write_checkpoint(out, {"ema.safetensors": weights, "model.safetensors": weights}, {"step": 0})
    return {
        "run": str(out),
        "from": f"diffusers:{directory}",
        "shape": list(shape),
        "num_train_timesteps": schedule.num_train_timesteps,
        "sde": sde.to_config(),
        "prediction_type": prediction,
        "kernel_error": round(schedule.kernel_error(), 6),
        "params": sum(p.numel() for p in model.parameters()),
    }
