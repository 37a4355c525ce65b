"""On-disk formats: atomic writes, safetensors + JSON, and the run directory.

A run directory holds
  config.json          everything needed to rebuild the SDE, network and scaler
  model.safetensors    raw weights
  ema.safetensors      EMA weights (what sampling and evaluation use by default)
  state.safetensors    optimizer moments, RNG states, data order: the resume state
  state.json           step, EMA count, and the sha256 of every weight file of this checkpoint
  metrics.jsonl        one JSON line per logged training step
  checkpoints/step-N/  the four checkpoint files again, for each of the last train.keep_checkpoints saves

state.json is written last, so a checkpoint is complete exactly when the hashes it lists match
the files beside it; a crash mid-save is caught at load instead of resuming from a mix. Each save
fills checkpoints/step-N/ first and only then replaces the top-level copy, with the top-level
state.json removed meanwhile, so a kill at any moment leaves at least one complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import Tensor, nn

from difftime.config import read_json_file
from difftime.errors import DifftimeError

FORMAT_VERSION = 1
_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename over ``path``, fsync the folder.

    Any failure (a folder that is not writable, a full disk) leaves an existing ``path`` as it was.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide results from collaborators
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_dir(path.parent)
    except OSError as exc:
        raise DifftimeError(
            f"cannot write {path}: {exc.strerror or exc}; check that the folder is writable and the disk "
            "has free space"
        ) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def fsync_dir(directory: str | Path) -> None:
    """Make renames and deletions in ``directory`` durable, not just the files' bytes."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _json_digest(obj: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def save_checked_json(path: str | Path, obj: dict[str, Any]) -> None:
    """save_json plus a checksum of the content, so a flipped digit is caught, not obeyed."""
    save_json(path, {**obj, "checksum": _json_digest(obj)})


def read_checked_json(path: str | Path, what: str) -> dict[str, Any]:
    obj = read_json_file(path, what)
    digest = obj.pop("checksum", None)  # files from before checksums have none
    if digest is not None and digest != _json_digest(obj):
        raise DifftimeError(f"{what} {path} does not match its own checksum: the file is corrupt")
    return obj


def encode_tensors(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def save_tensors(path: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save with safetensors atomically; returns the sha256 of the bytes written."""
    data = encode_tensors(tensors, metadata)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def refuse_pickle(path: str | Path) -> None:
    """Unpickling a file can run arbitrary code, so a user's pickle is refused before it is opened."""
    suffix = Path(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise DifftimeError(
            f"{path} is a pickle-based {suffix} file, and difftime never unpickles user files (that can run "
            "arbitrary code); save weights as safetensors, e.g. safetensors.torch.save_file(torch.load(FILE, "
            "weights_only=True), 'weights.safetensors'), and data as .npz"
        )


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_tensors(path: str | Path, expected_sha256: str | None = None) -> dict[str, Tensor]:
    path = Path(path)
    refuse_pickle(path)
    if not path.is_file():
        raise DifftimeError(f"{path} does not exist")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise DifftimeError(
            f"{path} does not match the checksum recorded in state.json: the file is corrupt or "
            "from another checkpoint"
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DifftimeError(f"{path} is not a readable safetensors file: {exc}") from None


def load_state_dict_strict(module: nn.Module, tensors: dict[str, Tensor], source: Path,
                           described_by: str = "config.json") -> None:
    """Load weights requiring the exact keys, shapes and dtypes and finite values, naming what differs."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise DifftimeError(
            f"{source} does not match the network in {described_by}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    for key, value in expected.items():
        tensor = tensors[key]
        if tensor.shape != value.shape or tensor.dtype != value.dtype:
            raise DifftimeError(
                f"{source}: tensor {key!r} has shape {tuple(tensor.shape)} and dtype {tensor.dtype}; the "
                f"network in {described_by} expects shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise DifftimeError(f"{source}: tensor {key!r} holds NaN or Inf values")
    module.load_state_dict(tensors, strict=True)


CHECKPOINTS = "checkpoints"
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.safetensors")


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def saved_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete (state.json written) checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


@dataclass
class Run:
    """Everything ``load_run`` rebuilds from a run directory."""

    path: Path
    config: dict[str, Any]
    sde: Any
    model: nn.Module
    scaler: Any
    shape: tuple[int, ...]
    step: int


def load_run(path: str | Path, weights: str = "ema") -> Run:
    """Rebuild the SDE, the network (``weights`` = "ema" or "model") and the scaler of a run."""
    from difftime.data import Scaler
    from difftime.nets import net_from_config
    from difftime.sde import sde_from_config

    path = Path(path)
    refuse_pickle(path)
    if weights not in ("ema", "model"):
        raise DifftimeError(f"weights must be 'ema' or 'model', got {weights!r}")
    if not (path / "config.json").is_file():
        raise DifftimeError(f"{path} is not a difftime run directory (no config.json)")
    config = read_json_file(path / "config.json", "run config")
    try:
        resolved = config["resolved"]
        sde = sde_from_config(resolved["sde"])
        model = net_from_config(resolved["net"])
        scaler = Scaler.from_dict(resolved["scaler"])
        shape = tuple(resolved["shape"])
    except DifftimeError as exc:
        raise DifftimeError(f"{path / 'config.json'} is invalid: {exc}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DifftimeError(f"{path / 'config.json'} is missing or has a malformed field {exc}") from None
    # No top-level state.json but saved checkpoints: training was killed while publishing one.
    source = path
    if not (path / "state.json").is_file() and saved_checkpoints(path):
        source = saved_checkpoints(path)[-1]
    state = read_checked_json(source / "state.json", "checkpoint state") if (source / "state.json").is_file() else {}
    file = source / f"{weights}.safetensors"
    load_state_dict_strict(model, load_tensors(file, state.get("sha256", {}).get(file.name)), file)
    model.eval()
    return Run(path=path, config=config, sde=sde, model=model, scaler=scaler, shape=shape,
               step=int(state.get("step", 0)))
