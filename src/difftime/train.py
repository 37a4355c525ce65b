"""Denoising score matching on a free horizon, and the trainer that writes run directories."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from difftime import __version__
from difftime.config import net_config, sde_config
from difftime.data import Dataset
from difftime.errors import DifftimeError
from difftime.io import (
    FORMAT_VERSION,
    load_state_dict_strict,
    load_tensors,
    read_json_file,
    save_json,
    save_tensors,
)
from difftime.nets import net_from_config
from difftime.sde import SDE, sde_from_config


def sample_time(
    sde: SDE,
    n: int,
    T: float,
    eps: float,
    weighting: str,
    importance_sampling: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Draw t on [eps, T] and the per-example weight that makes the DSM loss unbiased.

    With ``weighting="standard"`` (lambda = v) the loss is ||eps_hat - z||^2 under uniform t.
    With ``weighting="likelihood"`` (lambda = g^2) the integrand is (g^2/v) ||eps_hat - z||^2;
    importance sampling draws t with density g^2/(v Z), leaving the constant weight Z.
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
    if weighting == "likelihood" and importance_sampling:
        t = sde.importance_sample_t(u, T, eps)
        weight = torch.full_like(t, sde.importance_Z(T, eps))
    else:
        t = eps + (T - eps) * u
        weight = sde.g2(t) / sde.v(t) * (T - eps) if weighting == "likelihood" else torch.ones_like(t)
    return t.float(), weight.float()


def dsm_loss(
    model: nn.Module,
    sde: SDE,
    x0: Tensor,
    t: Tensor,
    weight: Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Per-example weighted eps-matching loss, averaged over dimensions; shape (B,)."""
    xt, z = sde.marginal_sample(x0, t, generator)
    eps_hat = model(xt, t).float()
    return weight * (eps_hat - z).pow(2).flatten(1).mean(1)


def versions() -> dict[str, str]:
    """Versions of difftime and the libraries whose numerics a result depends on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"difftime": __version__, "python": sys.version.split()[0]}
    for package in ("torch", "numpy", "torchdiffeq", "zuko", "safetensors", "scipy"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


class Trainer:
    """Owns the model, EMA, optimizer, data order and RNG streams of one training run.

    All randomness flows from two generators seeded by ``config["seed"]`` (data order and
    per-step noise), plus torch's global RNG for dropout; all three are checkpointed, so a
    resumed run continues the same random stream as an uninterrupted one.
    """

    def __init__(self, config: dict[str, Any], dataset: Dataset, device: str = "cpu") -> None:
        self.config = config
        self.dataset = dataset
        self.device = torch.device(device)
        tr = config["train"]
        self.tr = tr
        self.sde = sde_from_config(sde_config(config))
        self.T, self.eps = self.sde.check_horizon(tr["T"])
        self.net_config = net_config(config, dataset.shape)
        seed = config["seed"]
        torch.manual_seed(seed)
        self.model = net_from_config(self.net_config).to(self.device)
        if tr["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = AveragedModel(
            self.model, multi_avg_fn=get_ema_multi_avg_fn(tr["ema_decay"]), use_buffers=True
        )
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=tr["lr"], weight_decay=tr["weight_decay"]
        )
        self.data_gen = torch.Generator().manual_seed(seed + 1)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(seed + 2)
        self.train_data = dataset.train
        self.order = torch.randperm(len(self.train_data), generator=self.data_gen)
        self.position = 0
        self.step = 0

    # --- one step ------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        return self.tr["lr"] * min(1.0, (step + 1) / max(1, self.tr["warmup"]))

    def next_batch(self) -> Tensor:
        bs = min(self.tr["batch_size"], len(self.train_data))
        if self.position + bs > len(self.order):
            self.order = torch.randperm(len(self.train_data), generator=self.data_gen)
            self.position = 0
        idx = self.order[self.position : self.position + bs]
        self.position += bs
        raw = self.train_data[idx]
        x0 = self.dataset.scaler.encode(raw, generator=self.data_gen).to(self.device)
        if self.tr["channels_last"] and x0.dim() == 4:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        return x0

    def train_step(self) -> dict[str, float]:
        x0 = self.next_batch()
        t, weight = sample_time(
            self.sde, len(x0), self.T, self.eps, self.tr["weighting"],
            self.tr["importance_sampling"], self.noise_gen, self.device,
        )
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.tr["bf16"] else contextlib.nullcontext()
        )
        with autocast:
            loss = dsm_loss(self.model, self.sde, x0, t, weight, self.noise_gen).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.tr["grad_clip"] or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.ema.update_parameters(self.model)
        self.step += 1
        return {"loss": loss.item(), "grad_norm": grad_norm.item()}

    # --- the loop ------------------------------------------------------------------------
    def fit(self, run_dir: str | Path, progress: bool = True) -> dict[str, float]:
        """Train until ``train.steps``, logging and checkpointing into ``run_dir``."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        total = self.tr["steps"]
        log_path = run_dir / "metrics.jsonl"
        bar = tqdm(total=total, initial=self.step, disable=not progress, desc="train",
                   unit="step", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 5.0)
        last: dict[str, float] = {}
        window: list[float] = []
        tick = time.perf_counter()
        tick_step = self.step
        with bar, open(log_path, "a") as log:
            while self.step < total:
                last = self.train_step()
                if not math.isfinite(last["loss"]):
                    raise DifftimeError(
                        f"training diverged: non-finite loss at step {self.step}; the last good "
                        f"checkpoint is in {run_dir}; lower train.lr or enable train.grad_clip"
                    )
                window.append(last["loss"])
                bar.update(1)
                if self.step % self.tr["log_every"] == 0 or self.step == total:
                    now = time.perf_counter()
                    record = {"step": self.step, "loss": sum(window) / len(window),
                              "grad_norm": last["grad_norm"], "lr": self.lr_at(self.step - 1),
                              "steps_per_s": (self.step - tick_step) / max(now - tick, 1e-9)}
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                    window.clear()
                    tick, tick_step = now, self.step
                if self.step % self.tr["ckpt_every"] == 0 or self.step == total:
                    self.save(run_dir)
        return last

    # --- run directory -------------------------------------------------------------------
    def resolved(self) -> dict[str, Any]:
        return {
            "sde": self.sde.to_config(),
            "net": self.net_config,
            "scaler": self.dataset.scaler.to_dict(),
            "shape": list(self.dataset.shape),
            "data": self.dataset.name,
        }

    def write_config(self, run_dir: str | Path) -> None:
        save_json(Path(run_dir) / "config.json", {
            "format_version": FORMAT_VERSION,
            "config": self.config,
            "resolved": self.resolved(),
            "versions": versions(),
        })

    def save(self, run_dir: str | Path) -> None:
        run_dir = Path(run_dir)
        hashes = {
            "model.safetensors": save_tensors(run_dir / "model.safetensors", self.model.state_dict()),
            "ema.safetensors": save_tensors(run_dir / "ema.safetensors", self.ema.module.state_dict()),
        }
        state: dict[str, Tensor] = {
            "rng.data": self.data_gen.get_state(),
            "rng.noise": self.noise_gen.get_state(),
            "rng.torch": torch.get_rng_state(),
            "data.order": self.order,
        }
        opt = self.optimizer.state_dict()
        for idx, slots in opt["state"].items():
            for name, value in slots.items():
                state[f"optim.{idx}.{name}"] = value
        hashes["state.safetensors"] = save_tensors(run_dir / "state.safetensors", state)
        save_json(run_dir / "state.json", {
            "step": self.step,
            "data_position": self.position,
            "ema_n_averaged": int(self.ema.n_averaged.item()),
            "optim_param_groups": opt["param_groups"],
            "sha256": hashes,
        })

    def load(self, run_dir: str | Path) -> None:
        """Restore a checkpoint written by ``save``; every file must match state.json."""
        run_dir = Path(run_dir)
        meta = read_json_file(run_dir / "state.json", "checkpoint state")
        try:
            hashes = meta["sha256"]
            load_state_dict_strict(
                self.model,
                load_tensors(run_dir / "model.safetensors", hashes["model.safetensors"]),
                run_dir / "model.safetensors",
            )
            load_state_dict_strict(
                self.ema.module,
                load_tensors(run_dir / "ema.safetensors", hashes["ema.safetensors"]),
                run_dir / "ema.safetensors",
            )
            state = load_tensors(run_dir / "state.safetensors", hashes["state.safetensors"])
            self.ema.n_averaged.fill_(meta["ema_n_averaged"])
            slots: dict[int, dict[str, Tensor]] = {}
            for key, value in state.items():
                if key.startswith("optim."):
                    _, idx, name = key.split(".", 2)
                    slots.setdefault(int(idx), {})[name] = value.to(self.device)
            self.optimizer.load_state_dict({"state": slots, "param_groups": meta["optim_param_groups"]})
            self.data_gen.set_state(state["rng.data"])
            self.noise_gen.set_state(state["rng.noise"])
            torch.set_rng_state(state["rng.torch"])
            self.order = state["data.order"]
            self.position = int(meta["data_position"])
            self.step = int(meta["step"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise DifftimeError(f"{run_dir} holds an unusable checkpoint: {exc}") from None
        _truncate_log(run_dir / "metrics.jsonl", self.step)


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint, so a resumed log has no duplicate steps."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    path.write_text("".join(f"{line}\n" for line in keep))
