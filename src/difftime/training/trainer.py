"""The trainer: model, EMA, optimizer, data order and RNG streams of one run, written through
:mod:`difftime.run`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from difftime import distributed
from difftime.config import net_config, sde_config
from difftime.data import Dataset
from difftime.errors import DifftimeError
from difftime.io import encode_tensors, load_state_dict_strict, load_tensors, read_checked_json
from difftime.nets import net_from_config
from difftime.rng import randn_on, stream_seed
from difftime.run import (
    newest_checkpoint,
    publish_checkpoint,
    save_checkpoint,
    tidy,
    write_run_config,
)
from difftime.sde import sde_from_config
from difftime.training.ema import ema_update, initial_weight_share
from difftime.training.loss import dsm_loss, lr_factor, sample_time


class Trainer:
    """Owns the model, EMA, optimizer, data order and RNG streams of one training run.

    All randomness flows from two CPU generators seeded by ``config["seed"]`` (data order and
    per-step noise, drawn on the CPU and moved to the device: difftime.rng's rule, so a seed trains
    on the same draws on every device), plus torch's global RNG for dropout (the CUDA one on a GPU);
    all are checkpointed, so a resumed run continues the same random stream as an uninterrupted one. A step with a
    non-finite loss or gradient changes no weights; ``train.skip_nonfinite`` such steps are
    skipped (they still consume their batch and noise, so resume stays exact), one more stops.

    Under torchrun (see :mod:`difftime.distributed`) ``train.batch_size`` is the global batch:
    every rank draws the same data order and dequantization and trains on its slice, with its
    own noise stream (``train.ddp_noise = "per-rank"``; rank 0's is the one-process stream) or
    with its slice of one shared stream (``"shared"``: the same computation as one process, at
    the cost of every rank drawing the whole batch's noise). DDP averages the gradients, so the
    model, optimizer and EMA are identical on every rank; rank 0 writes logs and checkpoints,
    which hold every rank's RNG states.
    """

    def __init__(self, config: dict[str, Any], dataset: Dataset, device: str | torch.device = "cpu") -> None:
        self.config = config
        self.dataset = dataset
        self.device = distributed.resolve_device(device)  # "auto", "cuda:K", ...: one reading of a name
        tr = config["train"]
        self.tr = tr
        self.sde = sde_from_config(sde_config(config))
        self.T, self.eps = self.sde.check_horizon(tr["T"])
        self.net_config = net_config(config, dataset.shape)
        seed = config["seed"]
        torch.manual_seed(seed)
        self.model = net_from_config(self.net_config, self.sde).to(self.device)
        if tr["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.shared_noise = tr["ddp_noise"] == "shared"
        if min(tr["batch_size"], len(dataset.train)) % self.world:
            raise DifftimeError(
                f"train.batch_size={min(tr['batch_size'], len(dataset.train))} is the global batch and must split "
                f"evenly across the {self.world} processes"
            )
        # DDP all-reduces the gradients in backward; the EMA and checkpoints use the bare module.
        self.net = self.model if self.world == 1 else DistributedDataParallel(
            self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
        self.ema = AveragedModel(self.model, multi_avg_fn=ema_update(tr["ema_decay"], tr["ema_warmup"]),
                                 use_buffers=True)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=tr["lr"], betas=tuple(tr["adam_betas"]), weight_decay=tr["weight_decay"]
        )
        self.data_gen = torch.Generator().manual_seed(seed + 1)
        self.noise_gen = torch.Generator().manual_seed(self._noise_seed(self.rank))
        if self.rank:  # dropout masks differ across ranks too; rank 0 keeps the one-process stream
            torch.manual_seed(self._noise_seed(self.rank) + 1)
        self.train_data = dataset.train
        self.order = torch.randperm(len(self.train_data), generator=self.data_gen)
        self.position = 0
        self.step = 0
        self.skipped: list[int] = []
        self.saved_step: int | None = None

    def _global_rng_state(self) -> dict[str, Tensor]:
        """torch's global RNG states that this rank's dropout draws from: the CPU's, and its GPU's."""
        states = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        return states

    def _noise_seed(self, rank: int) -> int:
        if rank == 0 or self.shared_noise:
            return self.config["seed"] + 2
        return stream_seed(self.config["seed"] + 2, rank)

    # --- one step ------------------------------------------------------------------------
    def lr_at(self, step: int) -> float:
        return self.tr["lr"] * lr_factor(step, self.tr["steps"], self.tr["warmup"], self.tr["lr_schedule"])

    def next_batch(self) -> Tensor:
        bs = min(self.tr["batch_size"], len(self.train_data))
        if self.position + bs > len(self.order):
            self.order = torch.randperm(len(self.train_data), generator=self.data_gen)
            self.position = 0
        idx = self.order[self.position : self.position + bs]
        self.position += bs
        raw = self.train_data[idx]
        # The whole global batch is dequantized on every rank, which keeps data_gen in step everywhere.
        x0 = distributed.shard(self.dataset.scaler.encode(raw, generator=self.data_gen)).to(self.device)
        if self.tr["channels_last"] and x0.dim() == 4:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        return x0

    def train_step(self) -> dict[str, float]:
        """One step; with a non-finite loss or gradient norm the model, EMA and optimizer stay as they were."""
        x0 = self.next_batch()
        draws = len(x0) * (self.world if self.shared_noise else 1)
        tr = self.tr
        t, weight = sample_time(
            self.sde, draws, self.T, self.eps, tr["weighting"], tr["importance_sampling"], self.noise_gen,
            self.device, t_distribution=tr["t_distribution"], log_snr_mean=tr["log_snr_mean"],
            log_snr_std=tr["log_snr_std"], min_snr_gamma=tr["min_snr_gamma"],
            sigma_data=self.config["net"]["sigma_data"],
        )
        z = None
        if self.shared_noise:
            t, weight = distributed.shard(t), distributed.shard(weight)
            z = distributed.shard(randn_on((draws, *x0.shape[1:]), self.noise_gen, device=self.device))
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.tr["bf16"] else contextlib.nullcontext()
        )
        with autocast:
            loss = dsm_loss(self.net, self.sde, x0, t, weight, self.noise_gen, z).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.tr["grad_clip"] or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.step += 1
        # The global loss, so every rank takes the same skip decision and rank 0 logs the global figure.
        out = {"loss": distributed.mean(loss.detach()).item(), "grad_norm": grad_norm.item()}
        if math.isfinite(out["loss"]) and math.isfinite(out["grad_norm"]):
            self.optimizer.step()
            self.ema.update_parameters(self.model)
        return out

    def _kept(self, run_dir: Path) -> str:
        if self.saved_step is None:
            return "no checkpoint had been written yet"
        return f"the last good checkpoint (step {self.saved_step}) is kept in {run_dir}"

    def _skip_or_stop(self, last: dict[str, float], run_dir: Path) -> None:
        what, value = ("loss", last["loss"]) if not math.isfinite(last["loss"]) else ("gradient", last["grad_norm"])
        budget = self.tr["skip_nonfinite"]
        if len(self.skipped) >= budget:
            used = f" (train.skip_nonfinite={budget} already used on steps {self.skipped})" if budget else ""
            raise DifftimeError(
                f"training diverged: non-finite {what} ({value}) at step {self.step}{used}; {self._kept(run_dir)}; "
                "lower train.lr, set train.grad_clip, or set train.skip_nonfinite=K to skip up to K such steps"
            )
        self.skipped.append(self.step)
        if self.rank == 0:
            tqdm.write(f"difftime: skipped step {self.step}: non-finite {what} ({value}); "
                       f"{len(self.skipped)} of train.skip_nonfinite={budget} used", file=sys.stderr)

    # --- the loop ------------------------------------------------------------------------
    def fit(self, run_dir: str | Path, progress: bool = True) -> dict[str, float]:
        """Train until ``train.steps``, logging and checkpointing into ``run_dir`` (rank 0 writes)."""
        run_dir = Path(run_dir)
        main = self.rank == 0
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
        total = self.tr["steps"]
        log_path = run_dir / "metrics.jsonl" if main else os.devnull
        bar = tqdm(total=total, initial=self.step, disable=not (progress and main), desc="train",
                   unit="step", dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 5.0)
        last: dict[str, float] = {}
        window: list[float] = []
        tick = time.perf_counter()
        tick_step = self.step
        with bar, open(log_path, "a") as log:
            while self.step < total:
                last = self.train_step()
                if math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"]):
                    window.append(last["loss"])
                else:
                    self._skip_or_stop(last, run_dir)
                bar.update(1)
                if (self.step % self.tr["log_every"] == 0 or self.step == total) and window:
                    now = time.perf_counter()
                    record = {"step": self.step, "loss": sum(window) / len(window), "skipped": len(self.skipped),
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
        write_run_config(run_dir, self.config, self.resolved())

    def _check_finite_weights(self, run_dir: Path) -> None:
        for name, module in (("model", self.model), ("EMA", self.ema.module)):
            for key, value in module.state_dict().items():
                if value.is_floating_point() and not torch.isfinite(value).all():
                    raise DifftimeError(
                        f"training diverged: {name} weight {key!r} holds NaN or Inf after step {self.step}; "
                        f"{self._kept(run_dir)}; lower train.lr or set train.grad_clip"
                    )

    def save(self, run_dir: str | Path) -> None:
        """Write checkpoints/step-N/, then replace the top-level copy, then keep the newest K folders."""
        run_dir = Path(run_dir)
        self._check_finite_weights(run_dir)
        ranks = distributed.gather((self.noise_gen.get_state(), self._global_rng_state()))
        if ranks is None:  # not rank 0: these RNG states travel in rank 0's checkpoint
            self.saved_step = self.step
            distributed.barrier()
            return
        state: dict[str, Tensor] = {
            "rng.data": self.data_gen.get_state(),
            "rng.noise": self.noise_gen.get_state(),
            "data.order": self.order,
        }
        for r, (noise, rng) in enumerate(ranks):
            suffix = f".rank{r}" if r else ""
            state[f"rng.torch{suffix}"] = rng["cpu"]
            if r:
                state[f"rng.noise{suffix}"] = noise
            if "cuda" in rng:  # dropout on a GPU draws from CUDA's global stream
                state[f"rng.cuda{suffix}"] = rng["cuda"]
        opt = self.optimizer.state_dict()
        for idx, slots in opt["state"].items():
            for name, value in slots.items():
                state[f"optim.{idx}.{name}"] = value
        files = {
            "model.safetensors": encode_tensors(self.model.state_dict()),
            "ema.safetensors": encode_tensors(self.ema.module.state_dict()),
            "state.safetensors": encode_tensors(state),
        }
        meta = {
            "step": self.step,
            "data_position": self.position,
            "ema_n_averaged": int(self.ema.n_averaged.item()),
            "optim_param_groups": opt["param_groups"],
            "skipped_steps": self.skipped,
            "world_size": self.world,
        }
        save_checkpoint(run_dir, self.step, files, meta, keep=self.tr["keep_checkpoints"])
        self.saved_step = self.step
        self._warn_if_ema_is_young(meta["ema_n_averaged"])
        distributed.barrier()  # no rank runs ahead of a checkpoint that is not on disk yet

    def _warn_if_ema_is_young(self, n_averaged: int) -> None:
        """One line at the final save when the EMA still holds more than 1% of its first weights."""
        share = initial_weight_share(self.tr["ema_decay"], n_averaged, self.tr["ema_warmup"])
        if share > 0.01 and self.step >= self.tr["steps"]:
            tqdm.write(f"difftime: warning: the EMA weights still hold {100 * share:.1f}% of the first weights after "
                       f"{n_averaged} updates; sample with --weights model, or set train.ema_warmup=true, a lower "
                       f"train.ema_decay or more train.steps", file=sys.stderr)

    def load(self, run_dir: str | Path) -> None:
        """Resume from the newest complete checkpoint of ``run_dir``; every file must match its state.json.

        That is the top-level copy, or the newest checkpoints/step-N/ when a kill interrupted
        replacing it. With no checkpoint at all (killed before the first save) the run restarts
        at step 0, which its config rebuilds exactly.
        """
        run_dir = Path(run_dir)
        source = newest_checkpoint(run_dir)
        if source is not None:
            meta = self._restore(source)
            self.saved_step = self.step
        distributed.barrier()  # every rank has read the checkpoint before rank 0 tidies the folder
        if self.rank:
            return
        if source is not None:
            saved_world = meta.get("world_size", 1)
            if saved_world != self.world:
                print(f"difftime: resuming a checkpoint written by {saved_world} process(es) on {self.world}; "
                      + ("the shared noise stream continues unchanged" if self.shared_noise else
                         "per-rank noise streams follow the process count, so the run continues, but not "
                         f"bitwise as it would have on {saved_world}"), file=sys.stderr)
            publish_checkpoint(run_dir, source)
        tidy(run_dir, self.step, keep=self.tr["keep_checkpoints"])

    def _restore(self, source: Path) -> dict[str, Any]:
        meta = read_checked_json(source / "state.json", "checkpoint state")
        try:
            hashes = meta["sha256"]
            load_state_dict_strict(
                self.model,
                load_tensors(source / "model.safetensors", hashes["model.safetensors"]),
                source / "model.safetensors",
            )
            load_state_dict_strict(
                self.ema.module,
                load_tensors(source / "ema.safetensors", hashes["ema.safetensors"]),
                source / "ema.safetensors",
            )
            state = load_tensors(source / "state.safetensors", hashes["state.safetensors"])
            self.ema.n_averaged.fill_(meta["ema_n_averaged"])
            slots: dict[int, dict[str, Tensor]] = {}
            for key, value in state.items():
                if key.startswith("optim."):
                    _, idx, name = key.split(".", 2)
                    slots.setdefault(int(idx), {})[name] = value.to(self.device)
            self.optimizer.load_state_dict({"state": slots, "param_groups": meta["optim_param_groups"]})
            self.data_gen.set_state(state["rng.data"])
            noise_key = "rng.noise" if self.shared_noise or not self.rank else f"rng.noise.rank{self.rank}"
            suffix = f".rank{self.rank}" if self.rank else ""
            for key, restore in ((noise_key, self.noise_gen.set_state), (f"rng.torch{suffix}", torch.set_rng_state)):
                if key in state or not self.rank:  # a rank the saving run lacked keeps its fresh streams
                    restore(state[key])
            # A CUDA stream resumes on CUDA only (a run moved between devices keeps its fresh one).
            if self.device.type == "cuda" and f"rng.cuda{suffix}" in state:
                torch.cuda.set_rng_state(state[f"rng.cuda{suffix}"], self.device)
            self.order = state["data.order"]
            self.position = int(meta["data_position"])
            self.step = int(meta["step"])
            self.skipped = [int(s) for s in meta.get("skipped_steps", [])]  # absent before skipping existed
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise DifftimeError(f"{source} holds an unusable checkpoint: {exc}") from None
        return meta
