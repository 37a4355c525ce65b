"""``train_run``, the one way to train or resume a run directory (used by the CLI, the study and the
benchmarks), ``saved_config`` of an existing run, and the ``TrainResult`` it returns."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from difftime import distributed
from difftime.config import DEFAULTS, merge, validate
from difftime.data import load_data
from difftime.errors import DifftimeError
from difftime.run import lock_run, read_run_config
from difftime.training.trainer import Trainer


@dataclass(frozen=True)
class TrainResult:
    run: str
    step: int
    resumed_at_step: int
    last_loss: float | None
    params: int
    processes: int
    wall_s: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def saved_config(run_dir: str | Path, steps: int | None = None) -> dict[str, Any]:
    """The training config of an existing run, over today's defaults (so a run saved before a key
    existed still resumes), with ``train.steps`` raised to ``steps`` when given."""
    run_dir = Path(run_dir)
    saved = read_run_config(run_dir)
    if not isinstance(saved.get("config"), dict):
        raise DifftimeError(f"{run_dir / 'config.json'} has no 'config' object; is it a difftime run?")
    if saved.get("resolved", {}).get("net", {}).get("kind") == "diffusers":
        raise DifftimeError(f"{run_dir} is an imported diffusers model; difftime samples and evaluates it but does "
                            "not train it")
    config = merge(merge(DEFAULTS, saved["config"]), {"train": {"steps": steps}} if steps else {})
    validate(config)
    return config


def train_run(config: dict[str, Any], out: str | Path, *, resume: bool = False,
              device: str | torch.device = "cpu", progress: bool = True) -> TrainResult:
    """Train ``config`` into the run directory ``out``, or with ``resume`` continue it from its newest
    checkpoint (bitwise as if uninterrupted). The writing process holds the run's lock throughout,
    so a second writer is refused with one line.

    ``config`` is a full, validated config (``difftime.config.build_config``: defaults, preset, file
    and overrides); ``device`` is "auto", "cpu", "cuda" or "cuda:K" (``difftime.distributed.resolve_device``)
    and ``progress`` shows a bar. The objective is denoising score matching on [eps, train.T]
    (docs/design.md §4; DDPM's eps loss, https://arxiv.org/abs/2006.11239, with the weightings of score SDE,
    https://arxiv.org/abs/2011.13456, Min-SNR, https://arxiv.org/abs/2303.09556, and EDM,
    https://arxiv.org/abs/2206.00364). Returns a :class:`TrainResult`; an existing run without
    ``resume`` raises DifftimeError.

    >>> import tempfile
    >>> import difftime as dt
    >>> from difftime.config import build_config
    >>> config = build_config(overrides={"data": "toy:moons:n=200,n_test=50", "net": {"hidden": 16, "depth": 2},
    ...     "train": {"steps": 5, "batch_size": 16, "warmup": 1, "ema_decay": 0.5}})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     result = dt.train_run(config, tmp + "/run", progress=False)
    >>> result.step, result.resumed_at_step, result.processes
    (5, 0, 1)
    """
    out = Path(out)
    if not resume and (out / "config.json").exists():
        raise DifftimeError(f"{out} already holds a run; pass --resume to continue it or choose another --out")
    main = distributed.rank() == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
    with lock_run(out) if main else contextlib.nullcontext():
        dataset = load_data(config["data"], seed=config["seed"])
        trainer = Trainer(config, dataset, device=device)
        if resume:
            trainer.load(out)
            if main:
                print(f"resuming {out} at step {trainer.step} of {config['train']['steps']}", file=sys.stderr)
        elif main:
            trainer.write_config(out)
        resumed_at = trainer.step
        start = time.perf_counter()
        last = trainer.fit(out, progress=progress)
    return TrainResult(run=str(out), step=trainer.step, resumed_at_step=resumed_at, last_loss=last.get("loss"),
                       params=sum(p.numel() for p in trainer.model.parameters()), processes=trainer.world,
                       wall_s=time.perf_counter() - start)

