"""The run directory: the one owner of its format.

A run directory holds
  config.json          everything needed to rebuild the SDE, network and scaler
  model.safetensors    raw weights
  ema.safetensors      EMA weights (what sampling and evaluation use by default)
  state.safetensors    optimizer moments, RNG states, data order: the resume state (trained runs)
  state.json           step, EMA count, and the sha256 of every weight file of this checkpoint
  metrics.jsonl        one JSON line per logged training step
  checkpoints/step-N/  the checkpoint files again, for each of the last train.keep_checkpoints saves
  .lock                held by the process that writes the run (see :func:`lock_run`)

state.json is written last, so a checkpoint is complete exactly when the hashes it lists match
the files beside it; a crash mid-save is caught at load instead of resuming from a mix. Each save
fills checkpoints/step-N/ first and only then replaces the top-level copy, with the top-level
state.json removed meanwhile, so a kill at any moment leaves at least one complete checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difftime.distributed import module_device, resolve_device
from difftime.errors import DifftimeError
from difftime.io import (
    atomic_write_bytes,
    exclusive_lock,
    fsync_dir,
    load_state_dict_strict,
    load_tensors,
    read_checked_json,
    read_json_file,
    refuse_pickle,
    save_checked_json,
    save_json,
)
from difftime.nets import net_from_config
from difftime.provenance import versions
from difftime.scaler import Scaler
from difftime.sde import SDE, sde_from_config

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
STATE_FILE = "state.json"
CHECKPOINTS = "checkpoints"
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.safetensors")
LOCK_FILE = ".lock"


# --- writing ----------------------------------------------------------------------------
@contextlib.contextmanager
def lock_run(run_dir: str | Path) -> Iterator[None]:
    """Refuse a second process that would write ``run_dir`` while this one does."""
    with exclusive_lock(Path(run_dir) / LOCK_FILE, f"run {run_dir}"):
        yield


def write_run_config(run_dir: str | Path, config: dict[str, Any], resolved: dict[str, Any],
                     **extra: Any) -> None:
    """config.json: the user's config, the resolved SDE/net/scaler/shape/data, the versions, and ``extra``."""
    save_json(Path(run_dir) / CONFIG_FILE, {
        "format_version": FORMAT_VERSION, "config": config, "resolved": resolved,
        "versions": versions(), **extra,
    })


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def checkpoint_step(folder: Path) -> int:
    return int(folder.name.removeprefix("step-"))


def saved_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete (state.json written) checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=checkpoint_step)


def newest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder of the newest complete checkpoint: the top level, or checkpoints/step-N/ when a
    kill interrupted replacing the top-level copy (or it is older). None before the first save."""
    run_dir = Path(run_dir)
    source, step = None, 0
    if (run_dir / STATE_FILE).is_file():
        source = run_dir
        step = read_checked_json(run_dir / STATE_FILE, "checkpoint state").get("step", 0)
    newest = saved_checkpoints(run_dir)[-1:]
    if newest and (source is None or checkpoint_step(newest[0]) > step):
        source = newest[0]
    return source


def write_checkpoint(folder: Path, files: dict[str, bytes], meta: dict[str, Any]) -> None:
    """The weight files first, state.json (with their sha256) last: a folder with a state.json is complete."""
    meta = {**meta, "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    save_checked_json(folder / STATE_FILE, meta)


def save_checkpoint(run_dir: str | Path, step: int, files: dict[str, bytes], meta: dict[str, Any],
                    keep: int) -> None:
    """Write checkpoints/step-N/, then replace the top-level copy, then keep the newest ``keep`` folders."""
    run_dir = Path(run_dir)
    write_checkpoint(checkpoint_dir(run_dir, step), files, meta)
    # Without state.json the top level reads as incomplete, so a kill while it is being
    # replaced sends load and load_run to the folder just written.
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    write_checkpoint(run_dir, files, meta)
    for old in saved_checkpoints(run_dir)[:-keep]:
        remove_checkpoint(old)


def publish_checkpoint(run_dir: Path, source: Path) -> None:
    """Copy a complete checkpoint folder to the top level (after a kill left the top level behind)."""
    if source == run_dir:
        return
    meta = read_checked_json(source / STATE_FILE, "checkpoint state")
    meta.pop("sha256", None)
    (run_dir / STATE_FILE).unlink(missing_ok=True)
    write_checkpoint(run_dir, {name: (source / name).read_bytes() for name in CHECKPOINT_FILES}, meta)


def remove_checkpoint(folder: Path) -> None:
    (folder / STATE_FILE).unlink(missing_ok=True)  # first, so a half-deleted folder never looks complete
    fsync_dir(folder)
    shutil.rmtree(folder)


def tidy(run_dir: Path, step: int, keep: int | None = None) -> None:
    """Remove what killed writes left: temporary files, checkpoint folders that are incomplete or
    ahead of ``step``, complete folders beyond the newest ``keep`` (a kill between the last save and
    its pruning), and log lines after ``step`` (so a resumed log has no duplicate steps)."""
    folders = [p for p in (run_dir / CHECKPOINTS).glob("step-*") if p.name[5:].isdigit()]
    for folder in (run_dir, *folders):
        for name in (*CHECKPOINT_FILES, STATE_FILE, "metrics.jsonl", CONFIG_FILE):
            for tmp in folder.glob(f".{name}.*.tmp"):
                tmp.unlink()
    for folder in folders:
        if not (folder / STATE_FILE).is_file() or checkpoint_step(folder) > step:
            remove_checkpoint(folder)
    if keep is not None:
        for old in saved_checkpoints(run_dir)[:-keep]:
            remove_checkpoint(old)
    _truncate_log(run_dir / "metrics.jsonl", step)


def _truncate_log(path: Path, step: int) -> None:
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # also the torn last line of a killed run
    atomic_write_bytes(path, "".join(f"{line}\n" for line in keep).encode())


# --- reading ----------------------------------------------------------------------------
@dataclass
class Run:
    """Everything ``load_run`` rebuilds from a run directory, with typed fields."""

    path: Path
    config: dict[str, Any]  # config.json as written: "config", "resolved", "versions", ...
    sde: SDE
    model: nn.Module
    scaler: Scaler
    shape: tuple[int, ...]
    step: int

    @property
    def device(self) -> torch.device:
        """Where the model lives: sampling and the likelihoods of this run compute there."""
        return module_device(self.model)

    @property
    def T_train(self) -> float:
        """The training horizon: the network is trained on [eps, T_train]."""
        return float(self.config["config"]["train"]["T"])

    @property
    def data_spec(self) -> str:
        """The data the run was trained on, as a ``load_data`` spec."""
        return self.config["config"]["data"]

    @property
    def seed(self) -> int:
        return int(self.config["config"]["seed"])


def read_run_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    refuse_pickle(path)
    if not (path / CONFIG_FILE).is_file():
        raise DifftimeError(f"{path} is not a difftime run directory (no config.json)")
    return read_json_file(path / CONFIG_FILE, "run config")


def load_run(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu") -> Run:
    """Rebuild the SDE, the network (``weights`` = "ema" or "model") and the scaler of a run.

    ``path`` is a run directory written by ``train_run`` (or ``difftime train`` / ``import``). Returns
    a :class:`Run` whose ``model`` holds the newest complete checkpoint's weights, in eval mode, with
    ``sde``, ``scaler``, ``shape``, ``step`` and the saved ``config``. A missing, malformed or
    corrupt run raises DifftimeError. The format is docs/design.md §8.

    The model is placed on ``device`` ("auto", "cpu", "cuda", "cuda:K":
    ``difftime.distributed.resolve_device``), and ``run.device`` says where it is. Weights are read
    to the CPU and then moved, so a run written on one device loads on any other; the scaler holds
    no tensors.

    >>> import tempfile, torch
    >>> import difftime as dt
    >>> from difftime.config import build_config
    >>> config = build_config(overrides={"data": "toy:moons:n=200,n_test=50", "net": {"hidden": 16, "depth": 2},
    ...     "train": {"steps": 5, "batch_size": 16, "warmup": 1, "ema_decay": 0.5}})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     _ = dt.train_run(config, tmp + "/run", progress=False)
    ...     run = dt.load_run(tmp + "/run")
    >>> run.sde, run.shape, run.step, run.T_train
    (VPSDE(b0=0.1, b1=20.0, T_max=1.0, eps=1e-05), (2,), 5, 1.0)
    >>> tuple(run.model(torch.zeros(3, 2), torch.full((3,), 0.5)).shape)   # model(x, t) -> eps_hat
    (3, 2)
    >>> run.device
    device(type='cpu')
    """
    path = Path(path)
    if weights not in ("ema", "model"):
        raise DifftimeError(f"weights must be 'ema' or 'model', got {weights!r}")
    target = resolve_device(device)  # a bad name fails before anything is read
    config = read_run_config(path)
    try:
        resolved = config["resolved"]
        sde = sde_from_config(resolved["sde"])
        model = net_from_config(resolved["net"], sde)
        scaler = Scaler.from_dict(resolved["scaler"])
        shape = tuple(resolved["shape"])
    except DifftimeError as exc:
        raise DifftimeError(f"{path / CONFIG_FILE} is invalid: {exc}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DifftimeError(f"{path / CONFIG_FILE} is missing or has a malformed field {exc}") from None
    source = newest_checkpoint(path)
    state = read_checked_json(source / STATE_FILE, "checkpoint state") if source is not None else {}
    file = (source or path) / f"{weights}.safetensors"
    load_state_dict_strict(model, load_tensors(file, state.get("sha256", {}).get(file.name)), file)
    model.to(target).eval()
    return Run(path=path, config=config, sde=sde, model=model, scaler=scaler, shape=shape,
               step=int(state.get("step", 0)))
